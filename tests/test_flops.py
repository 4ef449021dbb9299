"""MFU in the logs: TFLOP/s per device from XLA's count of the compiled train step, MFU against a peak."""

import json

import jax
import pytest

from conftest import tiny_overrides
from ftjax.config import load_config
from ftjax.flops import compiled_flops, peak_tflops
from ftjax.trainer import Trainer


@pytest.mark.parametrize("kind, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0), ("NVIDIA H100 PCIe", "bfloat16", 756.0),
    ("NVIDIA A100-SXM4-40GB", "float32", 19.5), ("TPU v5 lite", "bfloat16", 197.0), ("TPU v5p", "bfloat16", 459.0),
    ("TPU v4", "float32", None), ("cpu", "float32", None)])
def test_peak_table_by_device_kind(kind, dtype, expected):
    assert peak_tflops(kind, dtype) == expected
    assert peak_tflops(kind, dtype, override=2.5) == 2.5


def _run(tiny_model, sentiment_csv, out, **extra):
    cfg = load_config(None, tiny_overrides(tiny_model, sentiment_csv, out, **{
        "training.max_steps": 4, "training.eval_strategy": "no", "training.save_strategy": "no",
        "data.bucket_lengths": "[32]", "training.device_peak_tflops": 0.5, **extra}))
    trainer = Trainer(cfg)
    return trainer, trainer.train()


def test_logs_and_results_report_tflops_and_mfu(tiny_model, sentiment_csv, tmp_path):
    trainer, results = _run(tiny_model, sentiment_csv, tmp_path / "a", **{"training.report_to": "[jsonl, tensorboard]"})
    train = results["train"]
    # XLA's count of the step the trainer compiled (one bucket: every step has the same shape).
    batch = next(iter(trainer._device_batches(trainer.batcher("train"), 0, 0, 1)))
    per_step = compiled_flops(trainer.train_step.lower(trainer.state, batch).compile())
    assert per_step > 1e6 and train["flops"] == pytest.approx(4 * per_step)
    assert train["tflops_per_device"] == pytest.approx(train["flops"] / train["train_runtime_s"] / 1e12)
    assert train["mfu"] == pytest.approx(train["tflops_per_device"] / 0.5)
    assert train["device_kind"] == jax.devices()[0].device_kind
    logged = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    train_lines = [r for r in logged if "train/loss" in r]
    assert len(train_lines) == 2 and all(r["train/tflops_per_device"] > 0 for r in train_lines)
    assert all(r["train/mfu"] == pytest.approx(r["train/tflops_per_device"] / 0.5) for r in train_lines)
    saved = json.loads((tmp_path / "a" / "results.json").read_text())["train"]
    assert saved["mfu"] == pytest.approx(train["mfu"])

    # Gradient accumulation: XLA counts the microbatch loop's body once; the counter multiplies it back,
    # the optimizer update once, so 2 microbatches of 4 rows cost about what one batch of 8 does (the
    # per-microbatch gradient sums, elementwise over the parameters, are the rest: 5% in this tiny
    # model, whose 1M parameters are almost all embeddings; without the correction it was 33% off).
    _, accum = _run(tiny_model, sentiment_csv, tmp_path / "b", **{
        "training.per_device_train_batch_size": 4, "training.gradient_accumulation_steps": 2})
    assert accum["train"]["flops"] == pytest.approx(train["flops"], rel=0.08)


def test_no_mfu_without_a_known_peak(tiny_model, sentiment_csv, tmp_path):
    _, results = _run(tiny_model, sentiment_csv, tmp_path / "run", **{"training.device_peak_tflops": "null"})
    assert results["train"]["tflops_per_device"] > 0 and "mfu" not in results["train"]
    assert results["train"]["device_peak_tflops"] is None
