"""The reusable step factories, driven by a plain flax.linen module (no transformers)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftjax import TrainState, make_eval_step, make_train_step
from ftjax.config import TrainingConfig
from ftjax.optim import decay_mask, make_optimizer, make_schedule


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(3)(x)


def _data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1).astype(np.int32)
    return {"x": x, "y": y, "weight": np.ones(n, np.float32)}


def _loss_fn(model, train):
    def loss_fn(params, batch, rng):
        logits = model.apply({"params": params}, batch["x"], train=train, rngs={"dropout": rng})
        per = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        return (per * batch["weight"]).sum(), batch["weight"].sum()
    return loss_fn


def test_plain_flax_module_learns_with_dropout():
    model, data = MLP(), _data()
    params = model.init(jax.random.PRNGKey(0), data["x"])["params"]
    tx = optax.adam(3e-2)
    state = TrainState.create(params, tx, jax.random.PRNGKey(1))
    step = jax.jit(make_train_step(_loss_fn(model, True), tx), donate_argnums=0)
    losses = []
    for _ in range(60):
        state, m = step(state, data)
        losses.append(float(m["loss"]))
    assert int(state.step) == 60 and losses[-1] < 0.5 * losses[0]
    eval_step = jax.jit(make_eval_step(lambda p, b: {"pred": model.apply({"params": p}, b["x"]).argmax(-1)}))
    acc = (np.asarray(eval_step(state.params, data)["pred"]) == data["y"]).mean()
    assert acc > 0.8


def test_gradient_accumulation_equals_one_big_batch():
    model, data = MLP(), _data(24)
    data["weight"][-5:] = 0.0  # padding rows must not count, in either layout
    params = model.init(jax.random.PRNGKey(0), data["x"])["params"]
    tx = optax.sgd(0.1)
    big = jax.jit(make_train_step(_loss_fn(model, False), tx))
    accum = jax.jit(make_train_step(_loss_fn(model, False), tx, grad_accum_steps=3))
    s1, m1 = big(TrainState.create(params, tx, jax.random.PRNGKey(0)), data)
    micro = jax.tree.map(lambda v: v.reshape(3, 8, *v.shape[1:]), data)
    s2, m2 = accum(TrainState.create(params, tx, jax.random.PRNGKey(0)), micro)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "constant_with_warmup"])
def test_schedules_warm_up_then_follow_their_shape(kind):
    sched = make_schedule(TrainingConfig(learning_rate=1.0, lr_scheduler_type=kind, warmup_steps=10), 110)
    if kind == "constant":
        assert float(sched(0)) == 1.0
        return
    assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(0.5)
    assert float(sched(10)) == pytest.approx(1.0)
    end = {"linear": 0.0, "cosine": 0.0, "constant_with_warmup": 1.0}[kind]
    assert float(sched(110)) == pytest.approx(end, abs=1e-6)
    if kind == "cosine":
        assert float(sched(60)) == pytest.approx(0.5, abs=1e-6)


def _one_step_with_zero_gradients(params, lr, wd):
    """Params after one ``make_optimizer`` step with all-zero gradients: Adam's part of the update is
    0 / (0 + eps) = 0, so whatever moves is weight decay alone."""
    args = TrainingConfig(learning_rate=lr, weight_decay=wd, lr_scheduler_type="constant", warmup_steps=0,
                          max_grad_norm=1.0)
    tx, _ = make_optimizer(args, 10)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    return optax.apply_updates(params, updates)


def test_weight_decay_skips_biases_and_layernorm(monkeypatch):
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda shape: jnp.asarray(rng.uniform(0.5, 2.0, shape), jnp.float32), {
        "dense": {"kernel": (3, 2), "bias": (2,)},
        "LayerNorm": {"scale": (2,), "bias": (2,)},
        "embeddings": {"embedding": (4, 2)}}, is_leaf=lambda x: isinstance(x, tuple))
    assert decay_mask(params) == {"dense": {"kernel": True, "bias": False}, "LayerNorm": {"scale": False, "bias": False},
                                  "embeddings": {"embedding": True}}
    lr, wd = 0.1, 0.5
    new = _one_step_with_zero_gradients(params, lr, wd)
    for path in (("dense", "kernel"), ("embeddings", "embedding")):  # decoupled decay: p - lr * wd * p
        before, after = params[path[0]][path[1]], new[path[0]][path[1]]
        np.testing.assert_allclose(after, before * (1 - lr * wd), rtol=1e-6)
        assert np.all(np.asarray(after) < np.asarray(before))
    for path in (("dense", "bias"), ("LayerNorm", "scale"), ("LayerNorm", "bias")):
        np.testing.assert_array_equal(new[path[0]][path[1]], params[path[0]][path[1]])  # exactly unchanged

    # The check above can fail: with a mask that decays everything, the bias moves as well.
    monkeypatch.setattr("ftjax.optim.decay_mask", lambda p: jax.tree.map(lambda _: True, p))
    wrong = _one_step_with_zero_gradients(params, lr, wd)
    np.testing.assert_allclose(wrong["dense"]["bias"], params["dense"]["bias"] * (1 - lr * wd), rtol=1e-6)
    assert not np.array_equal(wrong["dense"]["bias"], params["dense"]["bias"])
