"""How much to mask? The same small BERT trained from scratch with 5%, 15% and 30% MLM masking on
the same corpus, steps and seed; every model is then scored on the same held-out masks (15%,
whole words) so the numbers compare.

    python scripts/mlm_mask_study.py                      # Lee corpus, a few minutes on 2 CPU cores
    python scripts/mlm_mask_study.py --steps 2000 --hidden 256 --layers 4

Writes OUT/mlm_mask_study.png (training-loss curves), .md (table) and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
LEE = "pkg://gensim/test/test_data/lee_background.cor"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default=LEE)
    p.add_argument("--probabilities", type=float, nargs="+", default=[0.05, 0.15, 0.30])
    p.add_argument("--eval-probability", type=float, default=0.15)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    return p.parse_args(argv)


def train_tokenizer_on_train_split(corpus: str, vocab_size: int, folder: Path) -> str:
    """WordPiece on the training documents only (ASSETS split rule), so held-out words stay unseen."""
    from ftjax.data.loading import load_file, split_mod10
    from ftjax.tokenizer_training import train_tokenizer
    train_txt = folder / "train.txt"
    train_txt.write_text("\n".join(split_mod10(load_file(corpus))["train"]["text"]))
    train_tokenizer([str(train_txt)], str(folder / "tokenizer"), "wordpiece", vocab_size)
    return str(folder / "tokenizer")


def run(args) -> dict:
    from ftjax.config import load_config
    from ftjax.trainer import Trainer
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    with tempfile.TemporaryDirectory(prefix="mask_study_") as tmp:
        tok = train_tokenizer_on_train_split(args.corpus, args.vocab_size, Path(tmp))
        for p in args.probabilities:
            run_dir = Path(tmp) / f"p{p}"
            overrides = [
                "task=mlm", "model.name_or_path=bert", "model.from_scratch=true", f"model.tokenizer_name_or_path={tok}",
                f"model.config_overrides={{hidden_size: {args.hidden}, num_hidden_layers: {args.layers}, "
                f"num_attention_heads: {max(args.hidden // 64, 1)}, intermediate_size: {4 * args.hidden}, "
                f"max_position_embeddings: {max(args.block_size, 128)}}}",
                f"data.train_file={args.corpus}", "data.split_rule=mod10", f"task_options.block_size={args.block_size}",
                f"data.bucket_lengths=[{args.block_size}]", f"task_options.mlm_probability={p}", "task_options.whole_word_masking=true",
                f"training.output_dir={run_dir}", f"training.max_steps={args.steps}",
                f"training.per_device_train_batch_size={args.batch_size}", "training.per_device_eval_batch_size=64",
                f"training.learning_rate={args.learning_rate}", "training.warmup_ratio=0.05",
                "training.eval_strategy=no", "training.save_strategy=no", "training.logging_steps=10",
                "training.report_to=[jsonl]", "training.disable_tqdm=true", "training.export_pytorch=false",
                "training.seed=0", "mesh.data=1"]
            trainer = Trainer(load_config(None, overrides))
            result = trainer.train()
            trainer.config.task_options.mlm_probability = args.eval_probability  # the same held-out masks for all
            held_out = trainer.evaluate("test")
            log = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
            curves[p] = [(r["step"], r["train/loss"]) for r in log if "train/loss" in r]
            rows.append({"mlm_probability": p, "train_loss": result["train"]["train_loss"],
                         "eval_mlm_loss": held_out["loss"], "eval_perplexity": held_out["perplexity"],
                         "eval_top1_accuracy": held_out["accuracy"], "eval_masked_tokens": held_out["predicted_tokens"],
                         "train_seconds": result["train"]["train_runtime_s"]})
            print(json.dumps(rows[-1]), file=sys.stderr)
    setup = {k: getattr(args, k) for k in ("corpus", "steps", "batch_size", "block_size", "hidden", "layers",
                                           "vocab_size", "learning_rate", "eval_probability")}
    (out_dir / "mlm_mask_study.json").write_text(json.dumps({"setup": setup, "results": rows}, indent=2))
    write_table(rows, setup, out_dir / "mlm_mask_study.md")
    plot(curves, out_dir / "mlm_mask_study.png", setup)
    return {"setup": setup, "results": rows}


def write_table(rows: list[dict], setup: dict, path: Path) -> None:
    lines = [f"MLM mask-probability study: BERT {setup['layers']}x{setup['hidden']} from scratch, "
             f"{setup['steps']} steps x {setup['batch_size']} blocks of {setup['block_size']} tokens, "
             f"WordPiece {setup['vocab_size']}, whole-word masking; held-out (test split) scored with "
             f"{setup['eval_probability']:.0%} whole-word masks for every model.", "",
             "| mlm_probability | final train loss | held-out MLM loss | held-out perplexity | top-1 accuracy on masked words |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mlm_probability']:.2f} | {r['train_loss']:.3f} | {r['eval_mlm_loss']:.3f} | "
                     f"{r['eval_perplexity']:.1f} | {r['eval_top1_accuracy']:.3f} |")
    path.write_text("\n".join(lines) + "\n")


def plot(curves: dict, path: Path, setup: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for p, points in curves.items():
        steps, losses = zip(*points)
        ax.plot(steps, losses, label=f"{p:.0%} masked")
    ax.set_xlabel("step")
    ax.set_ylabel("training MLM loss (on its own masks)")
    ax.set_title(f"BERT {setup['layers']}x{setup['hidden']} from scratch, Lee corpus")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    print(json.dumps(run(parse_args())))
