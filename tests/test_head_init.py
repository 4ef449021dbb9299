"""model.head_init: a new task head as Flax initialises it, or as PyTorch transformers does."""

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from conftest import tiny_overrides
from ftjax import models
from ftjax.config import ModelConfig, load_config
from ftjax.trainer import Trainer


def _placed(tiny_model, auto_class, head_init, **kwargs):
    model, weights = models.load_model(auto_class, ModelConfig(name_or_path=tiny_model), **kwargs)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, models.abstract_params(model))
    return model, flatten_dict(weights), flatten_dict(models.place_params(model, weights, shardings, head_init))


@pytest.mark.parametrize("auto_class, kwargs", [
    ("FlaxAutoModelForSequenceClassification", {"num_labels": 3}),
    ("FlaxAutoModelForTokenClassification", {"num_labels": 21}),
    ("FlaxAutoModelForQuestionAnswering", {})], ids=["classification", "ner", "qa"])
def test_initializer_range_head_has_its_std_and_leaves_pretrained_weights_alone(tiny_model, auto_class, kwargs):
    model, loaded, params = _placed(tiny_model, auto_class, "initializer_range", **kwargs)
    _, _, flax_default = _placed(tiny_model, auto_class, "flax_default", **kwargs)
    new = [k for k in params if k not in loaded]
    kernels = [k for k in new if k[-1] == "kernel"]
    assert kernels and len(new) == 2 * len(kernels)  # one Dense head: kernel + bias
    std = model.config.initializer_range
    for k in kernels:
        values = np.asarray(params[k])
        assert abs(values.mean()) < 0.3 * std and values.std() == pytest.approx(std, rel=0.3)
        # Flax's lecun-normal default: std 1/sqrt(hidden) = 0.18 for this hidden-32 model
        assert np.asarray(flax_default[k]).std() == pytest.approx(1 / np.sqrt(values.shape[0]), rel=0.3)
    for k in new:
        if k[-1] == "bias":
            assert not np.asarray(params[k]).any()
    for k in loaded:  # the checkpoint's leaves are exactly the checkpoint's
        np.testing.assert_array_equal(np.asarray(params[k]), np.asarray(loaded[k]))


def test_head_init_from_the_config(tiny_model, sentiment_csv, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_model, sentiment_csv, tmp_path / "run",
                                           **{"model.head_init": "initializer_range"}))
    trainer = Trainer(cfg)
    kernel = np.asarray(trainer.model.params["classifier"]["kernel"])
    assert kernel.std() == pytest.approx(trainer.model.config.initializer_range, rel=0.3)
    with pytest.raises(Exception, match="head_init"):
        load_config(None, ["model.head_init=pytorch"])
