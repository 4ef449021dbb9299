"""``ftjax train|eval|predict|plan CONFIG.yaml [key=value ...]``: a thin layer over ``ftjax.trainer``
(and ``ftjax.plan``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ftjax.errors import FtjaxError


def _summary(results: dict) -> dict:
    """One flat line of final metrics (matrices left to results.json)."""
    flat = {}
    for section, values in results.items():
        if not isinstance(values, dict):
            flat[section] = values
            continue
        for k, v in values.items():
            if isinstance(v, (int, float, str)) or v is None:
                flat[k if k.startswith(section + "_") else f"{section}_{k}"] = v
    return flat


HEADLINE = ("accuracy", "f1_macro", "f1", "exact_match", "rougeL", "perplexity", "loss")


def _headline(results: dict) -> str:
    """A readable line of the main metrics per split, e.g. ``validation: accuracy 0.744 f1_macro 0.727``."""
    parts = []
    for split in ("validation", "test"):
        values = results.get(split) or {}
        shown = [f"{k} {values[k]:.4f}" for k in HEADLINE if isinstance(values.get(k), (int, float))]
        if shown:
            parts.append(f"{split}: " + " ".join(shown))
    return " | ".join(parts)


def read_records(path: str, text_column: str | list[str]) -> list[dict]:
    """Inputs for predict, one record per input line / row (``ftjax.data.records``)."""
    from ftjax.data.records import read_records as read
    return read(path, [text_column] if isinstance(text_column, str) else list(text_column))


def cmd_train(cfg) -> dict:
    from ftjax.run_dir import check_writable
    from ftjax.trainer import Trainer
    check_writable(cfg.training.output_dir)  # before any data or model work
    return Trainer(cfg).train()


def cmd_plan(cfg, device_memory: str | None, json_path: str | None) -> dict:
    """Prints the plan's table; writes it as JSON when asked; fails (exit 2) when it does not fit."""
    from ftjax import plan
    from ftjax.memory import parse_bytes
    result = plan.plan(cfg, parse_bytes(device_memory) if device_memory else None)
    print(plan.table(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    plan.check_fits(result)
    return {"plan": {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool))}}


def cmd_sweep(args) -> dict:
    """``ftjax sweep``: ``ftjax.sweep.run_sweep``; prints the best configuration."""
    from ftjax import sweep
    grid = sweep.parse_grid(args.grid or [], args.seeds)
    summary = sweep.run_sweep(args.config, grid, args.overrides, args.output_dir, args.metric,
                              args.axes.split(",") if args.axes else None, args.vectorize)
    best = summary["best"] or {}
    print(f"best {summary['metric']}: {best.get('mean', float('nan')):.4f} +- {best.get('std', 0):.4f} "
          f"with {best.get('values')} ({summary['files']['heatmap']})", file=sys.stderr)
    return {"sweep": {"runs": len(summary["runs"]), "metric": summary["metric"], "best": json.dumps(best.get("values")),
                      "best_mean": best.get("mean"), "csv": summary["files"]["csv"]}}


def cmd_compare(args) -> dict:
    """``ftjax compare``: ``ftjax.compare.compare``; prints the table."""
    from ftjax import compare
    result = compare.compare(args.runs, args.metric.split(",") if args.metric else None,
                             args.by.split(",") if args.by else None, args.output, args.split)
    print(result["table"])
    return {"compare": {"runs": len(result["rows"]), "csv": result["files"]["csv"], "chart": result["files"]["chart"]}}


def _trained_model(cfg, model: str | None) -> str:
    """``--model``, else OUTPUT_DIR/export. The base model only for tasks whose pretrained head is
    the model (``Task.base_model_predicts``: fill-mask, generation); elsewhere its head is random."""
    from ftjax.tasks.base import task_class
    export = Path(cfg.training.output_dir) / "export"
    if model or export.is_dir():
        return model or str(export)
    if task_class(cfg.task).base_model_predicts:
        logging.getLogger("ftjax").info("no %s: using the base model %s", export, cfg.model.name_or_path)
        return cfg.model.name_or_path
    raise FtjaxError(f"no trained model: {export} does not exist; train first (ftjax train) or pass --model FOLDER")


def cmd_eval(cfg, model: str | None) -> dict:
    from ftjax.trainer import Trainer
    trainer = Trainer(cfg, model_path=_trained_model(cfg, model))
    return {split: trainer.evaluate(split) for split in ("validation", "test") if split in trainer.splits}


def cmd_predict(cfg, model: str | None, input_path: str, output_path: str | None) -> dict:
    from ftjax.tasks import get_task
    from ftjax.trainer import Trainer
    task = get_task(cfg)
    columns = task.input_columns
    column = columns[0]
    records = read_records(input_path, columns)
    trainer = Trainer(cfg, task=task, model_path=_trained_model(cfg, model), with_data=False)
    keep = [i for i, r in enumerate(records) if all(str(r.get(c) or "").strip() for c in columns)]
    limit = cfg.model.max_length
    # verbose=False: no "longer than the specified maximum" warning, these are truncated / windowed
    too_long = sum(len(trainer.tokenizer(str(records[i][column]), verbose=False)["input_ids"]) > limit for i in keep)
    preds = trainer.predict([records[i] for i in keep]) if keep else []
    rows = [{**r, "prediction": trainer.task.empty_prediction, "note": "empty input"} for r in records]
    for i, p in zip(keep, preds):
        rows[i] = {**records[i], "prediction": p}
    out = Path(output_path or Path(cfg.training.output_dir) / "predictions.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"predictions": len(preds), "empty_inputs": len(records) - len(keep),
            f"{task.long_inputs}_over_{limit}_tokens": too_long, "output": str(out)}


def train_script(default_config: str, argv: list[str] | None = None) -> int:
    """Entry point of ``scripts/run_*.py``: ``ftjax train`` with a default config when the first
    argument is an override (or there is none)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or "=" in argv[0]:
        argv = [default_config, *argv]
    return main(["train", *argv])


def _leave_now_on_failure(code: int, print_traceback: bool = False) -> None:
    """``distributed.leave_now_on_failure`` where the command got as far as importing it (the
    tokenizer and compare commands never start jax)."""
    if "ftjax.distributed" in sys.modules:
        sys.modules["ftjax.distributed"].leave_now_on_failure(code, print_traceback)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ftjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", "fine-tune or pre-train"), ("eval", "evaluate a trained model"),
                            ("predict", "predict on a file of texts")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", help="YAML config (see configs/)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.learning_rate=3e-5")
        if name != "train":
            p.add_argument("--model", help="model folder (default: OUTPUT_DIR/export)")
        if name == "predict":
            p.add_argument("--input", required=True, help=".txt (one text a line), .csv / .tsv, .jsonl or .json (array)")
            p.add_argument("--output", help="JSONL output (default: OUTPUT_DIR/predictions.jsonl)")
    plan = sub.add_parser("plan", help="memory and FLOPs of one train step, compiled from shapes (no weights read)")
    plan.add_argument("config", help="YAML config (see configs/)")
    plan.add_argument("overrides", nargs="*", help="dotted overrides, e.g. mesh.fsdp=8")
    plan.add_argument("--device-memory", help="e.g. 16GiB or 80GB: exit 2 when the step does not fit")
    plan.add_argument("--json", help="also write the plan to this JSON file")
    tok = sub.add_parser("train-tokenizer", help="train a WordPiece or byte-level BPE tokenizer on text files")
    tok.add_argument("files", nargs="+", help="text files (.txt / .cor one text a line, csv, jsonl, .xml.bz2)")
    tok.add_argument("--output", required=True, help="folder for the Hugging Face tokenizer files")
    tok.add_argument("--kind", choices=("wordpiece", "bpe"), default="wordpiece")
    tok.add_argument("--vocab-size", type=int, default=8000)
    tok.add_argument("--min-frequency", type=int, default=2)
    tok.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=None,
                     help="default: on for wordpiece, off for bpe")
    tok.add_argument("--text-column", default="text")
    sw = sub.add_parser("sweep", help="train every combination of a hyperparameter grid; table, heatmap, best")
    sw.add_argument("config", help="YAML config (see configs/)")
    sw.add_argument("overrides", nargs="*", help="dotted overrides for every run")
    sw.add_argument("--grid", nargs="+", metavar="KEY=[V1,V2]", help="e.g. training.learning_rate=[1e-5,3e-5]")
    sw.add_argument("--seeds", help="comma-separated training.seed values, e.g. 42,43")
    sw.add_argument("--metric", help="e.g. accuracy or test.f1_macro (default validation.<metric_for_best_model>)")
    sw.add_argument("--axes", help="two grid keys for the heatmap (default: the first two varied ones)")
    sw.add_argument("--output-dir", help="sweep folder (default: <training.output_dir>-sweep)")
    sw.add_argument("--vectorize", action="store_true", help="train all runs at once (shape-free grids only)")
    cmp = sub.add_parser("compare", help="table and bar chart of metrics across finished runs")
    cmp.add_argument("runs", nargs="+", help="run output folders (with results.json and config.json)")
    cmp.add_argument("--metric", help="comma-separated metrics (default: accuracy / precision / recall / F1)")
    cmp.add_argument("--by", help="comma-separated config keys that label the runs (default: those that differ)")
    cmp.add_argument("--split", help="validation or test (default: test when every run has it)")
    cmp.add_argument("--output", help="folder for compare.csv / compare.png (default: the current folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("ftjax").setLevel(logging.INFO)  # ftjax's own notes (packing, cache reuse) on stderr
    from ftjax.runtime import configure_process
    configure_process()
    try:
        if args.command == "train-tokenizer":
            from ftjax.tokenizer_training import train_tokenizer
            tokenizer = train_tokenizer(args.files, args.output, args.kind, args.vocab_size, args.min_frequency,
                                        args.lowercase, args.text_column)
            print(json.dumps({"output": args.output, "kind": args.kind, "vocab_size": len(tokenizer)}))
            return 0
        if args.command == "compare":
            result = cmd_compare(args)
            print(json.dumps(_summary(result)))
            return 0
        from ftjax import distributed
        from ftjax.config import load_config
        distributed.maybe_initialize()
        if args.command == "sweep":
            result = cmd_sweep(args)
            print(json.dumps(_summary(result)))
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "train":
            result = cmd_train(cfg)
        elif args.command == "plan":
            result = cmd_plan(cfg, args.device_memory, args.json)
        elif args.command == "eval":
            result = cmd_eval(cfg, args.model)
        else:
            result = cmd_predict(cfg, args.model, args.input, args.output)
    except FtjaxError as e:
        print(f"ftjax: error: {e}", file=sys.stderr)
        _leave_now_on_failure(2)
        return 2
    except Exception:
        _leave_now_on_failure(1, print_traceback=True)
        raise
    code = result.pop("exit_code", 0)  # training.preemption_exit_code after a SIGTERM save
    if _headline(result):
        print(_headline(result), file=sys.stderr)
    print(json.dumps(_summary(result)))
    return code


if __name__ == "__main__":
    sys.exit(main())
