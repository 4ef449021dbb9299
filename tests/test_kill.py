"""``ftjax train`` killed (SIGKILL) at random moments, or preempted (SIGTERM), and run again with
the same command: it ends bit for bit where an uninterrupted run ends, with an honest log.

Kill moments come from ``FTJAX_FAULT=<point>:<n>`` (``ftjax.fault_points``: after a train step,
with a checkpoint write in flight, half way through deleting an old checkpoint, during an
evaluation) and from plain timers; the n-th occurrence is drawn at random (seeded) among those the
run still has ahead of it."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
from flax.serialization import msgpack_restore

from conftest import tiny_overrides
from ftjax.checkpoint import finalized_steps
from test_multihost import _free_port

STEPS, SAVE_EVERY, EVAL_EVERY, KEEP = 12, 2, 3, 2
RUN = {"training.max_steps": STEPS, "training.save_strategy": "steps", "training.save_steps": SAVE_EVERY,
       "training.save_total_limit": KEEP, "training.eval_strategy": "steps", "training.eval_steps": EVAL_EVERY,
       "training.logging_steps": 1, "training.load_best_model_at_end": "false"}


def _command(tiny_model, data, out, config):
    return [sys.executable, "-m", "ftjax.cli", "train", str(config), *tiny_overrides(tiny_model, data, out, **RUN)]


def _env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.pop("FTJAX_FAULT", None)
    return dict(env, **extra)


def _params(out):
    flat = msgpack_restore((out / "export" / "flax_model.msgpack").read_bytes())

    def leaves(tree, prefix=""):
        for k, v in sorted(tree.items()):
            yield from leaves(v, f"{prefix}/{k}") if isinstance(v, dict) else [(f"{prefix}/{k}", np.asarray(v))]
    return dict(leaves(flat))


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _moment(rng: random.Random, out) -> tuple[str, dict]:
    """A kill the next run still reaches: a named point and which occurrence, or a timer."""
    done = max(finalized_steps(out / "checkpoints"), default=0)
    ahead = {"train_step": STEPS - done,
             "save": sum(s % SAVE_EVERY == 0 for s in range(done + 1, STEPS + 1)),
             "evaluate": sum(s % EVAL_EVERY == 0 for s in range(done + 1, STEPS + 1)),
             # an old checkpoint is deleted by a save once KEEP are there (fewer: the best is kept too)
             "delete": max(0, sum(s % SAVE_EVERY == 0 for s in range(done + 1, STEPS + 1)) - KEEP)}
    points = [p for p, n in ahead.items() if n > 0] + ["timer"]
    point = rng.choice(points)
    if point == "timer":
        return f"timer after {rng.uniform(0.5, 4):.1f}s", {}
    n = 1 if point == "delete" else rng.randint(1, min(ahead[point], 3))
    return f"{point}:{n}", {"FTJAX_FAULT": f"{point}:{n}"}


def test_sigkill_at_random_moments_then_the_same_command_ends_bit_identical(tiny_model, sentiment_csv, tmp_path):
    config = tmp_path / "classification.yaml"
    config.write_text("task: classification\n")
    ref, out = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(_command(tiny_model, sentiment_csv, ref, config), env=_env(), check=True, capture_output=True)
    rng, kills, moments = random.Random(10), 0, []
    # each kind of moment once (before the first checkpoint, a write in flight, an evaluation, a
    # deletion), then random ones
    forced = ["train_step:1", "save:1", "evaluate:1", "delete:1"]
    while kills < 10:
        moment, extra = (forced[0], {"FTJAX_FAULT": forced.pop(0)}) if forced else _moment(rng, out)
        proc = subprocess.Popen(_command(tiny_model, sentiment_csv, out, config), env=_env(**extra),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if moment.startswith("timer"):
            time.sleep(float(moment.split()[-1][:-1]))
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode in (0, -signal.SIGKILL), err[-2000:]
        assert proc.returncode != 0, f"{moment} was never reached: {moments}"
        kills += 1
        moments.append((moment, max(finalized_steps(out / "checkpoints"), default=None)))
    proc = subprocess.run(_command(tiny_model, sentiment_csv, out, config), env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, (moments, proc.stderr[-3000:])
    assert kills >= 10, moments
    want, got = _params(ref), _params(out)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name} after {moments}")
    # the log holds every step once, with the uninterrupted run's losses
    ref_log, log = _log(ref), _log(out)
    assert [r["step"] for r in log] == [r["step"] for r in ref_log], moments
    np.testing.assert_array_equal([r.get("train/loss", 0) for r in log], [r.get("train/loss", 0) for r in ref_log])
    ref_results, results = (json.loads((d / "results.json").read_text())["train"] for d in (ref, out))
    assert results["train_examples"] == ref_results["train_examples"] == STEPS * 8
    assert results["compiles"]["eval_step"] >= 1
    assert not (out / ".ftjax.lock").exists()


def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both_and_exits_143(tiny_model, sentiment_csv,
                                                                                    tmp_path):
    config, out = tmp_path / "classification.yaml", tmp_path / "run"
    config.write_text("task: classification\n")
    over = tiny_overrides(tiny_model, sentiment_csv, out, **{
        "training.max_steps": 100000, "training.logging_steps": 1, "training.eval_strategy": "no",
        "training.save_strategy": "no", "training.per_device_train_batch_size": 2, "mesh.data": -1})
    env = _env(JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}", JAX_NUM_PROCESSES="2")
    procs = [subprocess.Popen([sys.executable, "-m", "ftjax.cli", "train", str(config), *over],
                              env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    try:
        deadline = time.time() + 300
        while not ((out / "log.jsonl").is_file() and (out / "log.jsonl").read_text().count("\n") >= 2):
            assert time.time() < deadline and all(p.poll() is None for p in procs), "training did not start"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)  # only the second process is preempted
        outs = [p.communicate(timeout=180) for p in procs]  # a hang fails here
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [143, 143], [e[-2000:] for _, e in outs]
    steps = [json.loads(o.strip().splitlines()[-1])["step"] for o, _ in outs]
    assert steps[0] == steps[1] and finalized_steps(out / "checkpoints") == [steps[0]]
    assert "stopped by SIGTERM" in json.loads(outs[0][0].strip().splitlines()[-1])["status"]
