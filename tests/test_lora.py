"""LoRA and frozen parameters: pure functions, the shared loop, sharding, resume and PEFT's format."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax.traverse_util import flatten_dict

from conftest import tiny_overrides, write_sentiment_csv
from ftjax.config import LoraConfig, ModelConfig, load_config
from ftjax.errors import FtjaxError
from ftjax.lora import Adaptation, export_peft
from ftjax.trainer import Trainer

QUERY = ("bert", "encoder", "layer", "0", "attention", "self", "query")


def _flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in flatten_dict(jax.device_get(tree)).items()}


def _bert_shapes():
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, num_labels=3)
    model = transformers.FlaxBertForSequenceClassification(config, seed=0)
    return model, model.params


# ---- config and pure functions -------------------------------------------------------------------

@pytest.mark.parametrize("override,message", [
    ("model.lora.rank=0", "'model.lora.rank': must be > 0"),
    ('model.lora.targets=["(query"]', "'model.lora.targets': regex '\\(query' does not compile"),
    ('model.freeze=["[bert"]', "'model.freeze': regex"),
    ("model.lora.dropout=1.0", "'model.lora.dropout': must be in \\[0, 1\\)"),
    ("model.lora.rnk=4", "unknown config key 'model.lora.rnk'; did you mean 'model.lora.rank'"),
])
def test_bad_lora_config_fails_at_load_with_one_line(override, message):
    with pytest.raises(FtjaxError, match=message) as e:
        load_config(None, ["model.lora={}", override])
    assert "\n" not in str(e.value)


def test_a_target_matching_nothing_names_the_familys_weight_matrices():
    model, params = _bert_shapes()
    cfg = ModelConfig(lora=LoraConfig(targets=["q_proj"]))
    with pytest.raises(FtjaxError, match="'q_proj' matches no weight matrix of this bert model; its weight "
                                         "matrices are named query, key, value, dense, classifier$"):
        Adaptation.build(cfg, "bert", params, params)
    with pytest.raises(FtjaxError, match="model.freeze: 'nothing_here' matches no parameter"):
        Adaptation.build(ModelConfig(freeze=["nothing_here"]), "bert", params, params)


def test_effective_weights_start_at_the_base_and_add_scaled_low_rank_update():
    model, params = _bert_shapes()
    base = {k: v for k, v in params.items() if k != "classifier"}  # the checkpoint lacks the head
    adapt = Adaptation.build(ModelConfig(lora=LoraConfig(rank=4, alpha=8)), "bert", params, base)
    assert len(adapt.targets) == 4 and all(t.endswith(("query/kernel", "value/kernel")) for t in adapt.targets)
    trainable, frozen = adapt.split(params, jax.random.PRNGKey(0))
    names = set(_flat(trainable))
    assert names == {f"bert/encoder/layer/{i}/attention/self/{m}/lora_{ab}" for i in "01" for m in ("query", "value")
                     for ab in "ab"} | {"classifier/kernel", "classifier/bias"}
    merged = adapt.effective(trainable, frozen)
    for k, v in _flat(params).items():  # B = 0: exactly the base model
        np.testing.assert_array_equal(_flat(merged)[k], v)
    lora_a = trainable["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["lora_a"]
    assert float(jnp.abs(lora_a).max()) > 0  # A is random, B carries the zero
    trainable["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["lora_b"] = jnp.ones((4, 16))
    kernel = _flat(adapt.effective(trainable, frozen))["/".join(QUERY) + "/kernel"]
    np.testing.assert_allclose(kernel, _flat(params)["/".join(QUERY) + "/kernel"] + 2.0 * lora_a @ np.ones((4, 16)),
                               rtol=1e-6)


def test_unmerged_branches_equal_the_merged_weights_and_dropout_drops():
    model, params = _bert_shapes()
    cfg = ModelConfig(lora=LoraConfig(rank=4, alpha=8, dropout=0.5))
    adapt = Adaptation.build(cfg, "bert", params, {k: v for k, v in params.items() if k != "classifier"})
    trainable, frozen = adapt.split(params, jax.random.PRNGKey(0))
    trainable = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(1), x.shape), trainable)
    ids = jnp.array([[2, 7, 9, 11, 3]])
    merged = model(ids, params=adapt.effective(trainable, frozen)).logits
    base = model(ids, params=adapt.effective(trainable, frozen, merge=False)).logits
    no_dropout = dataclasses.replace(adapt, dropout=0.0)
    with no_dropout.branches(trainable, jax.random.PRNGKey(2)):
        branched = model(ids, params=no_dropout.effective(trainable, frozen, merge=False)).logits
    np.testing.assert_allclose(branched, merged, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(merged - base)).max() > 1e-3  # the adapters are really there
    with adapt.branches(trainable, jax.random.PRNGKey(2)):
        dropped = model(ids, params=adapt.effective(trainable, frozen, merge=False)).logits
    assert np.abs(np.asarray(dropped - merged)).max() > 1e-4


# ---- the shared loop -----------------------------------------------------------------------------

def _train(tiny_model, data, out, **extra):
    trainer = Trainer(load_config(None, tiny_overrides(
        tiny_model, data, out, **{"training.max_steps": 8, "training.logging_steps": 1, "training.dropout": "false",
                                  "training.eval_strategy": "no", "training.save_strategy": "no",
                                  "training.learning_rate": 1e-2, "training.lr_scheduler_type": "constant",
                                  **extra})))  # constant: a 4-step run is the first half of an 8-step one
    base = _flat(trainer.model.params)
    results = trainer.train()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return trainer, base, results, np.array([r["train/loss"] for r in log if "train/loss" in r])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(write_sentiment_csv(tmp_path_factory.mktemp("lora") / "reviews.csv"))


SAVE_AT_4 = {"training.save_strategy": "steps", "training.save_steps": 4}


@pytest.fixture(scope="module")
def lora_run(tiny_model, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-run")
    return _train(tiny_model, data, out / "run", **{"model.lora": "{rank: 4, alpha: 8}", **SAVE_AT_4}) + (out / "run",)


def test_lora_trains_only_adapters_and_the_new_head(lora_run):
    trainer, base, results, losses, _ = lora_run
    trainable = _flat(trainer.state.params)
    assert all(k.endswith(("lora_a", "lora_b")) or k.startswith("classifier/") for k in trainable)
    assert sum(k.endswith("lora_b") for k in trainable) == 4  # query + value, 2 layers
    # Adam moments exist only for what trains: the frozen base has no optimizer state.
    moments = [x for x in jax.tree.leaves(trainer.state.opt_state) if getattr(x, "ndim", 0) > 0]
    assert sorted(x.shape for x in moments) == sorted([v.shape for v in trainable.values()] * 2)
    assert results["train"]["trainable_parameters"] == sum(v.size for v in trainable.values())
    assert results["train"]["frozen_parameters"] > 50 * results["train"]["trainable_parameters"]
    frozen = _flat(trainer.frozen)  # unchanged, bit for bit
    assert set(frozen) == set(base) - {"classifier/kernel", "classifier/bias"}
    for k, v in frozen.items():
        np.testing.assert_array_equal(v, base[k])
    assert all(np.abs(v).max() > 0 for k, v in trainable.items() if k.endswith("lora_b"))  # B moved off zero
    assert losses[-3:].mean() < losses[:3].mean()
    # The merged model is what evaluation ran and what was exported.
    merged = _flat(trainer.params())
    q = "bert/encoder/layer/0/attention/self/query/"
    np.testing.assert_allclose(merged[q + "kernel"], base[q + "kernel"] + 2.0 * trainable[q + "lora_a"] @ trainable[
        q + "lora_b"], rtol=1e-5, atol=1e-6)
    export = transformers.FlaxAutoModelForSequenceClassification.from_pretrained(lora_run[-1] / "export")
    for k, v in _flat(export.params).items():
        np.testing.assert_array_equal(v, merged[k])


def test_peft_loads_the_adapter_and_gives_ftjax_logits(tiny_model, lora_run):
    import peft
    import torch
    from transformers.modeling_flax_pytorch_utils import load_flax_checkpoint_in_pytorch_model
    trainer, *_, out = lora_run
    config = json.loads((out / "export" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["modules_to_save"] == ["classifier"]
    base = transformers.BertForSequenceClassification(transformers.AutoConfig.from_pretrained(tiny_model, num_labels=3))
    load_flax_checkpoint_in_pytorch_model(base.bert, tiny_model + "/flax_model.msgpack")  # a base checkpoint
    model = peft.PeftModel.from_pretrained(base, str(out / "export" / "adapter")).eval()
    enc = trainer.tokenizer(["what a lovely movie", "the plot felt awful and bad"], padding=True, return_tensors="np")
    with torch.no_grad():
        torch_logits = model(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()
    flax_logits = np.asarray(trainer.model(**enc, params=trainer.params()).logits)
    np.testing.assert_allclose(torch_logits, flax_logits, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_peft_round_trip_for_causal_lm_families(family, tmp_path):
    """GPT-2 (Flax kernels [out, in], PEFT's fan_in_fan_out) and Llama (q_proj / v_proj)."""
    import peft
    import torch
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model
    config = (transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
              if family == "gpt2" else
              transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    flax_model = transformers.FlaxAutoModelForCausalLM.from_config(config, seed=0)
    params = flax_model.params
    adapt = Adaptation.build(ModelConfig(lora=LoraConfig(rank=2, alpha=4)), family, params, params)
    trainable, frozen = adapt.split(params, jax.random.PRNGKey(1))
    trainable = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(2), x.shape), trainable)
    export_peft(adapt, trainable, tmp_path / "adapter", "FlaxAutoModelForCausalLM", lora_alpha=4)
    torch_model = load_flax_weights_in_pytorch_model(transformers.AutoModelForCausalLM.from_config(config),
                                                     jax.device_get(params))
    torch_model = peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "adapter")).eval()
    ids = np.array([[1, 5, 9, 22, 3, 40, 7, 11]])
    with torch.no_grad():
        torch_logits = torch_model(input_ids=torch.tensor(ids)).logits.numpy()
    merged = adapt.effective(trainable, frozen)
    flax_logits = np.asarray(flax_model(ids, params=merged).logits)
    assert np.abs(flax_logits - np.asarray(flax_model(ids, params=params).logits)).max() > 1e-3  # adapter matters
    np.testing.assert_allclose(torch_logits, flax_logits, atol=1e-4)


def test_lora_with_dropout_trains(tiny_model, data, tmp_path):
    _, _, results, losses = _train(tiny_model, data, tmp_path / "run", **{
        "model.lora": "{rank: 4, alpha: 8, dropout: 0.1}", "training.dropout": "true"})
    assert np.isfinite(losses).all() and losses[-3:].mean() < losses[:3].mean()
    config = json.loads((tmp_path / "run" / "export" / "adapter" / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.1


def test_freeze_trains_only_the_head(tiny_model, data, tmp_path):
    trainer, base, results, losses, = _train(tiny_model, data, tmp_path / "run", **{"model.freeze": "[^bert/]"})
    assert set(_flat(trainer.state.params)) == {"classifier/kernel", "classifier/bias"}
    moments = [x for x in jax.tree.leaves(trainer.state.opt_state) if getattr(x, "ndim", 0) > 0]
    assert sorted(x.shape for x in moments) == sorted([(32, 3), (3,)] * 2)
    for k, v in _flat(trainer.frozen).items():
        np.testing.assert_array_equal(v, base[k])
    assert not (tmp_path / "run" / "export" / "adapter").exists()
    assert losses[-3:].mean() < losses[:3].mean()


def test_lora_resume_ends_with_the_same_adapters(tiny_model, data, lora_run, tmp_path):
    straight = lora_run[0]  # 8 steps in one go
    lora = {"model.lora": "{rank: 4, alpha: 8}", **SAVE_AT_4}
    _train(tiny_model, data, tmp_path / "resumed", **lora, **{"training.max_steps": 4})
    resumed = _train(tiny_model, data, tmp_path / "resumed", **lora,
                     **{"training.resume_from_checkpoint": "latest", "training.max_steps": 8})[0]
    assert int(resumed.state.step) == 8
    for k, v in _flat(straight.state.params).items():
        np.testing.assert_allclose(_flat(resumed.state.params)[k], v, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mesh,per_device", [({"data": 1, "fsdp": 8, "tensor": 1}, 1),
                                             ({"data": 2, "fsdp": 1, "tensor": 4}, 4)], ids=["fsdp", "tensor"])
def test_sharded_lora_follows_the_single_device_run(tiny_model, data, lora_run, tmp_path, mesh, per_device):
    _, _, _, expected, _ = lora_run
    trainer, _, _, losses = _train(tiny_model, data, tmp_path / "run", **{
        "model.lora": "{rank: 4, alpha: 8}", "mesh.fsdp_min_size": 64, "training.per_device_train_batch_size": per_device,
        **{f"mesh.{k}": v for k, v in mesh.items()}})
    np.testing.assert_allclose(losses, expected, rtol=2e-5, atol=2e-6)
    query = trainer.state.params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]
    a, b = query["lora_a"].sharding.spec, query["lora_b"].sharding.spec
    if "fsdp" in mesh and mesh["fsdp"] > 1:  # A [32, 4]: its input dimension split over fsdp
        assert tuple(a) == ("fsdp", None) and len(query["lora_a"].addressable_shards[0].data) == 32 // 8
    else:  # a column-parallel kernel: B's output features split like the kernel's
        assert tuple(b) == (None, "tensor") and query["lora_b"].addressable_shards[0].data.shape == (4, 8)
