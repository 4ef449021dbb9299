"""The run folder (``training.output_dir``): checked before any work, locked while a run writes
into it, cleared on ``overwrite_output_dir``.

A run writes ``config.json``, ``log.jsonl``, ``tensorboard/``, ``checkpoints/``, evaluation reports,
``results.json``, ``export/`` and ``loss.png``; ``ftjax predict`` adds ``predictions.jsonl``. Only
those names are removed on overwrite, so an output_dir pointed at a folder of one's own files never
loses them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Optional

from ftjax.errors import FtjaxError

log = logging.getLogger("ftjax")

LOCK_NAME = ".ftjax.lock"
RUN_FILES = ("config.json", "log.jsonl", "results.json", "loss.png", "predictions.jsonl")
RUN_FOLDERS = ("checkpoints", "export", "tensorboard")
REPORT_GLOBS = ("error_analysis_*.txt",)
# What a run leaves before its first checkpoint: a folder holding only these restarts fresh.
EARLY_FILES = {"config.json", "log.jsonl", "tensorboard", "checkpoints", LOCK_NAME}


def check_writable(output_dir: str | Path) -> Path:
    """``output_dir`` as an absolute path, or one clear error when it is a file, lies under a file,
    or cannot be created or written (checked before any data or model work)."""
    out = Path(output_dir).absolute()
    existing, mode = out, _mode(out)
    while mode is None:
        existing = existing.parent
        mode = _mode(existing)
    if existing == out and not stat.S_ISDIR(mode):
        raise FtjaxError(f"output_dir {out} is a file, not a folder: choose another training.output_dir")
    if not stat.S_ISDIR(mode):
        raise FtjaxError(f"output_dir {out} lies under {existing}, which is a file: choose another "
                         "training.output_dir")
    for attempt in range(10):
        try:
            _probe(out)
            break
        except OSError as e:  # FileNotFoundError may be another process of the run removing its own probe
            if isinstance(e, FileNotFoundError) and attempt < 9:
                continue
            raise FtjaxError(f"output_dir {out} cannot be created or written to ({e.strerror}): choose another "
                             "training.output_dir") from None
    return out


def _mode(path: Path) -> Optional[int]:
    """``path``'s file mode from one ``stat``, or None where it does not exist. One call, not
    ``exists()`` then ``is_dir()``: another process of the run may make and remove the folder
    between two calls (its own write probe), which read as "a file"."""
    try:
        return path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None


def _probe(out: Path) -> None:
    """A real write, not os.access (which says yes to root on a read-only file system). Folders
    that did not exist are made and removed again: a run that then fails on its inputs wrote nothing."""
    if out.is_dir():
        tempfile.TemporaryFile(dir=out).close()
        return
    existing = out
    while not existing.exists():
        existing = existing.parent
    out.mkdir(parents=True, exist_ok=True)  # exist_ok: other processes of the run probe it too
    while out != existing:
        with contextlib.suppress(OSError):  # gone, or in use: another process got there first
            out.rmdir()
        out = out.parent


def previous_run_files(output_dir: Path) -> list[Path]:
    """The entries of ``output_dir`` an earlier ftjax run wrote."""
    if not output_dir.is_dir():
        return []
    found = [output_dir / n for n in (*RUN_FILES, *RUN_FOLDERS) if (output_dir / n).exists()]
    for pattern in REPORT_GLOBS:
        found += sorted(output_dir.glob(pattern))
    return found


def clear_previous_run(output_dir: Path) -> list[str]:
    """Removes everything an earlier run wrote (not the lock, not foreign files); returns the names."""
    removed = []
    for path in previous_run_files(output_dir):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path.name)
    return removed


def only_early_files(output_dir: Path) -> bool:
    """True when ``output_dir`` holds nothing but what a run writes before its first checkpoint (a
    run stopped that early has nothing to resume and may start over)."""
    return all(p.name in EARLY_FILES for p in output_dir.iterdir()) if output_dir.is_dir() else True


class RunLock:
    """``OUTPUT_DIR/.ftjax.lock`` holding the pid and host of the run writing there. A second run
    into the same folder fails with one line naming the holder; a lock left by a dead process on
    this host (kill -9, OOM) is taken over with a warning. Locks from other hosts are never guessed
    dead: remove the file by hand when that host's run is gone."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = self._create()
            except FileExistsError:
                holder = self._holder()
                dead = (holder.get("host") == me["host"] and not _alive(holder.get("pid")) if holder is not None
                        else _age(self.path) > 10)  # unreadable: its writer died between create and write
                if dead:
                    log.warning("output_dir %s: taking over the lock of %s, which is gone", self.path.parent,
                                f"process {holder.get('pid')} on {holder.get('host')}" if holder else "a run")
                    self.path.unlink(missing_ok=True)
                    continue
                who = f"process {holder.get('pid')} on {holder.get('host')}" if holder else "an unreadable lock"
                raise FtjaxError(f"output_dir {self.path.parent} is in use by {who} (lock {self.path}); "
                                 "wait for that run, or choose another training.output_dir")
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise FtjaxError(f"output_dir {self.path.parent}: could not take the lock {self.path}")

    def _create(self) -> int:
        """The lock file, opened exclusively. Its folder is made again when it vanished: while it is
        empty, the other processes of the run may remove it (``check_writable`` leaves no trace);
        once the lock is in it, it stays."""
        for _ in range(100):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                return os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileNotFoundError:
                continue
        raise FtjaxError(f"output_dir {self.path.parent} keeps vanishing: could not take the lock {self.path}")

    def _holder(self) -> Optional[dict]:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True
