"""Sequence classification: single texts or sentence pairs; class labels or a regression target."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Optional

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax import metrics as M
from ftjax.errors import FtjaxError
from ftjax.segments import packed_sequence_logits
from ftjax.tasks.base import Split, Task, model_output, register, require_columns, tokenize_split


@dataclasses.dataclass
class ClassificationOptions:
    text_pair_column: Optional[str] = None  # sentence pairs (NLI, paraphrase): the second text
    problem_type: Literal["auto", "single_label", "regression"] = "auto"  # auto: regression for float labels


@register
class Classification(Task):
    name = "classification"
    auto_class = "FlaxAutoModelForSequenceClassification"
    Options = ClassificationOptions
    packing = True

    label_names: Optional[list[str]] = None  # None for regression; from the train split or the model

    @property
    def regression(self) -> bool:
        return self.label_names is None

    # ---- host: data ------------------------------------------------------------------------
    def check(self, splits: datasets.DatasetDict) -> None:
        d = self.config.data
        for split, ds in splits.items():
            require_columns(ds, split, [d.text_column, self.options.text_pair_column, d.label_column])
            self._check_no_blank_labels(split, ds)
        self.label_names = self._label_names(splits)
        if not self.regression:
            self._check_labels(splits)
            self._check_classes(splits["train"])

    def _check_no_blank_labels(self, split: str, ds: datasets.Dataset) -> None:
        """An empty label cell would make an int column float (-> regression) or a class 'None'."""
        column = self.config.data.label_column
        blank = next((i for i, v in enumerate(ds[column]) if v is None or (isinstance(v, float) and v != v)
                      or (isinstance(v, str) and not v.strip())), None)
        if blank is not None:
            raise FtjaxError(f"{split} split, example {blank}: the label (column '{column}') is empty; "
                             "fill it in or drop the row")

    def _check_classes(self, train: datasets.Dataset) -> None:
        """A classifier needs two classes in its training data (one trains a constant: loss 0)."""
        column = self.config.data.label_column
        seen = set(map(str, train.unique(column)))
        if len(seen) < 2:
            name = self.label_names[int(next(iter(seen)))] if isinstance(
                train.features[column], datasets.ClassLabel) and seen else next(iter(seen), "")
            raise FtjaxError(f"train split: every example has the label {name!r}; classification needs "
                             f"at least 2 classes in column '{column}' (for a score use "
                             "task_options.problem_type=regression)")

    def _label_names(self, splits: datasets.DatasetDict) -> Optional[list[str]]:
        d = self.config.data
        train = splits["train"]
        feature = train.features[d.label_column]
        if isinstance(feature, datasets.ClassLabel):
            return list(feature.names)
        if self.options.problem_type == "regression" or (
                self.options.problem_type == "auto" and getattr(feature, "dtype", "").startswith("float")):
            return None
        if d.label_names:
            return [str(x) for x in d.label_names]
        values = sorted(set(train[d.label_column]), key=lambda v: (str(type(v)), v))
        if any(v is None for v in values):
            raise FtjaxError(f"train split: column '{d.label_column}' has empty labels")
        return [str(v) for v in values]

    def _check_labels(self, splits: datasets.DatasetDict) -> None:
        column, names = self.config.data.label_column, self.label_names
        for split, ds in splits.items():
            if isinstance(ds.features[column], datasets.ClassLabel):
                if ds.features[column].names != names:
                    raise FtjaxError(f"{split} split: its class names differ from the train split's")
                continue
            bad = next(((i, v) for i, v in enumerate(ds[column]) if str(v) not in set(names)), None)
            if bad:
                raise FtjaxError(f"{split} split, example {bad[0]}: label {bad[1]!r} is not in the "
                                 f"label set {names[:20]}")

    def _encode(self, tokenizer, examples: dict, with_labels: bool, classlabel: bool = False) -> dict:
        d = self.config.data
        texts = ["" if t is None else str(t) for t in examples[d.text_column]]
        pairs = None
        if self.options.text_pair_column:
            pairs = ["" if t is None else str(t) for t in examples[self.options.text_pair_column]]
        enc = tokenizer(texts, pairs, truncation=True, max_length=self.max_length)
        if with_labels:
            labels = examples[d.label_column]
            if self.regression:
                enc["labels"] = [float(v) for v in labels]
            else:
                index = {n: i for i, n in enumerate(self.label_names)}
                enc["labels"] = [v if classlabel else index[str(v)] for v in labels]
        return enc

    def prepare(self, splits: datasets.DatasetDict, tokenizer) -> dict[str, Split]:
        out = {}
        for split, ds in splits.items():
            classlabel = isinstance(ds.features[self.config.data.label_column], datasets.ClassLabel)
            out[split] = Split(tokenize_split(self, ds, lambda ex: self._encode(tokenizer, ex, True, classlabel),
                                              split, tokenizer, remove_columns=ds.column_names))
        return out

    def encode(self, records: list[dict], tokenizer) -> Split:
        ds = datasets.Dataset.from_list(records)
        return Split(ds.map(lambda ex: self._encode(tokenizer, ex, False), batched=True,
                            remove_columns=ds.column_names))

    @property
    def input_columns(self) -> list[str]:
        return [c for c in (self.config.data.text_column, self.options.text_pair_column) if c]

    def labels_from_model(self, model_config) -> None:
        if getattr(model_config, "problem_type", None) == "regression":
            self.label_names = None
        else:
            self.label_names = [model_config.id2label[i] for i in range(model_config.num_labels)]

    def model_kwargs(self) -> dict:
        if self.regression:
            return {"num_labels": 1, "problem_type": "regression"}
        return {"num_labels": len(self.label_names),
                "id2label": dict(enumerate(self.label_names)),
                "label2id": {n: i for i, n in enumerate(self.label_names)}}

    # ---- device ----------------------------------------------------------------------------
    def _row_loss(self, scores, labels):
        if self.regression:
            return jnp.square(scores[:, 0] - labels)
        return optax.softmax_cross_entropy_with_integer_labels(scores, labels)

    def loss(self, model, params, batch, rng, train):
        if "segment_ids" in batch:  # packed rows: the head on each example's CLS (ftjax.segments)
            scores = packed_sequence_logits(model, params, batch, rng, train).astype(jnp.float32)
            w = (batch["segment_weight"] * batch["weight"][:, None]).reshape(-1)
            per_example = self._row_loss(scores.reshape(w.shape[0], -1), batch["segment_labels"].reshape(-1))
            return (per_example * w).sum(), w.sum()
        scores = model_output(model, params, batch, rng, train).logits.astype(jnp.float32)
        w = batch["weight"]
        return (self._row_loss(scores, batch["labels"]) * w).sum(), w.sum()

    def outputs(self, model, params, batch):
        scores = model_output(model, params, batch, None, False).logits.astype(jnp.float32)
        out = {"index": batch["index"], "weight": batch["weight"]}
        if self.regression:
            out["prediction"] = scores[:, 0]
        else:
            probs = jax.nn.softmax(scores, axis=-1)
            out["prediction"] = probs.argmax(-1)
            out["score"] = probs.max(-1)
        if "labels" in batch:
            out["labels"] = batch["labels"]
            out["loss_sum"] = self._row_loss(scores, batch["labels"]) * batch["weight"]
            out["loss_weight"] = batch["weight"]
        return out

    # ---- host: scores ----------------------------------------------------------------------
    def metric_names(self) -> set[str]:
        if self.regression:
            return {"mse", "pearson", "spearman"}
        return {"accuracy"} | {f"{m}_{avg}" for m in ("precision", "recall", "f1") for avg in ("macro", "weighted")}

    def metrics(self, outputs: dict[str, np.ndarray], meta: dict) -> dict[str, Any]:
        if self.regression:
            return M.regression_metrics(outputs["prediction"], outputs["labels"])
        return M.classification_metrics(outputs["prediction"], outputs["labels"], self.label_names)

    def predictions(self, outputs: dict[str, np.ndarray], meta: dict) -> list[dict]:
        if self.regression:
            return [{"score": float(p)} for p in outputs["prediction"]]
        return [{"label": self.label_names[int(p)], "score": float(s)}
                for p, s in zip(outputs["prediction"], outputs["score"])]
