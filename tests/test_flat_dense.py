"""ftjax.flat_dense: nn.Dense layers run on [rows, features], with the same loss and gradients."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_family, tiny_overrides
from ftjax.config import load_config
from ftjax.flat_dense import flat_dense, use_flat_dense
from ftjax.trainer import Trainer


def _dense_lhs_ranks(closed_jaxpr) -> list[int]:
    """Rank of the input of every dot_general that contracts its last axis with a 2-D kernel's first
    (an ``nn.Dense``), in the jaxpr and every jaxpr nested in it (jit, remat, custom_vjp...)."""
    ranks = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
                lhs, rhs = (v.aval for v in eqn.invars)
                if rhs.ndim == 2 and not lb and tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,):
                    ranks.append(lhs.ndim)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)
    walk(closed_jaxpr.jaxpr)
    return ranks


def _loss_and_grads(model, context):
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 128, (4, 16)))

    def loss(params, rng):
        with context():
            logits = model(input_ids=ids, params=params, dropout_rng=rng, train=True).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids).mean()

    args = (model.params, jax.random.PRNGKey(1))
    return jax.jit(jax.value_and_grad(loss))(*args), _dense_lhs_ranks(jax.make_jaxpr(loss)(*args))


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_flat_dense_same_loss_and_gradients_with_2d_dense_inputs(family):
    model = tiny_family(family)
    (loss, grads), ranks = _loss_and_grads(model, contextlib.nullcontext)
    (loss_f, grads_f), ranks_f = _loss_and_grads(model, flat_dense)
    assert 3 in ranks and set(ranks_f) == {2} and len(ranks_f) == len(ranks)
    np.testing.assert_allclose(loss_f, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_f), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_trainer_step_uses_flat_dense_as_configured(tiny_model, sentiment_csv, tmp_path):
    """null (auto) turns it on on the CPU backend, false keeps the 3-D contractions (the classifier
    head's are 2-D either way); the train and evaluation steps follow the setting."""
    assert use_flat_dense(None) is (jax.default_backend() == "cpu") and not use_flat_dense(False)
    for setting, flat in (("null", True), ("false", False)):
        trainer = Trainer(load_config(None, tiny_overrides(tiny_model, sentiment_csv, tmp_path / setting,
                                                           **{"training.flat_dense": setting})))
        trainer.init_state(total_steps=1)
        batch = next(iter(trainer._device_batches(trainer.batcher("train"), 0, 0, 1)))
        loss_fn = Trainer.loss_fn(trainer.task, trainer.model, trainer.args)
        ranks = _dense_lhs_ranks(jax.make_jaxpr(loss_fn)(trainer.state.params, batch, jax.random.PRNGKey(0)))
        assert (set(ranks) == {2}) is flat and (3 in ranks) is not flat, (setting, ranks)
        trainer._outputs(trainer.batcher("validation"))  # builds the evaluation step
        eval_ranks = _dense_lhs_ranks(jax.make_jaxpr(trainer._eval_step)(trainer.state.params, batch))
        assert (set(eval_ranks) == {2}) is flat and (3 in eval_ranks) is not flat, (setting, eval_ranks)
