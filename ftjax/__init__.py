"""ftjax: sharded JAX/Flax fine-tuning and pre-training of Hugging Face transformer models.

Importing the package is cheap and changes nothing in the process: the names below are imported
on first use (``from ftjax import TrainState`` imports only ``ftjax.step``: jax, flax, optax).
transformers is imported, and its compatibility shims installed, only by the code that loads
models (``ftjax.models``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "Config": "ftjax.config",
    "load_config": "ftjax.config",
    "FtjaxError": "ftjax.errors",
    "TrainState": "ftjax.step",
    "make_eval_step": "ftjax.step",
    "make_train_step": "ftjax.step",
}
__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # for type checkers and IDEs only
    from ftjax.config import Config, load_config  # noqa: F401
    from ftjax.errors import FtjaxError  # noqa: F401
    from ftjax.step import TrainState, make_eval_step, make_train_step  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ftjax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
