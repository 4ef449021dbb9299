"""``ftjax train`` killed (SIGKILL) at random moments, or preempted (SIGTERM), and run again with
the same command: it ends bit for bit where an uninterrupted run ends, with an honest log.

Kill moments come from ``FTJAX_FAULT=<point>:<n>`` (``ftjax.fault_points``: after a train step,
with a checkpoint write in flight, half way through deleting an old checkpoint, during an
evaluation) and from plain timers; the n-th occurrence is drawn at random (seeded) among those the
run still has ahead of it."""

import json
import random
import signal
import time

import numpy as np
from flax.serialization import msgpack_restore

from conftest import tiny_overrides
from ftjax.checkpoint import finalized_steps
from processes import cli_env, report, start, start_processes, tails, wait_all

STEPS, SAVE_EVERY, EVAL_EVERY, KEEP = 12, 2, 3, 2
RUN = {"training.max_steps": STEPS, "training.save_strategy": "steps", "training.save_steps": SAVE_EVERY,
       "training.save_total_limit": KEEP, "training.eval_strategy": "steps", "training.eval_steps": EVAL_EVERY,
       "training.logging_steps": 1, "training.load_best_model_at_end": "false"}


def _args(tiny_model, data, out, config):
    return ["train", str(config), *tiny_overrides(tiny_model, data, out, **RUN)]


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
    logs = tmp_path / "logs"
    reference, = wait_all([start(_args(tiny_model, sentiment_csv, ref, config), cli_env(), logs, "reference")], 300)
    assert reference.returncode == 0, report(reference.err)
    rng, kills, moments = random.Random(10), 0, []
    # each kind of moment once (before the first checkpoint, a write in flight, an evaluation, a
    # deletion), then random ones
    forced = ["train_step:1", "save:1", "evaluate:1", "delete:1"]
    while kills < 10:
        moment, extra = (forced[0], {"FTJAX_FAULT": forced.pop(0)}) if forced else _moment(rng, out)
        child = start(_args(tiny_model, sentiment_csv, out, config), cli_env(**extra), logs, f"kill{kills}")
        if moment.startswith("timer"):
            time.sleep(float(moment.split()[-1][:-1]))
            child.send_signal(signal.SIGKILL)
        wait_all([child], 300)
        assert child.returncode in (0, -signal.SIGKILL), report(child.err)
        assert child.returncode != 0, f"{moment} was never reached: {moments}"
        kills += 1
        moments.append((moment, max(finalized_steps(out / "checkpoints"), default=None)))
    last, = wait_all([start(_args(tiny_model, sentiment_csv, out, config), cli_env(), logs, "last")], 300)
    assert last.returncode == 0, (moments, report(last.err))
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
    children = start_processes(2, ["train", str(config), *over], cli_env(), tmp_path / "logs")
    try:
        deadline = time.monotonic() + 300
        while not ((out / "log.jsonl").is_file() and (out / "log.jsonl").read_text().count("\n") >= 2):
            assert time.monotonic() < deadline and all(c.poll() is None for c in children), \
                f"training did not start:\n{tails(children)}"
            time.sleep(0.2)
        children[1].send_signal(signal.SIGTERM)  # only the second process is preempted
        wait_all(children, 180)  # a hang fails here
    finally:
        for c in children:
            if c.poll() is None:
                c.proc.kill()
    assert [c.returncode for c in children] == [143, 143], tails(children)
    summaries = [json.loads(c.out.strip().splitlines()[-1]) for c in children]
    assert summaries[0]["step"] == summaries[1]["step"] and finalized_steps(out / "checkpoints") == [summaries[0]["step"]]
    assert "stopped by SIGTERM" in summaries[0]["status"]
