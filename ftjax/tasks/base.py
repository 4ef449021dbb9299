"""The one small interface a task implements; data loading, the loop, sharding and checkpoints are shared.

A task is six methods, in three pairs, plus a check of the raw data; nothing is remembered between
them except the label set that ``check`` reads from the training data:

    host, before training     check(splits)                                   bad input -> FtjaxError; label set
                              prepare(splits, tokenizer) -> {split: Split}    tokenized rows + host meta
                              encode(records, tokenizer) -> Split             the same for ``ftjax predict``
    device, inside jit        loss(model, params, batch, rng, train) -> (loss sum, weight sum)
                              outputs(model, params, batch) -> {name: [rows, ...]}
    host, after evaluation    metrics(outputs, meta) -> {name: value}
                              predictions(outputs, meta) -> [one per record]

``Split.meta`` holds what the host needs to score a split (QA contexts and offsets, seq2seq
references, NER words), indexed by the split's global row (or example) number. Every process
prepares every split whole (the batcher then reads only its own strided rows), and ``outputs`` are
gathered from all processes and sorted by the global ``index`` before ``metrics`` sees them, so
``metrics(outputs, meta)`` is a pure function of its arguments and the same on every host.

With labels in the batch, ``outputs`` also returns per-row ``loss_sum`` / ``loss_weight``: the
evaluation loss is their ratio, the same definition as the training loss.

Optional hooks, with defaults that fit encoder tasks: ``adapt_tokenizer`` (e.g. add_prefix_space;
MLM reads its mask token here), ``load_model`` (seq2seq builds BERT2BERT), ``labels_from_model``
(label names of a trained model, for predict), ``length_groups`` (fields with their own padded
length), ``host_transform`` (MLM masking), ``generate`` (predict by generation / fill-mask) and
``reports`` (extra files, e.g. NER's error analysis). Task options are a dataclass (``Options``)
read from the ``task_options`` config section; tasks never change the config.
A new task is one module: a ``Task`` subclass with ``@register`` and its ``Options``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

import datasets
import jax
import numpy as np

from ftjax.config import Config
from ftjax.data.cache import cached_map, source_key, tokenizer_key
from ftjax.errors import FtjaxError

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclasses.dataclass
class Split:
    """One prepared split: the model's rows and the host-side data its metrics need."""

    rows: datasets.Dataset
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class NoOptions:
    """A task without options of its own."""


class Task:
    name: ClassVar[str]
    auto_class: ClassVar[str]  # transformers Flax auto class, e.g. FlaxAutoModelForSequenceClassification
    Options: ClassVar[type] = NoOptions  # the ``task_options`` dataclass
    empty_prediction: ClassVar[Any] = None  # what ``ftjax predict`` writes for an empty input text
    long_inputs: ClassVar[str] = "truncated"  # or "windowed": what happens to inputs over max_length
    # ``ftjax eval`` / ``predict`` without a trained export may use the base model (its LM head is the task).
    base_model_predicts: ClassVar[bool] = False
    packing: ClassVar[bool] = False  # ``loss`` takes packed rows (data.packing, data/example_packing.py)

    def __init__(self, config: Config):
        self.config = config
        self.options = task_options(type(self), config.task_options)

    @property
    def max_length(self) -> int:
        """Tokens per row: the batcher's longest bucket."""
        return self.config.model.max_length

    @property
    def input_columns(self) -> list[str]:
        """Columns every ``ftjax predict`` record needs; the first is checked for truncation."""
        return [self.config.data.text_column]

    # ---- the interface ---------------------------------------------------------------------
    def check(self, splits: datasets.DatasetDict) -> None:
        """Checks the whole raw splits, before any subsampling (FtjaxError naming the split and
        example on bad input), and reads what the task learns from them (the label set)."""

    def prepare(self, splits: datasets.DatasetDict, tokenizer) -> dict[str, Split]:
        """Tokenized splits (after ``check``), each with the host meta its metrics need."""
        raise NotImplementedError

    def encode(self, records: list[dict], tokenizer) -> Split:
        """Rows (no labels) and meta for ``ftjax predict`` from raw records."""
        raise NotImplementedError

    def loss(self, model, params, batch: dict, rng: Optional[jax.Array], train: bool) -> tuple[jax.Array, jax.Array]:
        """(sum of losses over counted rows / tokens, number counted): ``make_train_step``'s contract."""
        raise NotImplementedError

    def outputs(self, model, params, batch: dict) -> dict[str, jax.Array]:
        """Per-row arrays to bring to the host (leading axis = batch), always with ``index`` and
        ``weight``; with labels in the batch also ``loss_sum`` and ``loss_weight``."""
        raise NotImplementedError

    def metrics(self, outputs: dict[str, np.ndarray], meta: dict) -> dict[str, Any]:
        """Scores of a split from its real rows' outputs (in global row order) and its meta."""
        raise NotImplementedError

    def predictions(self, outputs: dict[str, np.ndarray], meta: dict) -> list:
        """One prediction per record given to ``encode``."""
        raise NotImplementedError

    def metric_names(self) -> Optional[set[str]]:
        """The top-level names ``metrics`` returns with this config (after ``check``), so a
        ``metric_for_best_model`` it never produces fails before training; None: not declared."""
        return None

    # ---- optional hooks ----------------------------------------------------------------------
    def adapt_tokenizer(self, tokenizer):
        """The tokenizer this task needs, given the loaded one."""
        return tokenizer

    def model_kwargs(self) -> dict:
        """Extra config for ``from_pretrained`` (num_labels, id2label...), known after ``prepare``."""
        return {}

    def labels_from_model(self, model_config) -> None:
        """Label names of a trained model (predict / eval without training data)."""

    def load_model(self, model_config, bf16: bool, tokenizer, **kwargs):
        """``(model, weights)``: the Flax model without weights and its checkpoint's parameters as
        host arrays, or None (default: ``auto_class`` from ``model_config.name_or_path``, see
        ``ftjax.models.load_model``; a ``model.flax_module`` model is built by its factory). The
        trainer places them on the mesh, shard by shard."""
        from ftjax.models import load_flax_module, load_model, uses_flax_module
        if uses_flax_module(model_config):
            return load_flax_module(model_config, bf16, len(tokenizer), **kwargs)
        return load_model(self.auto_class, model_config, bf16, **kwargs)

    def length_groups(self) -> tuple:
        """``batching.LengthGroup``s: fields padded to their own bucket length (seq2seq targets)."""
        return ()

    def host_transform(self, batch: dict[str, np.ndarray], epoch: int, train: bool) -> dict[str, np.ndarray]:
        """Numpy batch -> numpy batch before transfer (MLM masking). Must be a pure function of
        (config seed, epoch, batch["index"]) so a resumed run sees the same data."""
        return batch

    def generate(self, model, params, tokenizer, records: list[dict]) -> Optional[list]:
        """Predictions computed by the task's own jitted inference (generation, fill-mask), or None
        to use ``encode`` + the eval step + ``predictions``."""
        return None

    def reports(self, outputs: dict[str, np.ndarray], meta: dict, split: str) -> dict[str, str]:
        """Extra text files (name -> content) written after evaluating a split."""
        return {}


def model_output(model, params, batch: dict, rng: Optional[jax.Array], train: bool):
    """The model's output on the batch's model inputs (dropout only when ``train``)."""
    from ftjax.models import forward
    return forward(model, params, {k: batch[k] for k in MODEL_INPUTS if k in batch}, rng, train)


def tokenize_split(task: Task, ds: datasets.Dataset, function, split: str, tokenizer, name: str = "tokenize",
                   **map_kwargs) -> datasets.Dataset:
    """``ds.map(function, batched=True)``, cached under everything that shapes the result (the data,
    the tokenizer, the task and its options: ``ftjax.data.cache``), so a second run reads Arrow."""
    key = {**source_key(task.config), "tokenizer": tokenizer_key(tokenizer), "split": split,
           "options": dataclasses.asdict(task.options), "labels": getattr(task, "label_names", None)}
    kwargs = {"batched": True, "desc": f"{name} {split}", "num_proc": task.config.data.preprocessing_num_workers,
              **map_kwargs}
    return cached_map(ds, function, key=key, name=f"{task.name}-{name}-{split}",
                      cache_dir=task.config.data.cache_dir, **kwargs)


ALWAYS_METRICS = ("loss", "num_examples")  # added by ``Trainer.evaluate`` to every task's metrics


def check_best_metric(task: Task, metric: str) -> None:
    """FtjaxError when the task never produces ``metric`` (the ``metric_for_best_model`` key)."""
    names = task.metric_names()
    if names is None or metric in names or metric in ALWAYS_METRICS:
        return
    valid = sorted(set(names) | set(ALWAYS_METRICS))
    import difflib
    close = difflib.get_close_matches(metric, valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise FtjaxError(f"training.metric_for_best_model '{metric}' is not a metric of task '{task.name}' "
                     f"(it produces: {', '.join(valid)}){hint}")


def require_columns(ds: datasets.Dataset, split: str, columns: list[Optional[str]]) -> None:
    missing = [c for c in columns if c and c not in ds.column_names]
    if missing:
        raise FtjaxError(f"{split} split: column '{missing[0]}' not found (columns: {', '.join(ds.column_names)})")


_REGISTRY: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    _REGISTRY[cls.name] = cls
    return cls


def task_class(name: str) -> type[Task]:
    import ftjax.tasks  # noqa: F401  (registers the built-in tasks)
    if name not in _REGISTRY:
        raise FtjaxError(f"unknown task '{name}' (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def get_task(config: Config) -> Task:
    """The registered task named by ``config.task`` with its options from ``config.task_options``."""
    return task_class(config.task)(config)


def task_options(cls: type[Task], values: Any):
    """The task's ``Options`` dataclass from the ``task_options`` section (checked like every config key)."""
    if isinstance(values, cls.Options):
        return values
    from ftjax.config import build_dataclass
    return build_dataclass(cls.Options, dict(values or {}), "task_options.")
