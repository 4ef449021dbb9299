"""End-to-end runs of the shared loop on a tiny BERT (one CPU device unless a test asks for a mesh)."""

import json
import os
import signal

import jax
import numpy as np
import pytest
import transformers

from conftest import tiny_overrides
from ftjax.config import load_config
from ftjax.errors import FtjaxError
from ftjax.trainer import Trainer


def _train(tiny_model, data, out, **extra):
    trainer = Trainer(load_config(None, tiny_overrides(tiny_model, data, out, **extra)))
    return trainer, trainer.train()


def _leaves(trainer):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(trainer.state.params))]


def test_train_writes_results_export_and_logs(tiny_model, sentiment_csv, tmp_path):
    trainer, results = _train(tiny_model, sentiment_csv, tmp_path / "run",
                              **{"training.num_train_epochs": 3, "training.export_pytorch": "true"})
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["validation"]["accuracy"] == results["validation"]["accuracy"]
    assert {"accuracy", "f1_macro", "f1_weighted", "precision_macro", "confusion_matrix"} <= set(results["test"])
    assert results["validation"]["num_examples"] == 12 and results["test"]["num_examples"] == 12
    train = results["train"]
    assert train["global_step"] == 3 * 12 and train["train_examples"] == 3 * 96
    assert train["compiles"]["train_step"] <= 2  # two buckets, no recompiles
    assert 0 < train["padding_efficiency"] <= 1
    losses = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train_losses = [r["train/loss"] for r in losses if "train/loss" in r]
    assert np.mean(train_losses[-3:]) < np.mean(train_losses[:3])
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    model = transformers.FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "export")
    assert model.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    for a, b in zip(jax.tree.leaves(model.params), _leaves(trainer)):
        np.testing.assert_array_equal(np.asarray(a), b)
    # PyTorch users load the same export with a pipeline (torch is in the test extras)
    assert results["train"]["pytorch_export"] is True
    text = "what a lovely movie"
    pipe = transformers.pipeline("text-classification", model=str(tmp_path / "run" / "export"), device="cpu")
    got = pipe(text)[0]
    flax_logits = model(**trainer.tokenizer(text, return_tensors="np")).logits[0]
    flax_probs = np.exp(flax_logits) / np.exp(flax_logits).sum()
    assert got["label"] == model.config.id2label[int(flax_probs.argmax())]
    assert got["score"] == pytest.approx(float(flax_probs.max()), abs=1e-4)


def test_same_seed_same_metrics(tiny_model, sentiment_csv, tmp_path):
    _, a = _train(tiny_model, sentiment_csv, tmp_path / "a")
    _, b = _train(tiny_model, sentiment_csv, tmp_path / "b")
    assert a["validation"] == b["validation"] and a["train"]["train_loss"] == b["train"]["train_loss"]


def test_resume_after_sigterm_ends_with_the_same_parameters(tiny_model, sentiment_csv, tmp_path, monkeypatch):
    common = {"training.max_steps": 9, "training.save_strategy": "steps", "training.save_steps": 100,
              "training.eval_strategy": "no"}
    full, _ = _train(tiny_model, sentiment_csv, tmp_path / "full", **common)

    original = Trainer.init_state

    def init_then_interrupt_at_step_4(self, total, **kwargs):
        original(self, total, **kwargs)
        step = self.train_step

        def wrapped(state, batch):
            state, metrics = step(state, batch)
            if int(state.step) == 4:
                os.kill(os.getpid(), signal.SIGTERM)
            return state, metrics
        self.train_step = wrapped
        self.train_step._cache_size = step._cache_size
        self.train_step.lower = step.lower  # FLOPs are read from the compiled step

    monkeypatch.setattr(Trainer, "init_state", init_then_interrupt_at_step_4)
    stopped, result = _train(tiny_model, sentiment_csv, tmp_path / "resumed", **common)
    assert "SIGTERM" in result["status"] and result["step"] == 4
    monkeypatch.setattr(Trainer, "init_state", original)
    resumed, results = _train(tiny_model, sentiment_csv, tmp_path / "resumed",
                              **common, **{"training.resume_from_checkpoint": "latest"})
    assert results["train"]["global_step"] == 9
    for a, b in zip(_leaves(full), _leaves(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_best_checkpoint_kept_and_loaded_with_early_stopping(tiny_model, sentiment_csv, tmp_path):
    trainer, results = _train(
        tiny_model, sentiment_csv, tmp_path / "run",
        **{"training.num_train_epochs": 30, "training.eval_strategy": "steps", "training.eval_steps": 3,
           "training.save_strategy": "steps", "training.save_steps": 3, "training.save_total_limit": 1,
           "training.load_best_model_at_end": "true", "training.early_stopping_patience": 2,
           "training.learning_rate": 5e-3})
    train = results["train"]
    assert train["stopped_by"] == "early_stopping" and train["global_step"] < 30 * 12
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert train["best_step"] in steps and len(steps) <= 2  # newest 1 + the best
    assert results["validation"]["loss"] == pytest.approx(train["best_metric"], rel=1e-5)


def test_nan_loss_stops_with_a_clear_message(tiny_model, sentiment_csv, tmp_path):
    with pytest.raises(FtjaxError, match="loss is nan|loss is inf"):
        _train(tiny_model, sentiment_csv, tmp_path / "run",
               **{"training.learning_rate": 1e30, "training.max_grad_norm": 0, "training.logging_steps": 1})


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_every_step_loss_is_in_its_log_window(tiny_model, sentiment_csv, tmp_path):
    """Evaluations and saves between log steps must not drop the steps they interrupt."""
    common = {"training.max_steps": 12, "training.dropout": "false", "training.save_strategy": "steps",
              "training.save_steps": 5, "training.eval_strategy": "steps", "training.eval_steps": 3}
    _train(tiny_model, sentiment_csv, tmp_path / "each", **common, **{"training.logging_steps": 1})
    _train(tiny_model, sentiment_csv, tmp_path / "four", **common, **{"training.logging_steps": 4})
    per_step = np.array([r["train/loss"] for r in _log(tmp_path / "each") if "train/loss" in r])
    windows = [(r["step"], r["train/loss"]) for r in _log(tmp_path / "four") if "train/loss" in r]
    assert [s for s, _ in windows] == [4, 8, 12] and len(per_step) == 12
    np.testing.assert_allclose([v for _, v in windows], per_step.reshape(3, 4).mean(1), rtol=1e-5)
    evals = [r["step"] for r in _log(tmp_path / "four") if "eval/loss" in r]
    assert evals == [3, 6, 9, 12]  # every 3 steps; the last step's evaluation is not repeated


def test_the_last_evaluation_counts_for_the_best_model(tiny_model, sentiment_csv, tmp_path, monkeypatch):
    """With epoch evaluation, the final step's evaluation is scored like the others (and exported)."""
    evaluate = Trainer.evaluate

    def later_is_better(self, split="validation"):  # a validation loss that falls with every evaluation
        metrics = evaluate(self, split)
        return {**metrics, "loss": 100.0 / self.step} if split == "validation" and self.state is not None else metrics

    monkeypatch.setattr(Trainer, "evaluate", later_is_better)
    trainer, results = _train(
        tiny_model, sentiment_csv, tmp_path / "run",
        **{"training.num_train_epochs": 2, "training.load_best_model_at_end": "true", "training.save_total_limit": 1})
    evals = {r["step"]: r["eval/loss"] for r in _log(tmp_path / "run") if "eval/loss" in r}
    assert sorted(evals) == [12, 24] and evals[24] < evals[12]
    best = 24
    assert results["train"]["best_step"] == best and results["train"]["best_metric"] == pytest.approx(evals[best])
    assert results["validation"]["loss"] == pytest.approx(evals[best], rel=1e-5)
    exported = transformers.FlaxAutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "export")
    for a, b in zip(jax.tree.leaves(exported.params), _leaves(trainer)):
        np.testing.assert_array_equal(np.asarray(a), b)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["task_options"] == {"text_pair_column": None, "problem_type": "auto"}
    assert config["model"]["name_or_path"] == tiny_model


def _eval_sizing(tiny_model, data, out, **extra):
    """A trainer whose evaluation batch starts at 2 rows per device, trained one epoch."""
    return _train(tiny_model, data, out, **{"training.per_device_eval_batch_size": 2, "training.num_train_epochs": 1,
                                            "training.eval_strategy": "no", "training.save_strategy": "no",
                                            "training.auto_eval_batch_size": "true", **extra})


def test_auto_eval_batch_size_takes_the_largest_size_that_fits(tiny_model, tmp_path):
    """With room for everything, evaluation batches grow to the split (64 validation rows, 2 -> 64);
    with the memory set between what 8 and 16 rows per device need, 8 is chosen; metrics are those
    of the configured size."""
    from conftest import write_sentiment_csv
    data = str(write_sentiment_csv(tmp_path / "reviews.csv", n=640))
    roomy, roomy_results = _eval_sizing(tiny_model, data, tmp_path / "roomy", **{"training.device_memory": "1TiB"})
    needs = roomy.eval_memory_needs
    assert roomy_results["train"]["per_device_eval_batch_size"] == 64
    assert sorted(needs) == [4, 8, 16, 32, 64] and all(needs[2 * k] > needs[k] for k in (4, 8, 16, 32))
    resident = sum(x.nbytes for x in jax.tree.leaves(roomy.state.opt_state))
    between = int((needs[8] + needs[16]) / 2 + resident) / Trainer.EVAL_MEMORY_FRACTION
    tight, _ = _eval_sizing(tiny_model, data, tmp_path / "tight", **{"training.device_memory": f"{int(between)}B"})
    assert tight.eval_rows_per_device(None) == 8 and sorted(tight.eval_memory_needs) == [4, 8, 16]
    fixed, fixed_results = _eval_sizing(tiny_model, data, tmp_path / "fixed",
                                        **{"training.auto_eval_batch_size": "false"})
    assert fixed_results["train"]["per_device_eval_batch_size"] == 2
    for split in ("validation", "test"):
        assert roomy_results[split]["accuracy"] == fixed_results[split]["accuracy"]
        assert roomy_results[split]["loss"] == pytest.approx(fixed_results[split]["loss"], rel=1e-5)


def test_auto_eval_batch_size_keeps_the_configured_size_where_memory_is_unknown(tiny_model, sentiment_csv,
                                                                                tmp_path, caplog):
    with caplog.at_level("INFO", logger="ftjax"):
        trainer, results = _eval_sizing(tiny_model, sentiment_csv, tmp_path / "run")
    assert results["train"]["per_device_eval_batch_size"] == 2 and trainer.eval_memory_needs == {}
    assert "reports no memory size" in caplog.text and "training.device_memory" in caplog.text
    with pytest.raises(FtjaxError, match="training.device_memory: cannot read 'lots'"):
        load_config(None, tiny_overrides(tiny_model, sentiment_csv, tmp_path, **{"training.device_memory": "lots"}))
