"""Data-parallel, FSDP and tensor-parallel runs on 8 simulated CPU devices follow the 1-device run."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_overrides, write_sentiment_csv
from ftjax.config import MeshConfig, load_config
from ftjax.errors import FtjaxError
from ftjax.sharding import DEFAULT_TP_RULES, make_mesh, param_spec, tree_shardings
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



def test_default_rules_are_data_and_give_todays_specs():
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    q = "bert/encoder/layer/0/attention/self/query/kernel"
    cases = {  # path: (shape, spec) of the hard-coded rules this list replaced
        q: ((256, 256), P("fsdp", "tensor")),
        "bert/encoder/layer/0/attention/self/value/bias": ((256,), P("tensor")),
        "bert/encoder/layer/0/attention/output/dense/kernel": ((256, 256), P("tensor", "fsdp")),
        "bert/encoder/layer/0/attention/output/dense/bias": ((256,), P(None)),
        "bert/encoder/layer/0/intermediate/dense/kernel": ((256, 1024), P("fsdp", "tensor")),
        "bert/encoder/layer/0/intermediate/dense/bias": ((1024,), P("tensor")),
        "bert/encoder/layer/0/output/dense/kernel": ((1024, 256), P("tensor", "fsdp")),
        "bert/encoder/layer/0/output/LayerNorm/scale": ((256,), P(None)),
        "bert/embeddings/word_embeddings/embedding": ((30522, 256), P("fsdp", None)),
        "bert/pooler/dense/kernel": ((256, 256), P(None, "fsdp")),
        "opt/0/v_row/" + q: ((256,), P(None)),  # Adafactor's factored row: no 1-d rule for a kernel
        "opt/0/mu/" + q: ((256, 6), P("fsdp", None)),  # 6 not divisible by 4: replicated on tensor
    }
    cfg = load_config(None, [])
    assert cfg.mesh.rules == []
    for path, (shape, spec) in cases.items():
        assert param_spec(path, shape, mesh, 1024) == spec, path
        assert param_spec(path, shape, mesh, 1024, cfg.mesh.rules) == spec, path
        assert param_spec(path, shape, mesh, 1024, DEFAULT_TP_RULES) == spec, path
    tensor_only = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
    assert param_spec(q, (256, 256), tensor_only, 1024) == P(None, "tensor")
    data_only = make_mesh(MeshConfig(data=8, fsdp=1, tensor=1))
    assert param_spec(q, (256, 256), data_only, 1024) == P(None, None)  # size-1 axes are dropped


def test_custom_rules_from_the_config_change_the_spec():
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
    cfg = load_config(None, ['mesh.rules=[["query/kernel$", [tensor, null]], [".*", [null, null]]]'])
    assert cfg.mesh.rules == [("query/kernel$", ["tensor", None]), (".*", [None, None])]
    rules = cfg.mesh.rules
    base = "bert/encoder/layer/0/attention/"
    assert param_spec(base + "self/query/kernel", (256, 256), mesh, 1024, rules) == P("tensor", None)
    assert param_spec(base + "self/key/kernel", (256, 256), mesh, 1024, rules) == P(None, None)  # catch-all
    assert param_spec(base + "self/key/kernel", (256, 256), mesh, 1024) == P(None, "tensor")  # the defaults
    assert param_spec(base + "self/query/bias", (256,), mesh, 1024, rules) == P(None)  # no 1-d rule
    # A rule naming fsdp takes that dimension; FSDP then leaves the array alone.
    fsdp = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    rules = load_config(None, ['mesh.rules=[["query/kernel$", [fsdp, tensor]]]']).mesh.rules
    assert param_spec(base + "self/query/kernel", (256, 256), fsdp, 1024, rules) == P("fsdp", "tensor")
    params = {"bert": {"encoder": {"layer": {"0": {"attention": {"self": {"query": {
        "kernel": jax.ShapeDtypeStruct((256, 256), np.float32)}}}}}}}}
    (sharding,) = jax.tree.leaves(tree_shardings(params, fsdp, 1024, rules))
    assert sharding.spec == P("fsdp", "tensor")


@pytest.mark.parametrize("rules,message", [
    ('[["query/kernel$", [null, tensr]]]', "'tensr' is not one of data / fsdp / tensor; did you mean 'tensor'"),
    ('[["(query", [null, tensor]]]', "rule 0 regex '\\(query' does not compile"),
    ('[["query/kernel$"]]', "cannot use"),
    ('[[["query"], [null, tensor]]]', "cannot use"),
    ('query', "cannot use"),
])
def test_a_bad_rule_fails_at_load(rules, message):
    with pytest.raises(FtjaxError, match="config key 'mesh.rules'") as e:
        load_config(None, [f"mesh.rules={rules}"])
    assert e.match(message) and "\n" not in str(e.value)

def _losses(tiny_model, data, out, mesh, per_device_batch, **extra):
    cfg = load_config(None, tiny_overrides(
        tiny_model, data, out, **{"training.max_steps": 6, "training.logging_steps": 1,
                                  "training.dropout": "false", "training.eval_strategy": "no",
                                  "training.save_strategy": "no", "mesh.fsdp_min_size": 256,
                                  "training.per_device_train_batch_size": per_device_batch,
                                  **{f"mesh.{k}": v for k, v in mesh.items()}, **extra}))
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
    ("tensor_parallel_2", {"data": 4, "fsdp": 1, "tensor": 2}, 2),  # MiniLM's 30,522 rows split in 2
])
def test_sharded_runs_follow_the_single_device_loss_curve(tiny_model, reference, tmp_path, name, mesh, per_device):
    data, expected = reference
    trainer, results, losses = _losses(tiny_model, data, tmp_path / name, mesh, per_device)
    assert len(losses) == len(expected) == 6
    np.testing.assert_allclose(losses, expected, rtol=2e-5, atol=2e-6)
    assert results["train"]["mesh"] == mesh
    kernel = trainer.state.params["bert"]["encoder"]["layer"]["0"]["intermediate"]["dense"]["kernel"]
    spec = kernel.sharding.spec
    expected_axis = {"data_parallel": None, "fsdp": "fsdp", "tensor_parallel": "tensor", "tensor_parallel_2": "tensor"}[name]
    if expected_axis:
        assert expected_axis in tuple(spec), spec
        assert len(kernel.addressable_shards[0].data.reshape(-1)) < kernel.size  # really split
    else:
        assert all(a is None for a in spec)
    embedding = trainer.state.params["bert"]["embeddings"]["word_embeddings"]["embedding"].sharding.spec
    # vocabulary-parallel where the tensor axis divides the 30,522 rows (2 does, 4 does not)
    assert (tuple(embedding)[:1] == ("tensor",)) == (name == "tensor_parallel_2")


@pytest.mark.parametrize("extra", [
    {"model.from_scratch": "true"},  # initialised by jit(init, out_shardings=...): born sharded
    {"training.gradient_checkpointing": "true"},  # transformers' own remat of BERT layers
    {"training.gradient_checkpointing": "true", "training.remat_policy": "dots_saveable"},  # ftjax's
], ids=["from_scratch", "remat", "remat_dots_saveable"])
def test_fsdp_runs_follow_the_single_device_loss_curve(tiny_model, reference, tmp_path, extra):
    data, pretrained = reference
    one = _losses(tiny_model, data, tmp_path / "one", {"data": 1, "fsdp": 1, "tensor": 1}, 8, **extra)[2]
    if "model.from_scratch" not in extra:  # recomputing activations changes nothing but memory
        np.testing.assert_allclose(one, pretrained, rtol=2e-5, atol=2e-6)
    _, _, fsdp = _losses(tiny_model, data, tmp_path / "fsdp", {"data": 1, "fsdp": 8, "tensor": 1}, 1, **extra)
    np.testing.assert_allclose(fsdp, one, rtol=2e-5, atol=2e-6)
