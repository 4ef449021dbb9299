"""Tokenize once: ``datasets.map`` results kept as Arrow files under a key of everything that
shapes them, so a second run with the same data, tokenizer and settings memory-maps them.

The key is made from the configuration, not from ``Dataset._fingerprint`` (random for datasets
built in memory, such as CoNLL or wiki-dump files): the data section, the size and modification
time of every local file it names, the split and its length, the task and its options, the
model's ``max_length`` and the tokenizer's full serialisation. Changing any of them tokenizes anew.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import weakref
from pathlib import Path
from typing import Callable, Optional

import datasets
from datasets.fingerprint import Hasher

from ftjax.paths import cache_home, resolve_path

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when preprocessing code changes what it writes


def cache_root(cache_dir: Optional[str]) -> Path:
    """``data.cache_dir``, else ``$FTJAX_CACHE/datasets``, else ``~/.cache/ftjax/datasets``."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    return cache_home() / "datasets"


def _file_stamp(path: Optional[str]):
    if not path:
        return None
    p = Path(resolve_path(path))
    return (str(p), p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else str(path)


def source_key(config) -> dict:
    """What a run's preprocessing depends on besides the tokenizer and the split."""
    d = config.data
    return {"version": CACHE_VERSION, "data": dataclasses.asdict(d), "seed": config.data_seed,
            "files": [_file_stamp(f) for f in (d.train_file, d.validation_file, d.test_file)],
            "task": config.task, "max_length": config.model.max_length}


_TOKENIZER_KEYS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tokenizer_key(tokenizer) -> str:
    """The tokenizer's vocabulary, normaliser, pre-tokenizer and post-processor; not its truncation
    and padding settings, which every call changes (each map sets its own). Computed once per
    tokenizer object, which must not change afterwards (a run asks at every map; hashing the
    vocabulary again each time was most of a cached start)."""
    if tokenizer in _TOKENIZER_KEYS:
        return _TOKENIZER_KEYS[tokenizer]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a copy without truncation / padding, serialised by the tokenizers library
        from tokenizers import Tokenizer
        copy = Tokenizer.from_str(backend.to_str())
        copy.no_truncation()
        copy.no_padding()
        state = copy.to_str()
    else:
        state = json.dumps(sorted(tokenizer.get_vocab().items()))
    text = "\n".join([type(tokenizer).__name__, state, tokenizer.padding_side, tokenizer.truncation_side,
                      str(tokenizer.special_tokens_map)])
    key = hashlib.sha256(text.encode()).hexdigest()
    _TOKENIZER_KEYS[tokenizer] = key
    return key


def cached_map(ds: datasets.Dataset, function: Callable, *, key: dict, name: str,
               cache_dir: Optional[str], **map_kwargs) -> datasets.Dataset:
    """``ds.map(function, **map_kwargs)`` written to (or read from) ``<cache>/<name>-<hash>.arrow``.

    ``key`` must hold everything the result depends on (``source_key``, ``tokenizer_key``, the
    split, the task's options); it names the file and the result's fingerprint.
    """
    fingerprint = Hasher.hash({**key, "name": name, "rows": len(ds), "columns": ds.column_names})
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}-{fingerprint}.arrow"
    procs = min(map_kwargs.get("num_proc") or 1, max(len(ds), 1))  # datasets writes a file per process
    files = [path] if procs == 1 else [root / f"{path.stem}_{i:05d}_of_{procs:05d}.arrow" for i in range(procs)]
    if all(f.exists() for f in files):
        log.info("%s: reusing the cached result %s", name, path)
    return ds.map(function, new_fingerprint=fingerprint, cache_file_name=str(path), load_from_cache_file=True,
                  **map_kwargs)
