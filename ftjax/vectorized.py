"""Many runs in one compile: a grid of shape-free hyperparameters trained at once with ``jax.vmap``.

``train_vectorized(configs)`` trains runs that differ only in values that change no array shape
and not the data pipeline (learning rate, weight decay, warmup, schedule, Adam betas / epsilon,
seed = initialisation and dropout draws). Their parameters and optimizer states get a leading run
axis; the step is the trainer's own ``make_train_step`` (task loss, gradient accumulation, clipping)
``vmap``ped over that axis, with the optimizer values held in the optimizer state by
``optax.inject_hyperparams`` so each run reads its own. One data pipeline (the trainer's batcher)
feeds every run the same batch, so one compile serves all of them; evaluation reuses the trainer's
eval step and task metrics, one run at a time.

Each run's metrics equal training its config alone (``tests/test_sweep.py``), with one condition
made explicit: the runs share one data order, so every run's config records ``data.seed`` (the
data's seed, default ``training.seed``) and training that config alone gives the same numbers.

Dropout *rates* are Python constants inside transformers' Flax modules (``nn.Dropout(rate=...)``):
runs that differ in a ``model.config_overrides.*dropout*`` value are split into groups, one compile
per group. What is not supported here (checkpoints, mid-run evaluation, early stopping, exports)
is for single runs: the sweep trains those with the ``Trainer`` itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax.config import Config
from ftjax.data.batching import agree_max
from ftjax.errors import FtjaxError
from ftjax.models import abstract_params, place_params
from ftjax.optim import decay_mask, make_schedule
from ftjax.step import TrainState, make_train_step

# Keys whose values only enter as numbers in the optimizer, the schedule or the random keys.
VECTOR_KEYS = ("training.learning_rate", "training.weight_decay", "training.warmup_steps",
               "training.warmup_ratio", "training.lr_scheduler_type", "training.adam_beta1",
               "training.adam_beta2", "training.adam_epsilon", "training.seed")
# Python constants of the model: one compile per value (a group), still vectorized inside it.
GROUP_KEY_PATTERN = ("model.config_overrides.", "dropout")
# Hyperparameters of optax.adamw read from the optimizer state (inject_hyperparams).
INJECTED = {"learning_rate": "learning_rate", "weight_decay": "weight_decay", "b1": "adam_beta1",
            "b2": "adam_beta2", "eps": "adam_epsilon"}


INJECT_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def is_group_key(key: str) -> bool:
    return key.startswith(GROUP_KEY_PATTERN[0]) and GROUP_KEY_PATTERN[1] in key


def check_vectorizable(keys) -> None:
    """One FtjaxError line when a varied key changes shapes or the data pipeline."""
    for key in keys:
        if key not in VECTOR_KEYS and not is_group_key(key):
            raise FtjaxError(f"--vectorize: '{key}' changes array shapes or the data pipeline; runs can share "
                             f"one compile only when they vary {', '.join(k.split('.')[-1] for k in VECTOR_KEYS)} "
                             "or a model dropout rate (model.config_overrides.*dropout*)")


def injected_optimizer(args) -> optax.GradientTransformation:
    """The optimizer of ``ftjax.optim.make_optimizer`` (clipping, AdamW with the decay mask), with
    AdamW's numbers kept in its state so a vmapped step gives each run its own. The learning rate
    is set before every update from the run's schedule (``with_learning_rate``)."""
    parts = []
    if args.max_grad_norm and args.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(args.max_grad_norm))
    parts.append(optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=0.0, b1=args.adam_beta1, b2=args.adam_beta2, eps=args.adam_epsilon,
        weight_decay=args.weight_decay, mask=decay_mask))
    return optax.chain(*parts)


def with_learning_rate(opt_state, lr):
    """``opt_state`` (of ``injected_optimizer``) with its learning rate set to ``lr``."""
    def set_lr(s):
        if isinstance(s, INJECT_STATES):
            return s._replace(hyperparams={**s.hyperparams, "learning_rate": jnp.asarray(lr, jnp.float32)})
        return s
    return jax.tree.map(set_lr, opt_state, is_leaf=lambda s: isinstance(s, INJECT_STATES))


def make_vector_step(loss_fn, tx, grad_accum_steps: int = 1):
    """``step(states, lr_tables, batch) -> (states, metrics)`` over a leading run axis of ``states``
    and ``lr_tables`` (``[runs, total_steps]``); every run gets the same ``batch``."""
    train_step = make_train_step(loss_fn, tx, grad_accum_steps)

    def run_step(state: TrainState, lrs: jax.Array, batch):
        state = state.replace(opt_state=with_learning_rate(state.opt_state, lrs[state.step]))
        return train_step(state, batch)

    return jax.vmap(run_step, in_axes=(0, 0, None))


def stack(trees: list) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def groups(configs: list[Config], varied: dict[str, list]) -> list[list[int]]:
    """Indices of ``configs`` that can share one compile (same values of every group key)."""
    group_keys = [k for k in varied if is_group_key(k)]
    out: dict[tuple, list[int]] = {}
    for i, values in enumerate(varied_rows(configs, group_keys)):
        out.setdefault(tuple(json.dumps(v) for v in values), []).append(i)
    return list(out.values())


def varied_rows(configs, keys):
    def get(cfg, key):
        node: Any = cfg.to_dict()
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node
    return [[get(c, k) for k in keys] for c in configs]


def train_vectorized(configs: list[Config], varied_keys, on_done=None) -> list[dict]:
    """Trains ``configs`` (differing only in ``varied_keys``) group by group; writes each run's
    ``config.json``, ``log.jsonl`` and ``results.json`` into its ``training.output_dir`` and returns
    the results in order. ``on_done(index, results)`` is called as each run finishes."""
    check_vectorizable(varied_keys)
    results: list = [None] * len(configs)
    for members in groups(configs, {k: None for k in varied_keys}):
        for i, res in zip(members, _train_group([configs[i] for i in members])):
            results[i] = res
            if on_done:
                on_done(i, res)
    return results


def _train_group(configs: list[Config]) -> list[dict]:
    from ftjax.trainer import Trainer

    data_seed = configs[0].data_seed
    configs = [dataclasses.replace(c, data=dataclasses.replace(c.data, seed=data_seed)) for c in configs]
    base = configs[0]
    args = base.training
    if args.load_best_model_at_end or args.early_stopping_patience:
        raise FtjaxError("--vectorize: load_best_model_at_end / early_stopping_patience need single runs")
    started = time.perf_counter()
    trainer = Trainer(base)
    train_batcher = trainer.batcher("train")
    steps_per_epoch = int(agree_max([train_batcher.num_batches()])[0])
    total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)

    # Every run's initial state: parameters from its seed (a fresh head's init), its own optimizer numbers.
    params_by_seed = {args.seed: trainer.model.params}
    states, lr_tables = [], []
    for cfg in configs:
        a = cfg.training
        if a.seed not in params_by_seed:
            model, weights = trainer.task.load_model(cfg.model, a.bf16, trainer.tokenizer, seed=a.seed,
                                                     **trainer.task.model_kwargs())
            params_by_seed[a.seed] = place_params(model, weights, trainer.param_shardings(abstract_params(model)))
        params = params_by_seed[a.seed]
        states.append(TrainState.create(params, injected_optimizer(a), jax.random.PRNGKey(a.seed)))
        lr_tables.append(jax.vmap(make_schedule(a, total))(jnp.arange(total + 1)))
    del params_by_seed
    state, lr_tables = stack(states), jnp.stack(lr_tables)
    del states
    trainer.model._params = None
    tx = injected_optimizer(args)  # structure only: the numbers come from each run's state
    accum = args.gradient_accumulation_steps
    step = jax.jit(make_vector_step(Trainer.loss_fn(trainer.task, trainer.model, args), tx, accum),
                   donate_argnums=0)
    setup_s = time.perf_counter() - started

    started, metrics, epoch, done = time.perf_counter(), [], 0, 0
    while done < total:
        for batch in trainer._device_batches(train_batcher, epoch, 0, steps_per_epoch, accum, train=True):
            state, m = step(state, lr_tables, batch)
            metrics.append(m)
            done += 1
            if done >= total:
                break
        epoch += 1
    metrics = jax.device_get(metrics)
    jax.block_until_ready(state.params)
    train_s = time.perf_counter() - started

    losses = np.stack([m["loss"] for m in metrics])  # [steps, runs]
    examples = float(sum(np.asarray(m.get("examples", m["weight"]))[0] for m in metrics))
    out = []
    for r, cfg in enumerate(configs):
        run_dir = Path(cfg.training.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        trainer.output_dir = run_dir  # the task's reports go to the run's folder
        params = jax.tree.map(lambda x: x[r], state.params)
        log = _log_records(losses[:, r], np.stack([m["grad_norm"] for m in metrics])[:, r],
                           np.asarray(lr_tables[r]), cfg.training.logging_steps)
        results = {"train": {
            "global_step": total, "epochs": total / steps_per_epoch, "train_loss": log[-1]["train/loss"],
            "train_examples": examples, "train_runtime_s": train_s, "setup_s": setup_s,
            "train_examples_per_second": examples * len(configs) / max(train_s, 1e-9),
            "vectorized_runs": len(configs), "compiles": {"train_step": step._cache_size()},
            "stopped_by": None if np.isfinite(losses[:, r]).all() else "nonfinite_loss",
            "devices": jax.device_count(), "backend": jax.default_backend()}}
        for split in ("validation", "test"):
            if split in trainer.splits:
                results[split] = trainer.evaluate(split, params)
        record = cfg.to_dict()
        record["task_options"] = dataclasses.asdict(trainer.task.options)
        (run_dir / "config.json").write_text(json.dumps(record, indent=2, default=str))
        (run_dir / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in log))
        (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
        out.append(results)
    return out


def _log_records(losses, grad_norms, lrs, every: int) -> list[dict]:
    """The trainer's log lines: means over each window of ``every`` steps (and the last, shorter one)."""
    every, total, records = max(every, 1), len(losses), []
    for end in sorted(set(list(range(every, total + 1, every)) + [total])):
        start = ((end - 1) // every) * every
        records.append({"step": end, "train/loss": float(np.mean(losses[start:end])),
                        "train/grad_norm": float(np.mean(grad_norms[start:end])),
                        "train/learning_rate": float(lrs[end - 1])})
    return records
