"""JAX's multi-controller runtime, for every task family: 2 processes x 1 CPU device give the train
losses and validation metrics of 1 process x 2 devices.

Each process prepares every split whole (host-side meta such as QA contexts, seq2seq references and
NER words is global) and feeds its strided rows; outputs are gathered by global row index before the
metrics, so evaluation is the same on every process; process 0 writes the logs."""

import json
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_overrides, write_sentiment_csv
from ftjax.data.squad import cloze_qa
from ftjax.paths import resolve_path
from processes import cli_env, run_processes, start_processes, tails, wait_all

LEE = "pkg://gensim/test/test_data/lee_background.cor"
WIKI = "pkg://gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def launch(n_proc, devices_per_proc, config, overrides, logs: Path):
    """``ftjax train`` as ``n_proc`` processes of ``devices_per_proc`` CPU devices; the children."""
    return run_processes(n_proc, ["train", config, *overrides], cli_env(devices_per_proc), logs)


def _ner_file(path: Path) -> str:
    """CoNLL sentences with a person, a place or nothing."""
    names, places = ["Ann", "Bob", "Carla", "Dmitri"], ["Paris", "Lagos", "Quito", "Oslo"]
    lines = []
    for i in range(40):
        words = [(names[i % 4], "B-PER"), ("went", "O"), ("to", "O"), (places[i % 3], "B-LOC")]
        if i % 5 == 0:
            words.append(("York", "I-LOC"))
        lines.append("\n".join(f"{w}\t{t}" for w, t in words[: 2 + i % 3 + 1]))
    path.write_text("\n\n".join(lines) + "\n")
    return str(path)


def _qa_file(path: Path) -> str:
    docs = open(resolve_path(LEE), encoding="latin-1").read().splitlines()
    rows = cloze_qa(docs, unanswerable=True)[:60]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _family(name, tmp_path, tiny_model, tiny_bart):
    """(overrides, metrics compared) of a tiny run of one task family."""
    if name == "classification":
        return {"data.train_file": str(write_sentiment_csv(tmp_path / "reviews.csv", n=60))}, ["accuracy", "f1_macro"]
    if name in ("flax.linen", "flax.nnx"):  # model.flax_module: a plain Flax model, not a transformers class
        return {"data.train_file": str(write_sentiment_csv(tmp_path / "reviews.csv", n=60)),
                "model.flax_module": f"ftjax.example_models:{name[5:]}_encoder", "model.config_overrides.hidden": 32,
                "model.config_overrides.layers": 2, "model.config_overrides.max_length": 64}, ["accuracy", "f1_macro"]
    if name == "ner":
        return {"task": "ner", "data.train_file": _ner_file(tmp_path / "ner.conll"), "data.format": "conll",
                "training.metric_for_best_model": "f1"}, ["f1", "precision", "recall", "accuracy"]
    if name in ("mlm", "clm"):
        extra = {"task": name, "data.train_file": LEE, "data.split_rule": "mod10", "task_options.block_size": 32,
                 "data.bucket_lengths": "[32]", "data.max_train_samples": 30, "data.max_eval_samples": 6}
        if name == "clm":
            extra.update({"model.name_or_path": "gpt2", "model.from_scratch": "true",
                          "model.tokenizer_name_or_path": tiny_model,
                          "model.config_overrides": "{n_embd: 32, n_layer: 1, n_head: 2, n_positions: 64}"})
        return extra, ["perplexity", "accuracy"]
    if name == "qa":
        return {"task": "qa", "data.train_file": _qa_file(tmp_path / "qa.jsonl"), "model.max_length": 64,
                "task_options.stride": 16, "task_options.version_2_with_negative": "true",
                "data.bucket_lengths": "[48, 64]"}, ["exact_match", "f1", "num_examples"]
    if name == "seq2seq":
        return {"task": "seq2seq", "model.name_or_path": tiny_bart, "data.train_file": WIKI, "model.max_length": 64,
                "data.bucket_lengths": "[64]", "task_options.source_column": "text",
                "task_options.target_column": "title", "task_options.max_target_length": 16,
                "task_options.target_bucket_lengths": "[16]", "training.predict_with_generate": "true",
                "inference.max_new_tokens": 4}, ["rouge1", "rougeL", "bleu", "gen_len"]
    raise ValueError(name)


def _run(tmp_path, base, n_proc, devices_per_proc, name):
    out, config = tmp_path / name, tmp_path / "config.yaml"
    config.write_text("task: classification\n")  # the rest comes as overrides
    children = launch(n_proc, devices_per_proc, str(config), [f"training.output_dir={out}", *base],
                      tmp_path / f"{name}-logs")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    return np.array([r["train/loss"] for r in log if "train/loss" in r]), results, children


@pytest.mark.parametrize("family", ["classification", "ner", "mlm", "clm", "qa", "seq2seq", "flax.linen", "flax.nnx"])
def test_two_processes_match_one_process(family, tmp_path, tiny_model, tiny_bart):
    extra, compared = _family(family, tmp_path, tiny_model, tiny_bart)
    base = tiny_overrides(tiny_model, extra.pop("data.train_file"), tmp_path / "unused", **{
        "training.max_steps": 4, "training.logging_steps": 1, "training.dropout": "false", "data.shuffle": "false",
        "training.per_device_train_batch_size": 2, "training.per_device_eval_batch_size": 3,
        "training.eval_strategy": "steps", "training.eval_steps": 4, "training.save_strategy": "steps",
        "training.save_steps": 4, "mesh.data": -1, **extra})
    base = [o for o in base if not o.startswith("training.output_dir=")]
    one, res_one, _ = _run(tmp_path, base, 1, 2, "one")
    two, res_two, children = _run(tmp_path, base, 2, 1, "two")
    assert len(one) == len(two) == 4
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-6)
    val_one, val_two = res_one["validation"], res_two["validation"]
    assert res_two["train"]["devices"] == 2 and val_two["num_examples"] == val_one["num_examples"] > 0
    for key in ["loss", *compared]:
        assert val_two[key] == pytest.approx(val_one[key], rel=1e-4, abs=1e-5), key
    summary = json.loads(children[0].out.strip().splitlines()[-1])  # the CLI's final line, from process 0
    assert summary["validation_num_examples"] == val_two["num_examples"]
    # process 1 waits for process 0's export and results before it ends (distributed.sync)
    assert children[1].stdout_path.stat().st_mtime_ns >= (tmp_path / "two" / "results.json").stat().st_mtime_ns
    assert (tmp_path / "two" / "checkpoints" / "4").is_dir()
    assert (tmp_path / "two" / "export" / "flax_model.msgpack").is_file()


def _two_process_run(tmp_path, tiny_model, **fault):
    """A tiny classification run as 2 processes of tests/patched_cli.py with ``fault`` in their
    environment; the children, once both ended."""
    config = tmp_path / "config.yaml"
    config.write_text("task: classification\n")
    overrides = tiny_overrides(tiny_model, str(write_sentiment_csv(tmp_path / "reviews.csv", n=40)),
                               tmp_path / "new" / "run", **{"training.max_steps": 1, "training.eval_strategy": "no",
                                                           "training.save_strategy": "no", "mesh.data": -1})
    env = cli_env(1, PYTHONPATH=str(Path(__file__).parent), **fault)
    return wait_all(start_processes(2, ["train", str(config), *overrides], env, tmp_path / "logs",
                                    module="patched_cli"), 600)


def test_other_processes_read_output_dir_after_process_0_locked_it(tmp_path, tiny_model):
    """Process 0's check_writable makes and removes output_dir when it is new; a process that read
    the folder meanwhile found it gone (FileNotFoundError, seen in CI). Every other process now waits
    for process 0's lock, even when process 0 is slow to take it."""
    children = _two_process_run(tmp_path, tiny_model, FTJAX_TEST_SLOW_LOCK="1")
    assert [c.returncode for c in children] == [0, 0], tails(children)
    assert (tmp_path / "new" / "run" / "results.json").is_file()


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failing_process_ends_the_run_on_every_process_within_a_minute(tmp_path, tiny_model, failing):
    """An exception on one process used to leave every process waiting 5 minutes (the others in a
    collective, the failed one at JAX's shutdown barrier) before all aborted. The failed process now
    prints its traceback and leaves at once; the others fail soon after."""
    started = time.monotonic()
    children = _two_process_run(tmp_path, tiny_model, FTJAX_TEST_FAIL_PROCESS=str(failing))
    elapsed = time.monotonic() - started
    assert all(c.returncode != 0 for c in children) and children[failing].returncode == 1, tails(children)
    assert f"RuntimeError: a fault injected into process {failing}" in children[failing].err
    assert elapsed < 120, f"{elapsed:.0f}s\n{tails(children)}"
