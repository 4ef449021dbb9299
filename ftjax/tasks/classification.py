"""Sequence classification: single texts or sentence pairs; class labels or a regression target."""

from __future__ import annotations

from typing import Any

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax import metrics as M
from ftjax.errors import FtjaxError
from ftjax.tasks.base import Task, register, require_columns


@register
class Classification(Task):
    name = "classification"
    auto_class = "FlaxAutoModelForSequenceClassification"

    label_names: list[str] | None = None  # None for regression

    @property
    def regression(self) -> bool:
        return self.label_names is None

    def setup(self, splits: datasets.DatasetDict) -> None:
        d = self.config.data
        for split, ds in splits.items():
            require_columns(ds, split, [d.text_column, d.text_pair_column, d.label_column])
        train = splits["train"]
        feature = train.features[d.label_column]
        if isinstance(feature, datasets.ClassLabel):
            names = list(feature.names)
        elif d.problem_type == "regression" or (
                d.problem_type == "auto" and getattr(feature, "dtype", "").startswith("float")):
            self.label_names = None
            return
        elif d.label_names:
            names = [str(x) for x in d.label_names]
        else:
            values = sorted(set(train[d.label_column]), key=lambda v: (str(type(v)), v))
            if any(v is None for v in values):
                raise FtjaxError(f"train split: column '{d.label_column}' has empty labels")
            names = [str(v) for v in values]
        self.label_names = names
        known = set(names)
        for split, ds in splits.items():
            if isinstance(ds.features[d.label_column], datasets.ClassLabel):
                if ds.features[d.label_column].names != names:
                    raise FtjaxError(f"{split} split: its class names differ from the train split's")
                continue
            bad = next(((i, v) for i, v in enumerate(ds[d.label_column]) if str(v) not in known), None)
            if bad:
                raise FtjaxError(f"{split} split, example {bad[0]}: label {bad[1]!r} is not in the "
                                 f"label set {names[:20]}")

    def setup_from_model(self, model_config) -> None:
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

    def _encode(self, tokenizer, examples: dict, with_labels: bool, classlabel: bool = False) -> dict:
        d, m = self.config.data, self.config.model
        texts = ["" if t is None else str(t) for t in examples[d.text_column]]
        pairs = None
        if d.text_pair_column:
            pairs = ["" if t is None else str(t) for t in examples[d.text_pair_column]]
        enc = tokenizer(texts, pairs, truncation=True, max_length=m.max_length)
        if with_labels:
            labels = examples[d.label_column]
            if self.regression:
                enc["labels"] = [float(v) for v in labels]
            else:
                index = {n: i for i, n in enumerate(self.label_names)}
                enc["labels"] = [v if classlabel else index[str(v)] for v in labels]
        return enc

    def prepare(self, splits: datasets.DatasetDict, tokenizer) -> datasets.DatasetDict:
        out = {}
        for split, ds in splits.items():
            classlabel = isinstance(ds.features[self.config.data.label_column], datasets.ClassLabel)
            out[split] = ds.map(lambda ex: self._encode(tokenizer, ex, True, classlabel), batched=True,
                                remove_columns=ds.column_names, desc=f"tokenize {split}",
                                num_proc=self.config.data.preprocessing_num_workers)
        return datasets.DatasetDict(out)

    def predict_inputs(self, records: list[dict], tokenizer) -> datasets.Dataset:
        ds = datasets.Dataset.from_list(records)
        return ds.map(lambda ex: self._encode(tokenizer, ex, False), batched=True,
                      remove_columns=ds.column_names)

    # ---- device side -----------------------------------------------------------------------
    def loss(self, logits, batch):
        logits = logits.astype(jnp.float32)
        if self.regression:
            per_example = jnp.square(logits[:, 0] - batch["labels"])
        else:
            per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        w = batch["weight"]
        return (per_example * w).sum(), w.sum()

    def outputs(self, logits, batch):
        logits = logits.astype(jnp.float32)
        out = {"index": batch["index"], "weight": batch["weight"]}
        if self.regression:
            out["prediction"] = logits[:, 0]
        else:
            probs = jax.nn.softmax(logits, axis=-1)
            out["prediction"] = probs.argmax(-1)
            out["score"] = probs.max(-1)
        if "labels" in batch:
            out["labels"] = batch["labels"]
        return out

    # ---- host side -------------------------------------------------------------------------
    def metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.regression:
            return M.regression_metrics(outputs["prediction"], outputs["labels"])
        return M.classification_metrics(outputs["prediction"], outputs["labels"], self.label_names)

    def predictions(self, outputs: dict[str, np.ndarray]) -> list[dict]:
        if self.regression:
            return [{"score": float(p)} for p in outputs["prediction"]]
        return [{"label": self.label_names[int(p)], "score": float(s)}
                for p, s in zip(outputs["prediction"], outputs["score"])]
