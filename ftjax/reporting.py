"""Run logs: console, a JSONL file, TensorBoard event files and a loss-curve PNG (process 0 only)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax


def tensorboard_writer_class():
    """tensorboardX's ``SummaryWriter``, imported without PyTorch. tensorboardX imports torch at
    module import when it is installed (the ``bench`` extra installs it), only to accept torch
    tensors; ftjax logs Python floats. Hiding torch for that one import keeps ~180 MB of RSS and
    seconds of start-up out of the training process, which otherwise never imports torch
    (``ftjax.runtime.transformers_without_torch``). Where torch is already imported, nothing is hidden."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class RunLogger:
    def __init__(self, output_dir: Path, report_to: list[str]):
        self.main = jax.process_index() == 0
        self.history: list[dict] = []
        self.jsonl = self.tb = None
        if not self.main:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        if "jsonl" in report_to:
            path = output_dir / "log.jsonl"  # a resumed run's history starts with the steps before it
            self.history = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
            self.jsonl = open(path, "a")
        if "tensorboard" in report_to:
            self.tb = tensorboard_writer_class()(str(output_dir / "tensorboard"))

    def log(self, step: int, values: dict, prefix: str = "") -> None:
        scalars = {f"{prefix}{k}": v for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        record = {"step": step, **scalars}
        self.history.append(record)
        if not self.main:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k, v in scalars.items():
                if math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def plot(self, path: Path) -> None:
        """Training and evaluation loss against step."""
        if not self.main:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in (("train/loss", "train"), ("eval/loss", "validation")):
            pts = [(r["step"], r[key]) for r in self.history if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o" if key.startswith("eval") else None, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()


def truncate_log(path: Path, step: int) -> None:
    """Drops the records after ``step`` from a JSONL log: a run resumed from ``step`` logs the
    steps after it again, and the log must not hold them twice."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] > step:
                continue
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill
            continue
        kept.append(line if line.endswith("\n") else line + "\n")
    path.write_text("".join(kept))
