"""Named points where a test can kill the process (``FTJAX_FAULT=<point>:<n>``: SIGKILL the n-th
time the point is reached). Unset, ``reached`` is a dictionary lookup and nothing else.

Points: ``train_step`` (after a step, before its hooks), ``save`` (a checkpoint write in flight),
``delete`` (half way through deleting an old checkpoint), ``evaluate`` (evaluation outputs computed,
metrics not yet tracked). Used by tests/test_kill.py to prove that re-running a killed command
ends with the parameters of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Optional

_counts: dict[str, int] = {}


def _target() -> Optional[tuple[str, int]]:
    spec = os.environ.get("FTJAX_FAULT")
    if not spec:
        return None
    name, _, n = spec.partition(":")
    return name, int(n or 1)


def reached(point: str, path: Optional[Path] = None) -> None:
    """Kills this process (SIGKILL, no cleanup) when ``FTJAX_FAULT`` names this point and count.
    ``path``: a folder being deleted; half its files go first, as a kill during ``rmtree`` would."""
    target = _target()
    if target is None or target[0] != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] != target[1]:
        return
    if path is not None:
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        for p in files[: (len(files) + 1) // 2]:
            p.unlink()
    os.kill(os.getpid(), signal.SIGKILL)


def install_orbax_delete_point() -> None:
    """Routes Orbax's deletion of old checkpoints through the ``delete`` point (only when a fault
    is asked for)."""
    target = _target()
    if target is None or target[0] != "delete":
        return
    from orbax.checkpoint._src.path import deleter
    original = deleter.StandardCheckpointDeleter._delete_step_permanently

    def delete(self, step, delete_target):
        reached("delete", Path(str(delete_target)))
        return original(self, step, delete_target)

    deleter.StandardCheckpointDeleter._delete_step_permanently = delete
