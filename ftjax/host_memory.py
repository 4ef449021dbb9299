"""glibc malloc settings that let XLA:CPU reuse its step buffers instead of faulting them in anew.

XLA:CPU allocates a step's temporaries (hundreds of MB) with ``posix_memalign`` at every call and
frees them at its end. glibc serves a block that large from a worker thread's arena with ``mmap``
(a thread arena's heap cannot grow past 64 MB, so no setting keeps it off ``mmap``) and unmaps it
on ``free``: every step then faults the same memory in again, one 4 KiB page at a time. On the
demo's packed classification step (8 x 128 tokens, 363 MB of temporaries, 2 cores) that is 95,000
page faults and 137 ms of kernel time per 454 ms step.

* ``limit_arenas`` (at process start, before any thread allocates; ``runtime.configure_process``)
  leaves one arena, the main one, whose heap can hold blocks of any size. Alone it changes nothing
  measurable.
* ``keep_freed_memory`` (the trainer calls it after the first train step, once compilation's
  transient memory is free again; ``training.keep_host_memory``) trims the heap once, then turns
  ``mmap`` off and never trims again, so the next steps reuse the memory they freed.

The cost: freed blocks stay mapped, and a step's temporaries may be allocated before the last
step's are freed, so the peak RSS rises, by about one step's temporaries or more (README,
Benchmarks: +25% for packed classification, +70-130% for SmolLM2 CLM). So it is off by default.
Linux with glibc only; elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import sys
from typing import Optional

log = logging.getLogger("ftjax")

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # mallopt parameters (glibc malloc.h)

_kept = False


def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def limit_arenas() -> bool:
    """One malloc arena for every thread. It reaches only threads that have not allocated yet:
    call it before jax starts its thread pools."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_ARENA_MAX, 1))


def keep_freed_memory() -> bool:
    """From now on glibc keeps freed blocks mapped for reuse (no ``mmap``, no trimming), after
    one trim that hands back what loading and compilation left free. Once per process; True when
    the settings are in force."""
    global _kept
    libc = _glibc()
    if _kept or libc is None:
        return _kept
    libc.malloc_trim(0)
    _kept = bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, -1))  # -1: never trim
    if _kept:
        log.info("host memory: freed step buffers stay mapped for reuse from now on (training.keep_host_memory)")
    return _kept
