"""Models larger than one device: parameters and optimizer state sharded from birth (8 simulated
devices, mesh.fsdp=8), pretrained weights loaded without a random init, gradient checkpointing."""

import collections
import contextlib
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax.traverse_util import flatten_dict

from conftest import MINILM, tiny_family, tiny_overrides
from ftjax import cli, models, plan, remat
from ftjax.config import ModelConfig, load_config
from ftjax.errors import FtjaxError
from ftjax.memory import parse_bytes
from ftjax.paths import resolve_path
from ftjax.sharding import bytes_per_device, tree_shardings
from ftjax.trainer import Trainer
from processes import cli_env


def _per_device(tree) -> dict:
    """Bytes each device really holds of a pytree of arrays."""
    held = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] += shard.data.nbytes
    return held


def _check_layout(tree, shardings) -> None:
    """Every leaf has its rule's sharding and no device holds more than its 1/8 of the sharded
    bytes plus the small replicated leaves."""
    leaves, rules = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    assert len(leaves) == len(rules)
    for leaf, sharding in zip(leaves, rules):
        assert leaf.sharding == sharding
    total = sum(x.nbytes for x in leaves)
    replicated = sum(x.nbytes for x in leaves if x.sharding.is_fully_replicated)
    held = _per_device(tree)
    assert len(held) == 8
    assert max(held.values()) == bytes_per_device(tree, shardings)
    assert max(held.values()) <= (total - replicated) / 8 + replicated
    assert replicated < 0.05 * total and max(held.values()) < 0.2 * total


@pytest.mark.parametrize("from_scratch", [False, True], ids=["pretrained", "from_scratch"])
def test_fsdp_state_is_sharded_from_birth(tiny_model, sentiment_csv, tmp_path, from_scratch):
    cfg = load_config(None, tiny_overrides(tiny_model, sentiment_csv, tmp_path / "run", **{
        "mesh.fsdp": 8, "mesh.fsdp_min_size": 256, "model.from_scratch": str(from_scratch).lower(),
        "training.bf16": "true"}))
    trainer = Trainer(cfg)
    params = trainer.model.params  # right after init: on their shards, before any train state
    _check_layout(params, trainer.param_shardings(models.abstract_params(trainer.model)))
    assert trainer.model.dtype == jnp.bfloat16  # bf16 compute, float32 master weights
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}
    assert "classifier" in params  # the new head, made by jit(init, out_shardings=...) like the rest
    trainer.init_state(total_steps=4)
    assert all(a is b for a, b in zip(jax.tree.leaves(trainer.state.params), jax.tree.leaves(params)))  # not copied
    _check_layout(trainer.state.opt_state, trainer.state_shardings.opt_state)
    _check_layout(trainer.state.params, trainer.state_shardings.params)


def test_fsdp_resume_restores_straight_into_the_sharded_state(tiny_model, sentiment_csv, tmp_path, monkeypatch):
    """2 steps, then a resumed run to 4, equal 4 steps in one go; the resumed trainer builds no
    optimizer state of its own (its state is shapes and shardings until the restore)."""
    def run(out, steps, resume=None):
        extra = {"mesh.fsdp": 8, "mesh.fsdp_min_size": 256, "training.max_steps": steps,
                 "training.lr_scheduler_type": "constant", "training.eval_strategy": "no",
                 "training.save_strategy": "steps", "training.save_steps": 2}
        if resume:
            extra["training.resume_from_checkpoint"] = resume
        return Trainer(load_config(None, tiny_overrides(tiny_model, sentiment_csv, out, **extra)))

    run(tmp_path / "resumed", 2).train()
    resumed = run(tmp_path / "resumed", 4, "latest")
    before_restore = []
    init_state = Trainer.init_state

    def spy(self, total_steps, **kwargs):
        init_state(self, total_steps, **kwargs)
        before_restore.extend(jax.tree.leaves(self.state))
    monkeypatch.setattr(Trainer, "init_state", spy)
    resumed.train()
    assert before_restore and all(isinstance(x, jax.ShapeDtypeStruct) for x in before_restore)
    assert int(resumed.state.step) == 4
    _check_layout(resumed.state.opt_state, resumed.state_shardings.opt_state)
    _check_layout(resumed.state.params, resumed.state_shardings.params)
    monkeypatch.undo()
    whole = run(tmp_path / "whole", 4)
    whole.train()
    for a, b in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(whole.state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_pretrained_weights_load_without_init_and_equal_transformers_load(tiny_model):
    """_do_init=False for PyTorch safetensors (without torch) and Flax msgpack: the same weights, and
    the same fresh head, as transformers' own random-init-then-load."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
    for path, from_pt in ((MINILM, True), (tiny_model, False)):
        model, weights = models.load_model("FlaxAutoModelForSequenceClassification", ModelConfig(name_or_path=path),
                                           num_labels=3, seed=7)
        assert "classifier" not in weights and not model._is_initialized  # nothing initialised yet
        assert all(x.devices() == {models.host_device()} for x in jax.tree.leaves(weights))  # read to the host
        params = models.place_params(model, weights, tree_shardings(models.abstract_params(model), mesh, 1024))
        reference = transformers.FlaxAutoModelForSequenceClassification.from_pretrained(
            resolve_path(path), from_pt=from_pt, num_labels=3, seed=7)
        ours, theirs = flatten_dict(params), flatten_dict(reference.params)
        assert ours.keys() == theirs.keys()
        for key in ours:
            np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(theirs[key]), err_msg=str(key))


def test_remat_policy_needs_gradient_checkpointing():
    with pytest.raises(FtjaxError, match="gradient_checkpointing=true"):
        load_config(None, ["training.remat_policy=dots_saveable"])
    with pytest.raises(FtjaxError, match="did you mean 'dots_saveable'"):
        load_config(None, ["training.gradient_checkpointing=true", "training.remat_policy=dot_saveable"])


def _grad_step(model, remat_context):
    """(loss, grads) of a token cross-entropy with dropout, and the compiled step's temporary bytes
    (compiled as an accelerator would: see remat.KEEP_REMAT_ON_CPU)."""
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 128, (16, 128)))

    def loss(params, rng):
        with remat_context():
            logits = model(input_ids=ids, params=params, dropout_rng=rng, train=True).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids).mean()

    step = jax.jit(jax.value_and_grad(loss))
    args = (model.params, jax.random.PRNGKey(1))
    temp = step.lower(*args).compile(compiler_options=remat.KEEP_REMAT_ON_CPU).memory_analysis().temp_size_in_bytes
    return step(*args), temp


@pytest.mark.parametrize("family,policy", [("bert", None), ("gpt2", None), ("llama", None),
                                           ("llama", "dots_with_no_batch_dims_saveable")])
def test_gradient_checkpointing_same_gradients_less_memory(family, policy):
    model = tiny_family(family)
    (loss, grads), temp = _grad_step(model, contextlib.nullcontext)
    context = models.gradient_checkpointing(model, policy)
    assert (context is contextlib.nullcontext) == (family == "bert" and policy is None)  # transformers' switch
    (loss_r, grads_r), temp_r = _grad_step(model, context)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert temp_r < 0.6 * temp, (temp_r, temp)


def _step_temps(tiny_model, sentiment_csv, out) -> dict[str, int]:
    """XLA's temporary bytes of the trainer's train step (32 x 128), gradient checkpointing off and on."""
    temps = {}
    for on in ("false", "true"):
        trainer = Trainer(load_config(None, tiny_overrides(tiny_model, str(sentiment_csv), f"{out}/{on}", **{
            "training.gradient_checkpointing": on, "model.max_length": 128, "data.bucket_lengths": "[128]",
            "training.per_device_train_batch_size": 32})))
        trainer.init_state(total_steps=1)
        batch = next(iter(trainer._device_batches(trainer.batcher("train"), 0, 0, 1)))
        temps[on] = trainer.train_step.lower(trainer.state, batch).compile().memory_analysis().temp_size_in_bytes
    return temps


def test_trainer_keeps_gradient_checkpointing_on_cpu(tiny_model, sentiment_csv, tmp_path):
    """XLA:CPU would merge the recomputation back into the forward pass: the trainer compiles its
    train step with remat.KEEP_REMAT_ON_CPU when gradient checkpointing is on, so it saves memory here
    too. The CLI also turns on XLA:CPU's memory-optimized scheduler for the whole process
    (``runtime.configure_process``), which undid much of the saving on a remat step (MiniLM 32 x 128:
    444 -> 1110 MiB of temporaries); the remat step keeps the default scheduler, so a process set up
    like the CLI's (a child here) compiles it with the same temporaries as this one."""
    temps = _step_temps(tiny_model, sentiment_csv, tmp_path / "here")
    assert temps["true"] < 0.7 * temps["false"], temps
    code = textwrap.dedent(f"""
        import json
        from ftjax.runtime import configure_process
        configure_process()
        from test_large_models import _step_temps
        print(json.dumps(_step_temps({tiny_model!r}, {str(sentiment_csv)!r}, {str(tmp_path / "cli")!r})))
    """)
    env = dict(cli_env(1), PYTHONPATH=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli_temps = json.loads(proc.stdout.strip().splitlines()[-1])
    assert cli_temps["false"] < temps["false"]  # the scheduler is on in the child: it lowers the plain step's
    assert cli_temps["true"] <= 1.02 * temps["true"], (cli_temps, temps)


# ---------------------------------------------------------------- ftjax plan

LLAMA_100M = {  # 101M parameters: 2 x 30522 x 1024 embeddings (MiniLM's WordPiece vocab) + 3 layers
    "task": "clm", "model.name_or_path": "llama", "model.from_scratch": "true",
    "model.tokenizer_name_or_path": MINILM, "model.max_length": 256,
    "model.config_overrides": "{hidden_size: 1024, intermediate_size: 2816, num_hidden_layers: 3, "
                              "num_attention_heads: 16, num_key_value_heads: 16, max_position_embeddings: 256}",
    "data.train_file": "pkg://gensim/test/test_data/lee_background.cor", "data.bucket_lengths": "[256]",
    "task_options.block_size": 256, "training.per_device_train_batch_size": 2, "mesh.data": 1, "mesh.fsdp": 8}


def test_plan_matches_the_trainer_and_reads_no_weights(tiny_model, sentiment_csv, tmp_path, monkeypatch):
    overrides = tiny_overrides(tiny_model, sentiment_csv, tmp_path / "run",
                               **{"mesh.fsdp": 8, "mesh.fsdp_min_size": 256})
    trainer = Trainer(load_config(None, overrides))
    trainer.init_state(total_steps=4)

    def no_weights(*args, **kwargs):
        raise AssertionError("ftjax plan read weights")
    monkeypatch.setattr(transformers.modeling_flax_utils.FlaxPreTrainedModel, "from_pretrained", no_weights)
    p = plan.plan(load_config(None, overrides), parse_bytes("1GiB"))
    assert p["parameters"] == sum(x.size for x in jax.tree.leaves(trainer.state.params))
    assert p["param_bytes_per_device"] == max(_per_device(trainer.state.params).values())
    assert p["opt_bytes_per_device"] == max(_per_device(trainer.state.opt_state).values())
    assert p["batch"]["input_ids"] == [64, 32]  # 8 rows per device x 8 devices, the largest bucket
    assert p["temp_bytes_per_device"] > 0 and p["flops_per_step"] > 0 and p["fits"] is True
    assert "word_embeddings" in p["largest_arrays"][0]["name"]


def test_plan_of_a_100m_llama_on_8_devices_in_seconds(tmp_path, capsys):
    config = tmp_path / "llama.yaml"
    config.write_text("task: clm\n")
    args = [str(config), *(f"{k}={v}" for k, v in {**LLAMA_100M, "training.output_dir": tmp_path / "out"}.items())]
    started = time.perf_counter()
    assert cli.main(["plan", *args, "--json", str(tmp_path / "plan.json")]) == 0
    seconds = time.perf_counter() - started
    p = json.loads((tmp_path / "plan.json").read_text())
    assert 95e6 < p["parameters"] < 105e6 and p["devices"] == 8
    assert p["param_bytes_per_device"] < p["param_bytes"] / 8 * 1.01  # FSDP: an eighth each
    assert p["opt_bytes_per_device"] < p["opt_bytes"] / 8 * 1.01
    assert 1.5e12 < p["flops_per_step"] < 2.5e12  # ~6 x 70M matmul parameters x 4096 tokens + attention
    assert seconds < 60, seconds
    out = capsys.readouterr().out
    assert "FlaxLlamaForCausalLM: 101.1M parameters" in out and "lm_head/kernel" in out
    # Too small a device: exit 2 with one line; gradient checkpointing lowers the temporaries
    assert cli.main(["plan", *args, "training.gradient_checkpointing=true", "--device-memory", "64MiB",
                     "--json", str(tmp_path / "remat.json")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ftjax: error")]
    assert len(err) == 1 and "does not fit" in err[0] and "64.0 MiB" in err[0]
    remat = json.loads((tmp_path / "remat.json").read_text())
    assert remat["temp_bytes_per_device"] < p["temp_bytes_per_device"]


def test_plan_of_an_lm_reads_enough_documents_for_its_blocks(tmp_path):
    """One row per device of 1,024-token blocks: a single Lee document is shorter than a block, so the
    plan reads more documents until the batch's blocks are filled (it failed with 'fewer than one block')."""
    overrides = {**LLAMA_100M, "model.max_length": 1024, "task_options.block_size": 1024, "data.bucket_lengths": "[1024]",
                 "model.config_overrides": "{hidden_size: 64, intermediate_size: 128, num_hidden_layers: 1, "
                                           "num_attention_heads: 8, num_key_value_heads: 8, max_position_embeddings: 1024}",
                 "training.per_device_train_batch_size": 1, "mesh.fsdp": 1, "mesh.tensor": 8,
                 "training.output_dir": tmp_path / "out"}
    p = plan.plan(load_config(None, [f"{k}={v}" for k, v in overrides.items()]))
    assert p["batch"]["input_ids"] == [1, 1024] and p["flops_per_step"] > 0
