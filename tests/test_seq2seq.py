"""Seq2seq: target buckets, shift-right, jitted generation (greedy / beam / no-repeat n-grams) equal to
transformers' own, ROUGE / BLEU, tiny BART and T5 (jax >= 0.10 shim) end to end, BERT2BERT from
MiniLM-L6 on real Wikipedia title generation, bad input."""

import json

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from conftest import MINILM, tiny_overrides
from ftjax import cli
from ftjax.config import load_config
from ftjax.data.batching import Batcher, LengthGroup
from ftjax.data.loading import resolve_path
from ftjax.errors import FtjaxError
from ftjax.tasks.seq2seq import decoder_inputs, generation_metrics
from ftjax.trainer import Trainer

WIKI = "pkg://gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def _tokenizer():
    return transformers.AutoTokenizer.from_pretrained(resolve_path(MINILM))


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    tok = _tokenizer()
    config = transformers.T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                   num_heads=4, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
                                   decoder_start_token_id=tok.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny-t5")
    transformers.FlaxT5ForConditionalGeneration(config, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _overrides(model, out, **extra):
    base = {"task": "seq2seq", "model.max_length": 64, "data.bucket_lengths": "[64]", "task_options.source_column": "text",
            "task_options.target_column": "title", "task_options.max_target_length": 16, "task_options.target_bucket_lengths": "[16]",
            "training.learning_rate": 3e-3, "training.predict_with_generate": "true", "inference.max_new_tokens": 6,
            "training.export_pytorch": "false", "training.per_device_eval_batch_size": 8}
    return tiny_overrides(model, WIKI, out, **{**base, **extra})


def test_targets_get_their_own_bucket_length():
    ds = datasets.Dataset.from_dict({"input_ids": [[5] * 50, [5] * 30], "attention_mask": [[1] * 50, [1] * 30],
                                     "labels": [[7] * 3, [7] * 12]})
    batcher = Batcher(ds, 2, 64, [32, 64], 0, groups=[LengthGroup(("labels",), 16, (8, 16))])
    (batch,) = list(batcher.batches())
    assert batch["input_ids"].shape == (2, 64) and batch["labels"].shape == (2, 16)
    assert (batch["labels"][0, 3:] == -100).all() and (batch["labels"][1, :12] == 7).all()
    no_labels = Batcher(ds.remove_columns("labels"), 2, 64, [32, 64], 0, groups=[LengthGroup(("labels",), 16)])
    assert set(next(no_labels.batches())) == {"input_ids", "attention_mask", "weight", "index"}


def test_decoder_inputs_use_the_models_shift_right(tiny_bart, tiny_t5):
    labels = jnp.array([[11, 12, 102, -100]])
    bart = transformers.FlaxBartForConditionalGeneration.from_pretrained(tiny_bart)
    np.testing.assert_array_equal(decoder_inputs(bart, labels), [[101, 11, 12, 102]])
    t5 = transformers.FlaxT5ForConditionalGeneration.from_pretrained(tiny_t5)
    np.testing.assert_array_equal(decoder_inputs(t5, labels), [[0, 11, 12, 102]])


def test_generation_metrics():
    out = generation_metrics(["the cat sat on the mat", "hello"], ["the cat sat on the mat", "goodbye"])
    assert out["rouge1"] == pytest.approx(50) and out["rougeLsum"] == pytest.approx(50)
    assert 0 < out["bleu"] < 100


@pytest.mark.parametrize("beams,ngram", [(1, None), (3, 2)])
def test_jitted_generate_matches_transformers(tiny_bart, beams, ngram):
    """The task's generate (traced in jit, with the no-repeat shim) equals transformers' eager call."""
    config = load_config(None, ["task=seq2seq", "inference.max_new_tokens=7", f"inference.num_beams={beams}",
                                f"inference.no_repeat_ngram_size={ngram or 0}", "inference.length_penalty=0.8"])
    from ftjax.tasks.seq2seq import Seq2Seq
    task = Seq2Seq(config)
    model = transformers.FlaxBartForConditionalGeneration.from_pretrained(tiny_bart)
    ids = jnp.array(np.random.default_rng(0).integers(1000, 2000, (2, 12)))
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}
    ours = jax.jit(lambda p, b: task.generate_ids(model, p, b))(model.params, batch)
    ref = model.generate(ids, attention_mask=batch["attention_mask"], max_new_tokens=7, num_beams=beams,
                         no_repeat_ngram_size=ngram, length_penalty=0.8, decoder_start_token_id=101,
                         pad_token_id=0, eos_token_id=102, trace=False).sequences
    np.testing.assert_array_equal(ours, ref)
    if ngram:
        for row in np.asarray(ours):
            bigrams = [tuple(row[i:i + 2]) for i in range(len(row) - 1) if 0 not in row[i:i + 2]]
            assert len(bigrams) == len(set(bigrams))


@pytest.mark.parametrize("model_fixture", ["tiny_bart", "tiny_t5"])
def test_tiny_models_train_and_generate_on_wikipedia_titles(model_fixture, request, tmp_path):
    model = request.getfixturevalue(model_fixture)
    extra = {"inference.num_beams": 2, "inference.no_repeat_ngram_size": 2}
    if model_fixture == "tiny_t5":
        extra["task_options.source_prefix"] = "'summarize: '"
    out = tmp_path / "run"
    results = Trainer(load_config(None, _overrides(model, out, **extra))).train()
    val = results["validation"]
    assert {"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "gen_len", "loss"} <= set(val)
    assert val["num_examples"] == 11 and 0 <= val["gen_len"] <= 6
    assert results["train"]["compiles"]["train_step"] == 1  # one source bucket x one target bucket
    losses = [json.loads(line)["train/loss"] for line in (out / "log.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert losses[-1] < losses[0] - 1.0


def test_bert2bert_from_minilm_trains_exports_and_predicts(tmp_path):
    """The real MiniLM-L6 checkpoint as encoder and decoder (BERT2BERT), a few steps on Wikipedia
    title generation, exported and reloaded by ``ftjax predict`` through FlaxAutoModelForSeq2SeqLM."""
    out = tmp_path / "run"
    overrides = _overrides(MINILM, out, **{"training.max_steps": 3, "training.per_device_train_batch_size": 4,
                                           "training.learning_rate": 1e-4, "training.eval_strategy": "no",
                                           "training.save_strategy": "no", "data.max_eval_samples": 4,
                                           "training.predict_with_generate": "false"})
    trainer = Trainer(load_config(None, overrides))
    assert type(trainer.model).__name__ == "FlaxEncoderDecoderModel"
    results = trainer.train()
    assert results["train"]["global_step"] == 3 and np.isfinite(results["validation"]["loss"])
    reloaded = transformers.FlaxAutoModelForSeq2SeqLM.from_pretrained(out / "export")
    assert reloaded.config.decoder_start_token_id == 101
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "Anarchism is a political philosophy."}) + "\n")
    cfg = tmp_path / "s2s.yaml"
    cfg.write_text(f"task: seq2seq\ntraining: {{output_dir: {out}}}\ntask_options: {{source_column: text}}\n"
                   "model: {max_length: 64}\ninference: {max_new_tokens: 4}\nmesh: {data: 1}\n")
    assert cli.main(["predict", str(cfg), "--input", str(tmp_path / "in.jsonl"),
                     "--output", str(tmp_path / "pred.jsonl")]) == 0
    pred = json.loads((tmp_path / "pred.jsonl").read_text())["prediction"]
    assert isinstance(pred["generated_text"], str)


@pytest.mark.parametrize("case,message", [("empty_target", "train split, example 0: empty target"),
                                          ("missing_source", "column 'source' not found")])
def test_bad_input_fails_with_one_clear_line(case, message, tiny_bart, tmp_path):
    rows = [{"source": f"text {i}", "target": f"title {i}"} for i in range(20)]
    if case == "empty_target":
        rows[2]["target"] = " "
    else:
        rows = [{"text": r["source"], "target": r["target"]} for r in rows]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = tiny_overrides(tiny_bart, str(data), tmp_path / "run", task="seq2seq")
    with pytest.raises(FtjaxError, match=message) as e:
        Trainer(load_config(None, overrides))
    assert "\n" not in str(e.value)
