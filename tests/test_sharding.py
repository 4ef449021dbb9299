"""Data-parallel, FSDP and tensor-parallel runs on 8 simulated CPU devices follow the 1-device run."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_overrides, write_sentiment_csv
from ftjax.config import MeshConfig, load_config
from ftjax.errors import FtjaxError
from ftjax.sharding import make_mesh, param_spec
from ftjax.trainer import Trainer


def test_mesh_axes_and_errors():
    assert jax.device_count() == 8
    mesh = make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(FtjaxError, match="devices"):
        make_mesh(MeshConfig(data=-1, fsdp=3, tensor=1))


def test_partition_rules_for_bert_paths():
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    q = "bert/encoder/layer/0/attention/self/query/kernel"
    assert param_spec(q, (256, 256), mesh, 1024) == P("fsdp", "tensor")
    assert param_spec("bert/encoder/layer/0/attention/output/dense/kernel", (256, 256), mesh, 1024) == P("tensor", "fsdp")
    assert param_spec("bert/encoder/layer/0/intermediate/dense/kernel", (256, 1024), mesh, 1024) == P("fsdp", "tensor")
    assert param_spec("bert/encoder/layer/0/output/dense/kernel", (1024, 256), mesh, 1024) == P("tensor", "fsdp")
    assert param_spec("bert/encoder/layer/0/attention/self/query/bias", (256,), mesh, 1024) == P("tensor")
    assert param_spec("bert/embeddings/LayerNorm/scale", (256,), mesh, 1024) == P(None)
    assert param_spec("opt/0/mu/" + q, (255, 256), mesh, 1024) == P(None, "tensor")  # 255 not divisible


def _losses(tiny_model, data, out, mesh, per_device_batch):
    cfg = load_config(None, tiny_overrides(
        tiny_model, data, out, **{"training.max_steps": 6, "training.logging_steps": 1,
                                  "training.dropout": "false", "training.eval_strategy": "no",
                                  "training.save_strategy": "no", "mesh.fsdp_min_size": 256,
                                  "training.per_device_train_batch_size": per_device_batch,
                                  **{f"mesh.{k}": v for k, v in mesh.items()}}))
    trainer = Trainer(cfg)
    results = trainer.train()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return trainer, results, np.array([r["train/loss"] for r in log if "train/loss" in r])


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """The data file and the 1-device loss curve every sharded run is compared with."""
    folder = tmp_path_factory.mktemp("sharding")
    data = str(write_sentiment_csv(folder / "reviews.csv"))
    return data, _losses(tiny_model, data, folder / "one", {"data": 1, "fsdp": 1, "tensor": 1}, 8)[2]


@pytest.mark.parametrize("name,mesh,per_device", [
    ("data_parallel", {"data": 8, "fsdp": 1, "tensor": 1}, 1),
    ("fsdp", {"data": 1, "fsdp": 8, "tensor": 1}, 1),
    ("tensor_parallel", {"data": 2, "fsdp": 1, "tensor": 4}, 4),
])
def test_sharded_runs_follow_the_single_device_loss_curve(tiny_model, reference, tmp_path, name, mesh, per_device):
    data, expected = reference
    trainer, results, losses = _losses(tiny_model, data, tmp_path / name, mesh, per_device)
    assert len(losses) == len(expected) == 6
    np.testing.assert_allclose(losses, expected, rtol=2e-5, atol=2e-6)
    assert results["train"]["mesh"] == mesh
    kernel = trainer.state.params["bert"]["encoder"]["layer"]["0"]["intermediate"]["dense"]["kernel"]
    spec = kernel.sharding.spec
    expected_axis = {"data_parallel": None, "fsdp": "fsdp", "tensor_parallel": "tensor"}[name]
    if expected_axis:
        assert expected_axis in tuple(spec), spec
        assert len(kernel.addressable_shards[0].data.reshape(-1)) < kernel.size  # really split
    else:
        assert all(a is None for a in spec)
