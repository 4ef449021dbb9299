"""Device memory: sizes as users write them (``16GiB``), what a device has, and what a compiled step
needs of it (XLA's ``memory_analysis``). Shared by ``ftjax plan`` and the trainer's evaluation batch
search (``training.auto_eval_batch_size``). Imports nothing heavy: the config validates sizes with it."""

from __future__ import annotations

import re
from typing import Callable, Optional

from ftjax.errors import FtjaxError

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_bytes(text: str, what: str = "--device-memory") -> int:
    """``16GiB`` / ``16G`` (binary), ``16GB`` (decimal), ``512MiB``, ``1e9`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not match or match.group(2) not in _UNITS:
        raise FtjaxError(f"{what}: cannot read {text!r} as a size (e.g. 16GiB, 80GB, 512MiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def human(n: float) -> str:
    """Bytes as a short binary-unit string."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def step_peak_bytes(memory) -> int:
    """Per-device bytes a compiled step holds while it runs: its arguments, its outputs that do not
    reuse (alias) an argument's buffer, and its temporaries (``compiled.memory_analysis()``)."""
    return int(memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
               + memory.temp_size_in_bytes)


def device_memory(setting: Optional[str]) -> Optional[int]:
    """Bytes of one local device: ``setting`` (``training.device_memory``) when given, else what the
    device reports (``memory_stats()['bytes_limit']``: GPU and TPU), else None (CPU reports none)."""
    if setting:
        return parse_bytes(setting, "training.device_memory")
    import jax
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def largest_fitting(fits: Callable[[int], bool], start: int, cap: int) -> int:
    """The largest of ``start, 2 * start, 4 * start, ... <= cap`` for which ``fits`` holds, trying
    them in that order and stopping at the first that does not (memory grows with the batch);
    ``start`` itself is never tested: it is the configured size."""
    size = start
    while size * 2 <= cap and fits(size * 2):
        size *= 2
    return size
