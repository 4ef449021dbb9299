"""Pure train / eval step factories, usable outside ftjax with any Flax model.

The loss function contract makes gradient accumulation exact: it returns the *sum* of per-example
(or per-token) losses and the number of examples (tokens) that count, so summing over microbatches
and dividing once equals one big batch.

Example (a plain ``flax.linen`` module)::

    model = nn.Dense(3)
    def loss_fn(params, batch, rng):
        logits = model.apply({"params": params}, batch["x"])
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        return (per_example * batch["weight"]).sum(), batch["weight"].sum()
    tx = optax.adamw(1e-3)
    state = TrainState.create(params, tx, jax.random.key(0))
    train_step = jax.jit(make_train_step(loss_fn, tx), donate_argnums=0)
    state, metrics = train_step(state, batch)
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

Batch = dict[str, jax.Array]
# loss_fn(params, batch, rng) -> (loss_sum, weight_sum)
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, jax.Array]]


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data position."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # base key; each step uses fold_in(rng, step)

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    grad_accum_steps: int = 1) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Builds ``train_step(state, batch) -> (state, metrics)``.

    Args:
      loss_fn: ``(params, batch, rng) -> (loss_sum, weight_sum)``.
      tx: the optax transformation (clipping, schedule and decay included).
      grad_accum_steps: when > 1, every batch leaf has a leading microbatch axis of this size and
        gradients are summed over it with ``lax.scan`` before one optimizer update.

    ``train_step(state, batch, *frozen)`` passes any further arguments (parameters that do not
    train, such as LoRA's frozen base weights) to ``loss_fn(params, batch, rng, *frozen)``.

    Returns:
      A pure function; jit it with in/out shardings and ``donate_argnums=0``.
      ``metrics`` holds ``loss`` (mean over weight), ``weight`` and ``grad_norm``.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: Batch, *frozen):
        rng = jax.random.fold_in(state.rng, state.step)
        if grad_accum_steps == 1:
            (loss_sum, weight), grads = grad_fn(state.params, batch, rng, *frozen)
        else:
            def micro(carry, xs):
                i, mb = xs
                (l, w), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i), *frozen)
                acc_l, acc_w, acc_g = carry
                return (acc_l + l, acc_w + w, jax.tree.map(jnp.add, acc_g, g)), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
            (loss_sum, weight, grads), _ = jax.lax.scan(
                micro, init, (jnp.arange(grad_accum_steps), batch))
        denom = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: (g / denom).astype(jnp.float32), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / denom, "weight": weight, "grad_norm": optax.tree.norm(grads)}
        if "weight" in batch:  # real rows, or packed rows' examples: the loss weight counts tokens in token tasks
            metrics["examples"] = batch["segment_weight" if "segment_weight" in batch else "weight"].sum()
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(outputs_fn: Callable[[Any, Batch], dict]) -> Callable[[Any, Batch], dict]:
    """Builds ``eval_step(params, batch) -> outputs``: per-example arrays brought to the host.

    ``outputs_fn(params, batch)`` runs the model without dropout and returns a dict of arrays whose
    leading axis is the batch (predictions, per-example losses...). Kept as a factory so that callers
    jit it with their own shardings.
    """

    def eval_step(params, batch: Batch) -> dict:
        return outputs_fn(params, batch)

    return eval_step
