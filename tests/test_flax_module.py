"""model.flax_module: a plain flax.linen / flax.nnx model trained, sharded, exported and reloaded by
ftjax without transformers' Flax classes (ftjax/flax_module.py, ftjax/example_models.py)."""

import json

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from conftest import tiny_overrides
from ftjax import cli, models
from ftjax.config import load_config
from ftjax.errors import FtjaxError
from ftjax.trainer import Trainer
from test_large_models import _check_layout

FACTORIES = {"linen": "ftjax.example_models:linen_encoder", "nnx": "ftjax.example_models:nnx_encoder"}
SMALL = {"model.config_overrides.hidden": 32, "model.config_overrides.layers": 2, "model.config_overrides.max_length": 64}


def _overrides(kind, model, data, out, **extra):
    return tiny_overrides(model, data, out, **{"model.flax_module": FACTORIES[kind], **SMALL, **extra})


def _losses(out) -> list[float]:
    return [r["train/loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "train/loss" in r]


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_flax_module_trains_from_the_cli_and_its_export_evaluates_and_predicts(kind, tiny_model, sentiment_csv,
                                                                                tmp_path):
    out, config = tmp_path / "run", tmp_path / "classification.yaml"
    config.write_text("task: classification\n")
    args = _overrides(kind, tiny_model, sentiment_csv, out, **{"training.num_train_epochs": 6})
    assert cli.main(["train", str(config), *args]) == 0
    losses = _losses(out)
    assert len(losses) >= 4 and losses[-1] < 0.8 * losses[0]  # it learns the one-word labels
    export = out / "export"
    assert (export / "ftjax_module.json").is_file() and (export / "flax_model.msgpack").is_file()
    assert not (export / "config.json").exists()  # no transformers config pretends to describe it
    saved = json.loads((export / "ftjax_module.json").read_text())
    assert saved["flax_module"] == FACTORIES[kind] and saved["module_kwargs"]["hidden"] == 32
    final = json.loads((out / "results.json").read_text())["validation"]
    again = cli.cmd_eval(load_config(None, args), None)  # OUTPUT_DIR/export: the saved weights, not a fresh init
    assert again["validation"]["accuracy"] == pytest.approx(final["accuracy"])
    assert again["validation"]["loss"] == pytest.approx(final["loss"], rel=1e-5)
    (tmp_path / "in.jsonl").write_text('{"text": "the movie was great"}\n{"text": "awful plot"}\n')
    assert cli.main(["predict", str(config), *[a for a in args if not a.startswith("model.flax_module")],  # read from the export
                     "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "pred.jsonl")]) == 0
    preds = [json.loads(x)["prediction"] for x in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert len(preds) == 2 and {p["label"] for p in preds} <= {"positive", "negative", "neutral"}


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_flax_module_is_sharded_from_birth_and_follows_the_unsharded_loss_curve(kind, tiny_model, sentiment_csv,
                                                                                 tmp_path):
    def run(name, per_device_batch, **mesh):
        extra = {"training.max_steps": 4, "training.logging_steps": 1, "training.eval_strategy": "no",
                 "training.save_strategy": "no", "training.dropout": "false", "mesh.fsdp_min_size": 256,
                 "training.per_device_train_batch_size": per_device_batch, **mesh}
        return Trainer(load_config(None, _overrides(kind, tiny_model, sentiment_csv, tmp_path / name, **extra)))

    sharded = run("fsdp", 1, **{"mesh.fsdp": 8})
    _check_layout(sharded.model.params, sharded.param_shardings(models.abstract_params(sharded.model)))
    sharded.train()
    _check_layout(sharded.state.opt_state, sharded.state_shardings.opt_state)
    single = run("single", 8)
    single.train()
    np.testing.assert_allclose(_losses(tmp_path / "fsdp"), _losses(tmp_path / "single"), rtol=2e-5)


def test_flax_module_gradient_checkpointing_gives_the_same_gradients(tiny_model, sentiment_csv, tmp_path):
    """linen: the layers (named by index) rematerialised by ftjax.remat; nnx: refused with one line."""
    grads = []
    for remat in ("false", "true"):
        trainer = Trainer(load_config(None, _overrides("linen", tiny_model, sentiment_csv, tmp_path / remat, **{
            "training.gradient_checkpointing": remat, "training.dropout": "true"})))
        batch = next(iter(trainer.batcher("train").batches(0, 0, 1)))
        loss_fn = Trainer.loss_fn(trainer.task, trainer.model, trainer.args)
        total = lambda p: (lambda s: s[0] / s[1])(loss_fn(p, batch, jax.random.PRNGKey(3)))  # noqa: E731
        jaxpr = str(jax.make_jaxpr(jax.grad(total))(trainer.model.params))
        assert ("remat" in jaxpr or "checkpoint" in jaxpr) == (remat == "true")
        grads.append(flatten_dict(jax.jit(jax.grad(total))(trainer.model.params)))
    for k in grads[0]:
        np.testing.assert_allclose(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7)
    with pytest.raises(FtjaxError, match="nnx.remat"):
        Trainer(load_config(None, _overrides("nnx", tiny_model, sentiment_csv, tmp_path / "nnx", **{
            "training.gradient_checkpointing": "true"}))).init_state(total_steps=1)


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_flax_module_covers_ner_mlm_and_qa_heads(kind, tiny_model):
    """The example factories give each task's output shapes through the adapter."""
    for extra, key, shape in [({"num_labels": 5}, "logits", (2, 8, 5)), ({}, "logits", (2, 8, 100)),
                              ({"head": "span"}, "start_logits", (2, 8))]:
        if extra.get("num_labels"):
            extra["head"] = "tokens"
        model, weights = models.load_module_model(FACTORIES[kind], None, {"hidden": 16, **extra}, 100,
                                                  jax.numpy.float32, 0)
        params = jax.jit(model.init_weights)(model.key)
        ids = np.ones((2, 8), np.int32)
        assert weights is None and getattr(model(ids, ids, params=params), key).shape == shape


@pytest.mark.parametrize("setting,message", [
    ({"model.flax_module": "ftjax.example_models"}, "is not 'package.module:factory'"),
    ({"model.flax_module": "ftjax.no_such_module:f"}, "cannot import 'ftjax.no_such_module'"),
    ({"model.flax_module": "ftjax.example_models:missing"}, "has no 'missing'"),
    ({"model.flax_module": "ftjax.example_models:LinenLayer"}, "LinenLayer.*unexpected keyword"),
    ({"model.flax_module": "ftjax.example_models:linen_encoder", "task": "seq2seq"}, "seq2seq needs a transformers"),
])
def test_flax_module_bad_settings_fail_with_one_line(setting, message, tiny_model, sentiment_csv, tmp_path):
    with pytest.raises(FtjaxError, match=message):
        Trainer(load_config(None, tiny_overrides(tiny_model, sentiment_csv, tmp_path, **setting)))


@pytest.mark.parametrize("task,kind,extra", [
    ("mlm", "linen", {}),  # per-token vocabulary logits, read at the masked positions
    ("clm", "nnx", {"model.config_overrides.causal": "true"}),
    ("ner", "linen", {"model.config_overrides.head": "tokens"}),
])
def test_flax_module_trains_the_token_tasks_end_to_end(task, kind, extra, tiny_model, tmp_path):
    """MLM, CLM (Lee corpus blocks) and NER (CoNLL-style rows) through the same loop and evaluation."""
    from test_language_modeling import lm_overrides
    if task == "ner":
        rows = [{"tokens": ["Alice", "met", "Bob", "in", "Paris", "today"], "ner_tags": ["B-PER", "O", "B-PER", "O", "B-LOC", "O"]},
                {"tokens": ["Bob", "went", "to", "Rome"], "ner_tags": ["B-PER", "O", "O", "B-LOC"]}] * 20
        data = tmp_path / "ner.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        args = tiny_overrides(tiny_model, str(data), tmp_path / "run", **{
            "task": "ner", "data.text_column": "tokens", "data.label_column": "ner_tags", "training.max_steps": 6,
            "model.flax_module": FACTORIES[kind], **SMALL, **extra})
    else:
        args = lm_overrides(tiny_model, tmp_path / "run", task=task, **{
            "training.max_steps": 6, "training.eval_strategy": "steps", "training.eval_steps": 6,
            "data.max_eval_samples": 10, "model.flax_module": FACTORIES[kind], **SMALL, **extra})
    results = Trainer(load_config(None, args)).train()
    losses = _losses(tmp_path / "run")
    assert np.isfinite(results["validation"]["loss"]) and losses[-1] < losses[0]
