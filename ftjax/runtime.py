"""Process-wide defaults that must be set before JAX or transformers start (CLI and benchmarks)."""

from __future__ import annotations

import os
import sys
from collections import Counter

from ftjax.paths import cache_home


def transformers_without_torch() -> None:
    """Keeps PyTorch out of this process when transformers is not imported yet: sets ``USE_TORCH=0``
    unless ``USE_TORCH`` is already set. transformers (4.57) imports torch whenever it is installed
    (the ``bench`` extra installs it): seconds of import time and ~250 MB that ftjax never uses, since
    it builds only Flax models (loading PyTorch safetensors needs no torch; the PyTorch export runs
    in a child process with ``USE_TORCH=1``). ``ftjax.models`` calls this before it imports
    transformers. With torch disabled, transformers 4.57 fails to import ``transformers.pipelines``
    while accelerate is installed; ``ftjax.compat.install()`` (called when a model is loaded)
    fixes that, so the NER post-processing that reuses the pipeline code keeps working.

    To use PyTorch transformers in the same process, import transformers before ftjax.models or
    set ``USE_TORCH=1``.
    """
    if "transformers" not in sys.modules:
        os.environ.setdefault("USE_TORCH", "0")


COMPILATION_CACHE_BYTES = 4 << 30  # least recently used programs go beyond this


def compilation_cache() -> None:
    """JAX's persistent compilation cache in ``$FTJAX_CACHE/xla`` (``~/.cache/ftjax/xla``): a run
    that compiles the same step as an earlier one (a re-run, a resume, a sweep's next run, eval /
    predict after training) loads the compiled program instead of compiling it again. An explicit
    ``JAX_COMPILATION_CACHE_DIR`` wins; set it empty to turn the cache off. Only the user's own
    folder: JAX trusts what is in it (anyone who can write there can run code in the process)."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache_home() / "xla")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(COMPILATION_CACHE_BYTES))
    if "jax" in sys.modules:  # jax read its environment at import: tell it directly (before a compile)
        import jax
        jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
        jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_BYTES)


_cache_events: Counter = Counter()  # hits / misses, once the listener is registered
_listening = False


def _count_cache_event(event: str, **_) -> None:
    if event in ("/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"):
        _cache_events[event.rsplit("_", 1)[-1]] += 1


def compilation_cache_events() -> Counter:
    """Programs this process loaded from the persistent compilation cache (``hits``) and compiled
    and wrote to it (``misses``; programs that compile in under a second are not written), counted
    from the first call on: read it before and after, and subtract."""
    global _listening
    if not _listening:
        import jax
        jax.monitoring.register_event_listener(_count_cache_event)
        _listening = True
    return Counter(_cache_events)


def configure_process() -> None:
    """XLA:CPU's memory-optimized scheduler (~20% less temporary memory for a train step here, no
    measurable speed cost; ``xla_cpu_*`` flags are ignored by GPU / TPU), the persistent
    compilation cache (``compilation_cache``), no PyTorch in the process
    (``transformers_without_torch``) and one malloc arena (``host_memory.limit_arenas``: before any
    thread allocates, so that XLA:CPU's step buffers can be kept for reuse)."""
    from ftjax.host_memory import limit_arenas
    limit_arenas()
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_scheduler_type" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED").strip()
    compilation_cache()
    transformers_without_torch()
