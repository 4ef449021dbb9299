"""Optax chains with the ``TrainingArguments`` meanings: schedules with warmup, AdamW, clipping."""

from __future__ import annotations

import math

import jax
import optax

from ftjax.config import TrainingConfig


def warmup_steps(args: TrainingConfig, total_steps: int) -> int:
    """``warmup_steps`` wins over ``warmup_ratio``, as in transformers."""
    return args.warmup_steps if args.warmup_steps > 0 else math.ceil(args.warmup_ratio * total_steps)


def make_schedule(args: TrainingConfig, total_steps: int) -> optax.Schedule:
    """Learning rate per optimizer step.

    Example: ``make_schedule(TrainingConfig(lr_scheduler_type="cosine", warmup_ratio=0.1), 1000)``.
    """
    lr, warm = args.learning_rate, warmup_steps(args, total_steps)
    kind = args.lr_scheduler_type
    if kind == "constant":
        return optax.constant_schedule(lr)
    warmup = optax.linear_schedule(0.0, lr, max(warm, 1)) if warm else optax.constant_schedule(lr)
    decay_steps = max(total_steps - warm, 1)
    if kind == "constant_with_warmup":
        after = optax.constant_schedule(lr)
    elif kind == "linear":
        after = optax.linear_schedule(lr, 0.0, decay_steps)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps)
    else:
        raise ValueError(f"unknown lr_scheduler_type {kind!r}")
    return optax.join_schedules([warmup, after], [warm]) if warm else after


def decay_mask(params) -> dict:
    """True for weights that get weight decay: not biases, not LayerNorm / RMSNorm scales."""

    def wants_decay(path, leaf) -> bool:
        names = [str(getattr(k, "key", k)).lower() for k in path]
        if names[-1] in ("bias", "scale") or leaf.ndim < 2:
            return False
        return not any("layernorm" in n or "layer_norm" in n or n.endswith("norm") or n.startswith("ln_")
                       for n in names)

    return jax.tree_util.tree_map_with_path(wants_decay, params)


def make_optimizer(args: TrainingConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with a decay mask, global-norm clipping and the schedule; returns (tx, schedule)."""
    schedule = make_schedule(args, total_steps)
    parts = []
    if args.max_grad_norm and args.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(args.max_grad_norm))
    parts.append(optax.adamw(schedule, b1=args.adam_beta1, b2=args.adam_beta2, eps=args.adam_epsilon,
                             weight_decay=args.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule
