"""Process-wide defaults that must be set before JAX or transformers start (CLI and benchmarks)."""

from __future__ import annotations

import os
import sys


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


def configure_process() -> None:
    """XLA:CPU's memory-optimized scheduler (~20% less temporary memory for a train step here, no
    measurable speed cost; ``xla_cpu_*`` flags are ignored by GPU / TPU), and no PyTorch in the
    process (``transformers_without_torch``)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_scheduler_type" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED").strip()
    transformers_without_torch()
