"""The small interface every task implements; the trainer, sharding and checkpoints are shared.

A task must say four things: how to turn raw splits into token ids (``prepare``), how to score
model output (``loss``), what to bring to the host after each eval batch (``outputs``) and how to
turn those into metrics and predictions (``metrics`` / ``predictions``). Everything else is an
optional hook with a default that fits encoder tasks: a special tokenizer or model
(``adapt_tokenizer`` / ``load_model``), per-field padded lengths (``length_groups``), host-side batch
transforms (``host_transform``, MLM masking), decoding inside the eval step (``eval_outputs``,
generation), per-split host state (``begin_eval``, QA offsets), reports (``write_reports``) and
custom inference (``predict_records``). New tasks register with ``@register``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import datasets
import jax
import numpy as np

from ftjax.config import Config
from ftjax.errors import FtjaxError

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class Task:
    name: ClassVar[str]
    auto_class: ClassVar[str]  # transformers Flax auto class, e.g. FlaxAutoModelForSequenceClassification
    empty_prediction: ClassVar[Any] = None  # what ``ftjax predict`` writes for an empty input text
    long_inputs: ClassVar[str] = "truncated"  # or "windowed": what happens to inputs over max_length

    def __init__(self, config: Config):
        self.config = config

    # ---- data ------------------------------------------------------------------------------
    def setup(self, splits: datasets.DatasetDict) -> None:
        """Inspects the raw splits (labels, columns) and raises FtjaxError on bad input."""

    def setup_from_model(self, model_config) -> None:
        """Label information from a trained model's config (predict without data)."""

    def adapt_tokenizer(self, tokenizer):
        """The tokenizer this task needs, given the loaded one (e.g. with add_prefix_space)."""
        return tokenizer

    def load_model(self, model_config, bf16: bool, tokenizer, **kwargs):
        """The Flax model for this task (default: ``auto_class`` from ``model.name_or_path``); a task
        may build it otherwise (seq2seq makes an encoder-decoder from an encoder checkpoint)."""
        from ftjax.models import load_model
        return load_model(self.auto_class, model_config, bf16, **kwargs)

    def length_groups(self) -> tuple:
        """``batching.LengthGroup``s: sequence fields padded to their own bucket length (seq2seq
        targets) instead of the ``input_ids`` one."""
        return ()

    def predict_columns(self) -> list[str]:
        """Columns every ``ftjax predict`` record needs; the first is checked for truncation."""
        return [self.config.data.text_column]

    def prepare(self, splits: datasets.DatasetDict, tokenizer) -> datasets.DatasetDict:
        """Tokenized splits with ``input_ids`` and the task's label field(s)."""
        raise NotImplementedError

    def model_kwargs(self) -> dict:
        """Extra config for ``from_pretrained`` (num_labels, id2label...)."""
        return {}

    # ---- model -----------------------------------------------------------------------------
    def forward(self, model, params, batch: dict, rng: jax.Array | None, train: bool):
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        return model(**inputs, params=params, dropout_rng=rng, train=train).logits

    def eval_outputs(self, model, params, batch: dict) -> dict[str, jax.Array]:
        """Runs inside the jitted eval step: per-example outputs plus ``_loss_sum`` / ``_weight``
        when the batch has labels. Generation tasks override this to decode as well."""
        logits = self.forward(model, params, batch, None, train=False)
        out = self.outputs(logits, batch)
        if "labels" in batch:
            out["_loss_sum"], out["_weight"] = self.loss(logits, batch)
        return out

    def host_transform(self, batch: dict[str, np.ndarray], epoch: int, train: bool) -> dict[str, np.ndarray]:
        """Numpy batch -> numpy batch on the host before transfer (e.g. MLM masking). Must be a pure
        function of (config seed, epoch, batch["index"]) so a resumed run sees the same data."""
        return batch

    def loss(self, logits, batch: dict) -> tuple[jax.Array, jax.Array]:
        """(sum of losses over counted rows/tokens, number counted)."""
        raise NotImplementedError

    def outputs(self, logits, batch: dict) -> dict[str, jax.Array]:
        """Per-example arrays to bring to the host (leading axis = batch)."""
        raise NotImplementedError

    # ---- host side -------------------------------------------------------------------------
    def begin_eval(self, split: str) -> None:
        """Called before evaluating ``split`` ("predict" for ``predict_inputs`` rows), so a task that
        keeps host-side data per split (QA offsets, reference texts) uses the right one in
        ``metrics`` / ``predictions``."""

    def metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        raise NotImplementedError

    def predictions(self, outputs: dict[str, np.ndarray]) -> list[dict]:
        raise NotImplementedError

    def predict_records(self, model, params, tokenizer, records: list[dict]) -> list[dict] | None:
        """Predictions for raw records computed by the task itself (text generation, fill-mask),
        or None to use ``predict_inputs`` + the eval step + ``predictions``."""
        return None

    def predict_inputs(self, records: list[dict], tokenizer) -> datasets.Dataset:
        """Tokenized rows for ``ftjax predict`` from raw records."""
        raise NotImplementedError

    def write_reports(self, outputs: dict[str, np.ndarray], split: str, output_dir) -> None:
        """Extra files after evaluating a split (e.g. an error analysis); the main process only."""


def require_columns(ds: datasets.Dataset, split: str, columns: list[str]) -> None:
    missing = [c for c in columns if c and c not in ds.column_names]
    if missing:
        raise FtjaxError(f"{split} split: column '{missing[0]}' not found (columns: {', '.join(ds.column_names)})")


_REGISTRY: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    _REGISTRY[cls.name] = cls
    return cls


def get_task(config: Config) -> Task:
    import ftjax.tasks  # noqa: F401  (registers the built-in tasks)
    if config.task not in _REGISTRY:
        raise FtjaxError(f"unknown task '{config.task}' (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[config.task](config)
