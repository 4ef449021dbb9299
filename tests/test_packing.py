"""Packed fine-tuning: packed rows give the unpacked loss, gradients and metrics; bucket choice."""

import jax
import jax.numpy as jnp
import numpy as np
import datasets
import pytest
import transformers

from ftjax.config import load_config
from ftjax.data.batching import Batcher, choose_buckets
from ftjax.data.example_packing import best_fit_bins, pack_examples, packed_groups
from ftjax.errors import FtjaxError
from ftjax.segments import check_segment_support
from ftjax.tasks import get_task

ROW = 48
CONFIGS = {
    "bert": transformers.BertConfig,
    "roberta": transformers.RobertaConfig,
    "xlm-roberta": transformers.XLMRobertaConfig,
    "electra": transformers.ElectraConfig,
}


def _config(family, num_labels):
    extra = {"embedding_size": 32} if family == "electra" else {}
    return CONFIGS[family](vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=80, num_labels=num_labels,
                           pad_token_id=1, type_vocab_size=2, **extra)


def _examples(n, token_level, num_labels, seed=0):
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
    return datasets.Dataset.from_dict(rows)


def _batch(ds, groups=()):
    b = Batcher(ds, batch_size=len(ds), max_length=ROW, buckets=[ROW], pad_id=1, groups=groups)
    return {k: jnp.asarray(v) for k, v in b.make_batch(np.arange(len(ds))).items()}


def _loss_and_grads(task, model, batch):
    def f(params):
        total, weight = task.loss(model, params, batch, None, False)
        return total / weight, weight
    (loss, weight), grads = jax.value_and_grad(f, has_aux=True)(model.params)
    return loss, weight, grads


def _assert_same(task, model, ds):
    packed, stats = pack_examples(ds, ROW)
    assert stats.rows < len(ds) / 2  # several examples per row
    plain = _loss_and_grads(task, model, _batch(ds))
    packed_out = _loss_and_grads(task, model, _batch(packed, packed_groups(packed, ROW)))
    assert float(plain[1]) == float(packed_out[1])  # the same examples / tokens counted
    np.testing.assert_allclose(float(packed_out[0]), float(plain[0]), rtol=1e-5)
    for g_plain, g_packed in zip(jax.tree.leaves(plain[2]), jax.tree.leaves(packed_out[2])):
        np.testing.assert_allclose(np.asarray(g_packed), np.asarray(g_plain), rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_packed_classification_equals_unpacked_loss_and_gradients(family):
    task = get_task(load_config(None, ["task=classification"]))
    task.label_names = ["a", "b", "c"]
    model = getattr(transformers, f"Flax{CONFIGS[family].__name__[:-6]}ForSequenceClassification")(
        _config(family, 3), seed=0)
    _assert_same(task, model, _examples(24, False, 3))


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_packed_ner_equals_unpacked_loss_and_gradients(family):
    task = get_task(load_config(None, ["task=ner"]))
    task.label_names = ["O", "B-x", "I-x"]
    model = getattr(transformers, f"Flax{CONFIGS[family].__name__[:-6]}ForTokenClassification")(
        _config(family, 3), seed=0)
    _assert_same(task, model, _examples(24, True, 3))


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


def test_best_fit_bins_fill_and_oversized_example():
    bins = best_fit_bins(np.array([5, 3, 4, 2, 8, 1]), 8)
    assert sorted(i for b in bins for i in b) == list(range(6)) and len(bins) == 3
    with pytest.raises(FtjaxError, match="does not fit"):
        best_fit_bins(np.array([9]), 8)


def test_unsupported_family_and_regression_fail_with_one_line():
    with pytest.raises(FtjaxError, match="distilbert models do not support packed rows"):
        check_segment_support(transformers.DistilBertConfig())
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
    assert len(auto) <= 4 and auto[-1] == 128

    def padding(buckets):
        return sum(next(b for b in buckets if b >= n) - n for n in lengths)
    assert padding(auto) < padding([32, 64, 128]) * 0.8
    assert padding(auto) <= min(padding(sorted({a, b, c, 128})) for a in range(8, 128, 8)
                                for b in range(8, 128, 8) for c in range(8, 128, 8))
