"""Classification data variants: sentence pairs, regression targets, ClassLabel features, bf16."""

import csv
import json
import random

import datasets
import jax
import numpy as np

from conftest import tiny_overrides
from ftjax.config import load_config
from ftjax.tasks import get_task
from ftjax.trainer import Trainer


def _pairs_csv(path, n=120, regression=False):
    """Premise / hypothesis pairs: entailment when the hypothesis repeats a premise word."""
    rng = random.Random(0)
    words = "cat dog bird fish horse cow sheep goat".split()
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["premise", "hypothesis", "label"])
        for i in range(n):
            premise = rng.sample(words, 3)
            same = i % 2 == 0
            hyp = [premise[0]] if same else [rng.choice([x for x in words if x not in premise])]
            label = (4.0 if same else 1.0) + rng.random() if regression else ("entailment" if same else "neutral")
            w.writerow([" ".join(premise), " ".join(hyp), label])
    return str(path)


def test_sentence_pairs_are_encoded_together_and_train(tiny_model, tmp_path):
    data = _pairs_csv(tmp_path / "nli.csv")
    cfg = load_config(None, tiny_overrides(tiny_model, data, tmp_path / "run", **{
        "data.text_column": "premise", "task_options.text_pair_column": "hypothesis", "training.num_train_epochs": 1}))
    trainer = Trainer(cfg)
    row = trainer.splits["train"].rows[0]
    assert 1 in row["token_type_ids"] and row["input_ids"].count(trainer.tokenizer.sep_token_id) == 2
    results = trainer.train()
    assert trainer.task.label_names == ["entailment", "neutral"]
    assert results["test"]["num_examples"] == 12


def test_float_labels_train_a_regression_head(tiny_model, tmp_path):
    data = _pairs_csv(tmp_path / "sts.csv", regression=True)
    cfg = load_config(None, tiny_overrides(tiny_model, data, tmp_path / "run", **{
        "data.text_column": "premise", "task_options.text_pair_column": "hypothesis", "training.num_train_epochs": 4,
        "training.metric_for_best_model": "pearson"}))
    trainer = Trainer(cfg)
    results = trainer.train()
    assert trainer.model.config.num_labels == 1 and trainer.task.regression
    assert {"mse", "pearson", "spearman", "loss"} <= set(results["validation"])
    exported = json.loads((tmp_path / "run" / "export" / "config.json").read_text())
    assert exported["problem_type"] == "regression" and len(exported["id2label"]) == 1


def test_classlabel_features_keep_their_names():
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    splits = datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": ["a", "b"], "label": [1, 0]},
                                                                 features=features) for s in ("train", "validation")})
    task = get_task(load_config(None, []))
    task.check(splits)
    assert task.label_names == ["neg", "pos"] and task.model_kwargs()["id2label"] == {0: "neg", 1: "pos"}


def test_bf16_compute_keeps_float32_master_weights(tiny_model, sentiment_csv, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_model, sentiment_csv, tmp_path / "run", **{
        "training.bf16": "true", "training.max_steps": 4, "training.report_to": "[jsonl, tensorboard]"}))
    trainer = Trainer(cfg)
    results = trainer.train()
    assert trainer.model.dtype == jax.numpy.bfloat16
    assert {x.dtype for x in jax.tree.leaves(trainer.state.params)} == {np.dtype("float32")}
    assert np.isfinite(results["train"]["train_loss"])
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
