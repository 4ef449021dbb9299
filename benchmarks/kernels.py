"""XLA:CPU vs PyTorch on the same shapes, and what XLA:CPU flags and thread settings change.

The shapes are MiniLM-L6's at the classification benchmark's batch (32 rows x 64 tokens, hidden
384, 12 heads, FFN 1536): the FFN matmul, the FFN's first Dense layer on ``[batch, tokens, hidden]``
forward + backward, attention (softmax(QK^T)V) forward + backward, one whole BERT layer forward +
backward, and one GPT-2 block (the same widths; its projections are ``FlaxConv1D``) forward +
backward; then the FFN matmul and the BERT layer in bfloat16 (jax: bf16 operands, and the Flax
layer's ``dtype``; PyTorch: bf16 operands, and ``torch.autocast``), where this CPU's AMX units can
serve the matmuls. The ``flat_dense`` setting runs the jax Dense layers on ``[rows, features]``
(``ftjax.flat_dense``, what the trainer does on CPU). Each (framework, setting) runs in its own process; jax sides
are jitted (compile excluded), PyTorch eager. Times are medians of ``--iters`` calls after warm-up,
and the settings alternate ``--repeats`` times. Prints a table and writes
benchmarks/results/kernels.json.

    .venv/bin/python benchmarks/kernels.py
    .venv/bin/python benchmarks/kernels.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, machine, save, spread, table, timed  # noqa: E402

B, T, H, NH, FF = 32, 64, 384, 12, 1536

# name -> (framework, environment): the XLA_FLAGS that exist in jax 0.10.2 (an unknown flag aborts
# the process, so each of these was accepted) and the thread settings of both sides.
SETTINGS = {
    "jax default": ("jax", {}),
    "jax memory-optimized scheduler (ftjax CLI)": (
        "jax", {"XLA_FLAGS": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}),
    "jax flat_dense + memory-optimized scheduler (ftjax train step on CPU)": (
        "jax", {"XLA_FLAGS": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED", "FTJAX_FLAT_DENSE": "1"}),
    "jax --xla_cpu_multi_thread_eigen=false": ("jax", {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}),
    "jax --xla_cpu_use_thunk_runtime=false": ("jax", {"XLA_FLAGS": "--xla_cpu_use_thunk_runtime=false"}),
    "jax --xla_cpu_enable_fast_math=true": ("jax", {"XLA_FLAGS": "--xla_cpu_enable_fast_math=true"}),
    "jax 1 core (taskset)": ("jax", {"TASKSET": "0"}),
    "torch default (2 threads)": ("torch", {}),
    "torch 1 thread (OMP/MKL_NUM_THREADS=1)": ("torch", {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}),
}


def child_jax(iters: int) -> dict:
    import contextlib

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from transformers import BertConfig, GPT2Config
    from transformers.models.bert.modeling_flax_bert import FlaxBertLayer
    from transformers.models.gpt2.modeling_flax_gpt2 import FlaxGPT2Block

    from ftjax.flat_dense import flat_dense
    context = flat_dense if os.environ.get("FTJAX_FLAT_DENSE") else contextlib.nullcontext
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    x, w = jax.random.normal(k[0], (B * T, H)), jax.random.normal(k[1], (H, FF))
    q, kk, v = (jax.random.normal(k[2 + i % 2], (B, NH, T, H // NH)) for i in range(3))
    matmul = jax.jit(lambda x, w: x @ w)
    x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)

    def attention(q, k, v):
        p = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) / 8.0, axis=-1)
        return jnp.einsum("bhqk,bhkd->bhqd", p, v).sum()
    attn = jax.jit(jax.grad(attention, argnums=(0, 1, 2)))
    bert_config = BertConfig(hidden_size=H, num_attention_heads=NH, intermediate_size=FF)
    layer, layer16 = FlaxBertLayer(bert_config), FlaxBertLayer(bert_config, dtype=jnp.bfloat16)
    h, mask = jax.random.normal(k[0], (B, T, H)), jnp.ones((B, T))  # the layer broadcasts it itself
    gpt2 = FlaxGPT2Block(GPT2Config(n_embd=H, n_head=NH, n_inner=FF, n_positions=T))
    dense = nn.Dense(FF)
    params, gpt2_params, dense_params = layer.init(k[1], h, mask, None), gpt2.init(k[1], h, mask), dense.init(k[1], h)

    def fwd_bwd(forward):
        """The jitted gradient, parameters and input, of ``forward(params, h).sum()``."""
        def loss(p, h):
            with context():
                return forward(p, h).sum()
        return jax.jit(jax.grad(loss, argnums=(0, 1)))
    grad = fwd_bwd(lambda p, h: layer.apply(p, h, mask, None, deterministic=True)[0])
    grad16 = fwd_bwd(lambda p, h: layer16.apply(p, h, mask, None, deterministic=True)[0].astype(jnp.float32))
    gpt2_grad = fwd_bwd(lambda p, h: gpt2.apply(p, h, mask, deterministic=True)[0])
    dense_grad = fwd_bwd(lambda p, h: jax.nn.gelu(dense.apply(p, h)))
    block = jax.block_until_ready
    return {"matmul_ms": 1e3 * timed(lambda: block(matmul(x, w)), iters),
            "dense_fwd_bwd_ms": 1e3 * timed(lambda: block(dense_grad(dense_params, h)), iters),
            "attention_fwd_bwd_ms": 1e3 * timed(lambda: block(attn(q, kk, v)), iters),
            "bert_layer_fwd_bwd_ms": 1e3 * timed(lambda: block(grad(params, h)), iters),
            "gpt2_block_fwd_bwd_ms": 1e3 * timed(lambda: block(gpt2_grad(gpt2_params, h)), iters),
            "bf16_matmul_ms": 1e3 * timed(lambda: block(matmul(x16, w16)), iters),
            "bert_layer_bf16_fwd_bwd_ms": 1e3 * timed(lambda: block(grad16(params, h)), iters)}


def child_torch(iters: int) -> dict:
    import torch
    from transformers import BertConfig, GPT2Config
    from transformers.models.bert.modeling_bert import BertLayer
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    torch.manual_seed(0)
    x, w = torch.randn(B * T, H), torch.randn(H, FF)
    x16, w16 = x.bfloat16(), w.bfloat16()
    q, k, v = (torch.randn(B, NH, T, H // NH, requires_grad=True) for _ in range(3))

    def attn():
        p = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1)
        (p @ v).sum().backward()
    layer = BertLayer(BertConfig(hidden_size=H, num_attention_heads=NH, intermediate_size=FF,
                                 attn_implementation="eager")).eval()
    h, mask = torch.randn(B, T, H, requires_grad=True), torch.zeros(B, 1, 1, T)
    gpt2 = GPT2Block(GPT2Config(n_embd=H, n_head=NH, n_inner=FF, n_positions=T, attn_implementation="eager")).eval()
    dense = torch.nn.Linear(H, FF)

    def fwd_bwd(module, forward):
        """One forward + backward of ``forward().sum()``, gradients of ``module`` and ``h`` cleared first."""
        def step():
            module.zero_grad(set_to_none=True)
            h.grad = None
            forward().sum().backward()
        return step
    dense_step = fwd_bwd(dense, lambda: torch.nn.functional.gelu(dense(h)))
    layer_step = fwd_bwd(layer, lambda: layer(h, attention_mask=mask)[0])

    def layer_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(h, attention_mask=mask)[0].float()
    layer16_step = fwd_bwd(layer, layer_bf16)
    gpt2_step = fwd_bwd(gpt2, lambda: gpt2(h)[0])
    with torch.no_grad():
        matmul_ms = 1e3 * timed(lambda: x @ w, iters)
        bf16_matmul_ms = 1e3 * timed(lambda: x16 @ w16, iters)
    return {"matmul_ms": matmul_ms, "dense_fwd_bwd_ms": 1e3 * timed(dense_step, iters),
            "attention_fwd_bwd_ms": 1e3 * timed(attn, iters),
            "bert_layer_fwd_bwd_ms": 1e3 * timed(layer_step, iters),
            "gpt2_block_fwd_bwd_ms": 1e3 * timed(gpt2_step, iters), "bf16_matmul_ms": bf16_matmul_ms,
            "bert_layer_bf16_fwd_bwd_ms": 1e3 * timed(layer16_step, iters), "torch_threads": torch.get_num_threads()}


def run_setting(name: str, iters: int) -> dict:
    framework, env = SETTINGS[name]
    env = dict(env)
    prefix = ["taskset", "-c", env.pop("TASKSET")] if "TASKSET" in env else []
    flavour = {"USE_TORCH": "1", "USE_FLAX": "0", "USE_JAX": "0"} if framework == "torch" else {"USE_TORCH": "0"}
    proc = subprocess.run([*prefix, sys.executable, __file__, "--child", framework, "--iters", str(iters)],
                          capture_output=True, text=True, env={**os.environ, **flavour, **env})
    if proc.returncode:
        raise SystemExit(f"{name} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", choices=["jax", "torch"])
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), metavar="SETTING",
                   help="run only these settings (default: all of them)")
    p.add_argument("--out", default="kernels", help="benchmarks/results/OUT.json")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child_jax(args.iters) if args.child == "jax" else child_torch(args.iters)))
        return
    if args.quick:
        args.iters, args.repeats = 3, 1
    runs = alternate({name: (lambda i, name=name: run_setting(name, args.iters)) for name in args.settings or SETTINGS},
                     args.repeats)
    keys = ["matmul_ms", "dense_fwd_bwd_ms", "attention_fwd_bwd_ms", "bert_layer_fwd_bwd_ms", "gpt2_block_fwd_bwd_ms",
            "bf16_matmul_ms", "bert_layer_bf16_fwd_bwd_ms"]
    rows = []
    for name, rs in runs.items():
        row = {"setting": name}
        for key in keys:
            s = spread([r.get(key, float("nan")) for r in rs])
            row[key] = f"{s['median']:.3g} [{s['min']:.3g}-{s['max']:.3g}]" if s["n"] > 1 else f"{s['median']:.3g}"
        row["load (1 min)"] = f"{statistics.median(r['loadavg_1min'] for r in rs):.1f}"
        rows.append(row)
    print(table(rows, ["setting", *keys, "load (1 min)"]))
    out = save(args.out, {"shapes": {"batch": B, "tokens": T, "hidden": H, "heads": NH, "ffn": FF},
                           "args": vars(args), "machine": machine(), "runs": runs, "table": rows,
                           "command": "python benchmarks/kernels.py " + " ".join(sys.argv[1:])})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
