"""``ftjax plan``: will a run fit on its devices? Memory and FLOPs of one train step, from shapes only.

Builds what ``ftjax train`` would build, without weights: the model from its config
(``_do_init=False``, no checkpoint read), the train state as ``jax.eval_shape`` shapes with the
partition rules' shardings, and one global batch padded to the largest bucket (its fields from a few
prepared training rows) as ``ShapeDtypeStruct``s. The train step (the trainer's own loss, gradient
checkpointing included) is then lowered and compiled ahead of time for the configured mesh, and
XLA's own accounting is read: ``memory_analysis`` (per-device arguments, outputs, temporaries) and
``cost_analysis`` (FLOPs of one device's program).

No checkpoint is read, except for BERT2BERT (``FlaxEncoderDecoderModel`` cannot be built without
weights in transformers 4.57: see ``ftjax.models.BUILT_WHOLE``). The numbers are those of the local
backend. The step is compiled as the trainer compiles it (``remat.step_compiler_options``: on CPU,
a checkpointed step keeps its recomputation, the saving a GPU or TPU gets); fusion and layouts
still differ between backends, so plan on the accelerator kind you will train on when the margin is
thin.
"""

from __future__ import annotations

from typing import Any, Optional

import datasets
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ftjax import models, remat
from ftjax import sharding as S
from ftjax.config import Config
from ftjax.data.batching import Batcher
from ftjax.data.loading import load_splits, subsample
from ftjax.errors import FtjaxError
from ftjax.memory import human, step_peak_bytes
from ftjax.optim import make_optimizer
from ftjax.step import TrainState, make_train_step
from ftjax.tasks import Task, get_task

def example_batch(config: Config, task: Task, tokenizer, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """One global train batch at the largest bucket, as sharded ``ShapeDtypeStruct``s: its fields and
    dtypes come from a batch's worth of training rows prepared by the task (``check`` reads the label
    set from the whole train split, as in training)."""
    d, args = config.data, config.training
    accum = args.gradient_accumulation_steps
    rows = args.per_device_train_batch_size * accum * S.data_parallel_size(mesh)
    raw = load_splits(d)
    if "train" not in raw:
        raise FtjaxError("no train split")
    task.check(raw)
    examples = rows
    while True:  # LM tasks pack documents into blocks: a few short documents may not fill `rows` blocks
        try:
            prepared = task.prepare(datasets.DatasetDict({"train": subsample(raw["train"], examples, args.seed)}),
                                    tokenizer)
        except FtjaxError:
            if examples >= len(raw["train"]):
                raise
            prepared = None
        if prepared is not None and (len(prepared["train"].rows) >= rows or examples >= len(raw["train"])):
            break
        examples *= 4
    batcher = Batcher(prepared["train"].rows, rows, task.max_length, d.bucket_lengths,
                      pad_id=tokenizer.pad_token_id or 0, groups=task.length_groups())
    batch = task.host_transform(batcher.largest_batch(rows), 0, True)
    if accum > 1:
        batch = {k: v.reshape(accum, -1, *v.shape[1:]) for k, v in batch.items()}
    sharding = S.batch_sharding(mesh, 1 if accum > 1 else 0)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in batch.items()}


def largest_arrays(tree, shardings, n: int = 5) -> list[dict]:
    """The ``n`` leaves that take most memory per device, with their path, shape and spec."""
    rows = []
    for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(shardings)):
        per_device = int(np.prod(sharding.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
        rows.append({"name": S.path_str(path), "shape": list(leaf.shape), "dtype": str(leaf.dtype),
                     "spec": str(sharding.spec), "bytes_per_device": per_device})
    return sorted(rows, key=lambda r: -r["bytes_per_device"])[:n]


def plan(config: Config, device_memory: Optional[int] = None) -> dict[str, Any]:
    """The plan of ``config``'s train step on the configured mesh (see the module docstring).

    Returns a dict of counts and per-device bytes; ``fits`` is None without ``device_memory``.
    """
    from ftjax.trainer import Trainer  # the trainer's own loss function

    args, m = config.training, config.mesh
    task = get_task(config)
    mesh = S.make_mesh(m)
    tokenizer = task.adapt_tokenizer(models.load_tokenizer(config.model))
    batch = example_batch(config, task, tokenizer, mesh)
    model, _ = task.load_model(config.model, args.bf16, tokenizer, seed=args.seed, read_weights=False,
                               **task.model_kwargs())
    shard = lambda tree: S.tree_shardings(tree, mesh, m.fsdp_min_size, m.rules or None)  # noqa: E731
    tx, _ = make_optimizer(args, args.max_steps if args.max_steps > 0 else 1000)
    params = models.abstract_params(model)
    state = jax.eval_shape(lambda p: TrainState.create(p, tx, jax.random.PRNGKey(args.seed)), params)
    replicated = NamedSharding(mesh, P())
    shardings = TrainState(step=replicated, params=shard(params), opt_state=shard(state.opt_state), rng=replicated)
    accum = args.gradient_accumulation_steps
    step = jax.jit(make_train_step(Trainer.loss_fn(task, model, args), tx, accum),
                   in_shardings=(shardings, S.batch_sharding(mesh, 1 if accum > 1 else 0)),
                   out_shardings=(shardings, replicated), donate_argnums=0)
    options = remat.step_compiler_options(args.gradient_checkpointing)
    compiled = step.lower(state, batch).compile(compiler_options=options)
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    peak = step_peak_bytes(memory)
    n_devices = int(np.prod(list(mesh.shape.values())))
    flops = float(cost.get("flops", 0.0))
    out = {
        "model": type(model).__name__, "mesh": dict(mesh.shape), "devices": n_devices,
        "backend": jax.default_backend(),
        "parameters": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
        "param_bytes": int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))),
        "param_bytes_per_device": S.bytes_per_device(params, shardings.params),
        "opt_bytes": int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.opt_state))),
        "opt_bytes_per_device": S.bytes_per_device(state.opt_state, shardings.opt_state),
        "batch": {k: list(v.shape) for k, v in batch.items()},
        "batch_bytes_per_device": S.bytes_per_device(batch, {k: v.sharding for k, v in batch.items()}),
        "argument_bytes_per_device": int(memory.argument_size_in_bytes),
        "temp_bytes_per_device": int(memory.temp_size_in_bytes),
        "peak_bytes_per_device": int(peak),
        "flops_per_device": flops, "flops_per_step": flops * n_devices,
        "compute_dtype": np.dtype(model.dtype).name,
        "gradient_checkpointing": args.gradient_checkpointing, "remat_policy": args.remat_policy,
        "largest_arrays": largest_arrays(params, shardings.params),
        "device_memory": device_memory,
        "fits": None if device_memory is None else bool(peak <= device_memory),
    }
    return out


def table(p: dict) -> str:
    """The plan as a readable table."""
    mesh = " ".join(f"{k}={v}" for k, v in p["mesh"].items())
    remat_note = (f", gradient checkpointing ({p['remat_policy'] or 'nothing saved'})"
                  if p["gradient_checkpointing"] else "")
    lines = [f"{p['model']}: {p['parameters'] / 1e6:.1f}M parameters, mesh {mesh} "
             f"({p['devices']} {p['backend']} devices), {p.get('compute_dtype', 'float32')} compute{remat_note}",
             f"{'':28}{'total':>12}{'per device':>14}"]

    def row(name, total, per_device):
        lines.append(f"{name:28}{total:>12}{per_device:>14}")

    row("parameters", human(p["param_bytes"]), human(p["param_bytes_per_device"]))
    row("optimizer state", human(p["opt_bytes"]), human(p["opt_bytes_per_device"]))
    shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in list(p["batch"].items())[:2])
    row("batch", "", human(p["batch_bytes_per_device"]))
    row("temporaries (XLA)", "", human(p["temp_bytes_per_device"]))
    row("peak estimate", "", human(p["peak_bytes_per_device"]))
    if p["device_memory"]:
        row("device memory", "", human(p["device_memory"]))
    row("FLOPs per step", f"{p['flops_per_step']:.3g}", f"{p['flops_per_device']:.3g}")
    lines.append(f"batch: {shapes}{', ...' if len(p['batch']) > 2 else ''} "
                 "(largest bucket; peak = arguments + outputs not donated + temporaries)")
    lines.append("largest arrays (parameters; the optimizer state mirrors them):")
    for a in p["largest_arrays"]:
        lines.append(f"  {a['name']}  {'x'.join(map(str, a['shape']))} {a['dtype']} {a['spec']}  "
                     f"{human(a['bytes_per_device'])} per device")
    return "\n".join(lines)


def check_fits(p: dict) -> None:
    """One FtjaxError line when the step does not fit ``device_memory``."""
    if p["fits"] is False:
        raise FtjaxError(f"does not fit: the train step needs about {human(p['peak_bytes_per_device'])} per "
                         f"device (parameters {human(p['param_bytes_per_device'])}, optimizer "
                         f"{human(p['opt_bytes_per_device'])}, temporaries {human(p['temp_bytes_per_device'])}) "
                         f"and --device-memory is {human(p['device_memory'])}; try a larger mesh.fsdp"
                         f"{'' if p['gradient_checkpointing'] else ', training.gradient_checkpointing=true'}"
                         " or a smaller training.per_device_train_batch_size")
