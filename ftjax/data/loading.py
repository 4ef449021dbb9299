"""Raw splits from a hub dataset or local files, with the split rule and seeded subsampling."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

import datasets

from ftjax.config import DataConfig
from ftjax.data import conll, records, squad
from ftjax.errors import FtjaxError
from ftjax.paths import hub_offline, resolve_path  # resolve_path stays importable from here too

_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
             ".txt": "text", ".cor": "text", ".bz2": "wiki"}  # .cor: one document a line; .bz2: MediaWiki dump


def load_file(path: str) -> datasets.Dataset:
    """One local csv / tsv / json / jsonl / parquet / txt file as a Dataset."""
    path = resolve_path(path)
    p = Path(path)
    if not p.is_file():
        raise FtjaxError(f"data file not found: {path}")
    builder = _BUILDERS.get(p.suffix.lower())
    if builder is None:
        raise FtjaxError(f"{path}: unsupported file type '{p.suffix}' (use one of {sorted(_BUILDERS)})")
    if builder == "wiki" or squad.is_nested_squad(path):  # MediaWiki dump; nested SQuAD JSON
        from ftjax.data.corpora import read_wiki_dump
        ds = read_wiki_dump(path) if builder == "wiki" else squad.read_nested_squad(path)
        if len(ds) == 0:
            raise FtjaxError(f"{path}: the file holds no examples")
        return ds
    if p.stat().st_size == 0:
        raise FtjaxError(f"{path}: the file is empty (0 bytes)")
    kwargs = {"encoding_errors": "replace"} if builder == "text" else {}
    if builder == "csv":
        kwargs = {"encoding_errors": "replace", "sep": "\t" if p.suffix.lower() == ".tsv" else ","}
    if builder in ("csv", "text"):  # read with errors="replace": say how many bytes were not UTF-8
        records.warn_replaced(path, records.replaced_bytes(path))
    try:
        with _parser_errors_unlogged():
            ds = datasets.load_dataset(builder, data_files=str(p), split="train", **kwargs)
    except Exception as e:  # datasets raises many kinds; keep one line for the user
        if "corresponds to no data" in str(e):
            raise FtjaxError(f"{path}: the file holds no examples") from None
        records.diagnose(path, builder, kwargs.get("sep", ","))  # names the bad line when it finds it
        raise FtjaxError(f"{path}: cannot read as {builder}: {_root_cause(e)}") from None
    if len(ds) == 0:
        raise FtjaxError(f"{path}: the file holds no examples")
    return ds


@contextlib.contextmanager
def _parser_errors_unlogged():
    """datasets' builders log a parse error with its traceback before raising; ftjax reports it as one
    line (``records.diagnose``), so those log records are dropped while a file is read."""
    logger = logging.getLogger("datasets.packaged_modules")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _root_cause(e: BaseException) -> str:
    """The first line of the innermost cause: datasets wraps the parser's message (which has the line)."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def split_mod10(ds: datasets.Dataset) -> datasets.DatasetDict:
    """ASSETS.md split rule: i%10==0 -> test, i%10==1 -> validation, the rest -> train."""
    idx = range(len(ds))
    return datasets.DatasetDict({
        "train": ds.select([i for i in idx if i % 10 >= 2]),
        "validation": ds.select([i for i in idx if i % 10 == 1]),
        "test": ds.select([i for i in idx if i % 10 == 0]),
    })


def hub_splits(cfg: DataConfig, streaming: bool = False) -> dict:
    """The splits of ``data.dataset_name`` on the Hub (``valid`` named ``validation``), or one clear
    line when the Hub is offline or the dataset cannot be read."""
    if hub_offline():
        raise FtjaxError(f"dataset '{cfg.dataset_name}' is on the Hugging Face Hub and the Hub is "
                         "offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE); use local files")
    try:
        splits = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config_name, streaming=streaming)
    except Exception as e:
        verb = "stream" if streaming else "load"
        raise FtjaxError(f"cannot {verb} dataset '{cfg.dataset_name}': {str(e).splitlines()[0]}") from None
    if "validation" not in splits and "valid" in splits:
        splits["validation"] = splits.pop("valid")
    return splits


def load_splits(cfg: DataConfig) -> datasets.DatasetDict:
    """train / validation / test splits (those that exist) as configured."""
    if cfg.dataset_name:
        splits = hub_splits(cfg)
    else:
        if not cfg.train_file:
            raise FtjaxError("no data: set data.train_file (local file) or data.dataset_name (hub)")
        files = {k: v for k, v in {"train": cfg.train_file, "validation": cfg.validation_file,
                                   "test": cfg.test_file}.items() if v}
        if conll.is_conll(cfg.train_file, cfg.format):
            splits = conll.load_conll_splits(files, cfg)
        else:
            splits = datasets.DatasetDict({k: load_file(v) for k, v in files.items()})
    if cfg.split_rule == "mod10":
        if len(splits) != 1:
            raise FtjaxError("data.split_rule=mod10 splits one file: give only data.train_file")
        splits = split_mod10(splits["train"])
    for name, ds in splits.items():
        if len(ds) == 0:
            raise FtjaxError(f"the {name} split is empty")
    return splits


def subsample(ds: datasets.Dataset, n: Optional[int], seed: int) -> datasets.Dataset:
    """A seeded random subset of ``n`` examples (all when n is None or larger than the split)."""
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n)).flatten_indices()

