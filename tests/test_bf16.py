"""training.bf16: float32 master weights and optimizer state, bfloat16 compute, a loss close to float32's."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_overrides
from ftjax import plan
from ftjax.config import load_config
from ftjax.trainer import Trainer

# Largest difference allowed between the bf16 and the float32 train loss at any logged step of the
# run below (losses about 1.1; bfloat16 keeps 8 mantissa bits, about 3 significant digits).
LOSS_TOLERANCE = 0.02


def _train(tiny_model, sentiment_csv, out, bf16: bool):
    cfg = load_config(None, tiny_overrides(tiny_model, sentiment_csv, out, **{
        "training.bf16": str(bf16).lower(), "training.max_steps": 6, "training.logging_steps": 1,
        "training.dropout": "false", "training.eval_strategy": "no", "training.save_strategy": "no",
        "training.learning_rate": 1e-4}))
    trainer = Trainer(cfg)
    trainer.train()
    losses = [r["train/loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "train/loss" in r]
    return trainer, np.array(losses)


def test_bf16_dtypes_and_loss_within_tolerance_of_float32(tiny_model, sentiment_csv, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="ftjax"):
        trainer, bf16_losses = _train(tiny_model, sentiment_csv, tmp_path / "bf16", bf16=True)
    assert "training.bf16 on CPU" in caplog.text  # XLA:CPU's bf16 is slower here: the user is told
    assert {x.dtype for x in jax.tree.leaves(trainer.state.params)} == {np.dtype("float32")}
    float_leaves = [x for x in jax.tree.leaves(trainer.state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert float_leaves and {x.dtype for x in float_leaves} == {np.dtype("float32")}  # Adam moments
    ids = np.ones((2, 16), np.int32)
    out = trainer.model(ids, params=trainer.state.params, output_hidden_states=True)
    assert {h.dtype for h in out.hidden_states} == {jnp.dtype(jnp.bfloat16)} and out.logits.dtype == jnp.bfloat16
    _, fp32_losses = _train(tiny_model, sentiment_csv, tmp_path / "fp32", bf16=False)
    assert len(bf16_losses) == len(fp32_losses) == 6
    assert np.abs(bf16_losses - fp32_losses).max() < LOSS_TOLERANCE
    assert not np.array_equal(bf16_losses, fp32_losses)  # really computed in another precision


def test_plan_shows_what_bf16_saves(tiny_model, sentiment_csv, tmp_path):
    base = tiny_overrides(tiny_model, sentiment_csv, tmp_path / "run", **{"training.per_device_train_batch_size": 32})
    fp32, bf16 = (plan.plan(load_config(None, base + [f"training.bf16={b}"])) for b in ("false", "true"))
    assert fp32["param_bytes"] == bf16["param_bytes"] and fp32["opt_bytes"] == bf16["opt_bytes"]  # float32 masters
    assert bf16["temp_bytes_per_device"] < 0.8 * fp32["temp_bytes_per_device"]  # bfloat16 activations
    assert "bfloat16 compute" in plan.table(bf16) and "float32 compute" in plan.table(fp32)
