"""Extractive QA: preprocessing (windows, labels), post-processing, SQuAD metrics, loaders, bad input,
end-to-end runs on a tiny BERT and a few steps of MiniLM-L6 on real-text questions."""

import json
import re

import datasets
import numpy as np
import pytest
import transformers

from conftest import MINILM, tiny_overrides
from ftjax import cli
from ftjax.config import load_config
from ftjax.data.loading import load_splits, resolve_path
from ftjax.data.squad import cloze_qa
from ftjax.errors import FtjaxError
from ftjax.tasks.question_answering import QuestionAnswering, normalize_answer, squad_scores
from ftjax.trainer import Trainer

LEE = "pkg://gensim/test/test_data/lee_background.cor"


def _lee_rows(**kw):
    docs = open(resolve_path(LEE), encoding="latin-1").read().splitlines()
    return cloze_qa(docs, **kw)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _overrides(model, data, out, **extra):
    base = {"task": "qa", "model.max_length": 64, "task_options.stride": 16, "data.bucket_lengths": "[48, 64]",
            "training.export_pytorch": "false"}
    return tiny_overrides(model, data, out, **{**base, **extra})


def test_squad_normalisation_and_scores():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    scores = squad_scores(["the Eiffel tower", "Paris France", ""], [["Eiffel Tower"], ["Paris"], []])
    assert scores["exact_match"] == pytest.approx(200 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 3)
    assert scores["NoAns_exact"] == 100 and scores["HasAns_exact"] == 50


def test_cloze_questions_are_spans_of_real_text():
    rows = _lee_rows(unanswerable=True)
    assert len(rows) > 300
    for r in rows[:50]:
        for text, start in zip(r["answers"]["text"], r["answers"]["answer_start"]):
            assert r["context"][start:start + len(text)] == text
        assert re.search(r"\b(what|how many)\b", r["question"])
    assert sum(not r["answers"]["text"] for r in rows) == len(range(0, len(rows), 5))


def test_windows_label_the_answer_or_cls(tiny_model, tmp_path):
    """A long context becomes several overlapping windows; the window holding the answer points at
    its tokens, the others at CLS; the offsets give back the answer text."""
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model)
    context = " ".join(f"word{i}" for i in range(60)) + " the capital is Canberra in Australia ."
    start = context.index("Canberra")
    config = load_config(None, ["task=qa", "model.max_length=32", "task_options.stride=8"])
    task = QuestionAnswering(config)
    ds = datasets.Dataset.from_dict({"question": ["What is the capital?"], "context": [context],
                                     "answers": [{"text": ["Canberra"], "answer_start": [start]}]})
    prepared = task.prepare(datasets.DatasetDict({"validation": ds}), tok)["validation"]
    feats, host = prepared.rows, prepared.meta
    assert len(feats) > 3 and max(len(x) for x in feats["input_ids"]) == 32
    labelled = [i for i, s in enumerate(feats["start_positions"]) if s != 0]
    assert labelled and all(feats["start_positions"][i] == 0 == feats["end_positions"][i]
                            for i in range(len(feats)) if i not in labelled)
    for i in labelled:
        s, e = feats["start_positions"][i], feats["end_positions"][i]
        offs = host["offsets"][i]
        assert context[offs[s][0]:offs[e][1]] == "Canberra"
    # Post-processing picks the best span across windows: feed logits that point at the answer.
    i = labelled[-1]
    n = 3
    outputs = {"index": np.arange(len(feats)), "null_score": np.zeros(len(feats)),
               "start_idx": np.tile(np.arange(n), (len(feats), 1)), "end_idx": np.tile(np.arange(n), (len(feats), 1)),
               "start_val": np.full((len(feats), n), -np.inf), "end_val": np.full((len(feats), n), -np.inf)}
    s, e = feats["start_positions"][i], feats["end_positions"][i]
    outputs["start_idx"][i, 0], outputs["end_idx"][i, 0] = s, e
    outputs["start_val"][i, 0], outputs["end_val"][i, 0] = 5.0, 5.0
    best = task.best_answers(outputs, host)[0]
    assert best["answer"] == "Canberra" and (best["start"], best["end"]) == (start, start + 8)
    assert task.metrics(outputs, host)["exact_match"] == 100 and task.metrics(outputs, host)["num_examples"] == 1


def test_nested_squad_json_and_csv_answers(tmp_path):
    nested = {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{"context": "Alice met Bob in Paris.", "qas": [
        {"id": "q1", "question": "Who met Bob?", "answers": [{"text": "Alice", "answer_start": 0}]},
        {"id": "q2", "question": "Who met Carol?", "answers": [], "is_impossible": True}]}]}]}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(nested))
    config = load_config(None, ["task=qa", f"data.train_file={path}", "task_options.version_2_with_negative=true"])
    splits = load_splits(config.data)
    assert splits["train"]["id"] == ["q1", "q2"] and splits["train"]["answers"][1] == {"text": [], "answer_start": []}
    QuestionAnswering(config).check(splits)
    csv_path = tmp_path / "train.csv"
    csv_path.write_text('question,context,answers\nWho?,Alice met Bob.,"{""text"": [""Alice""], ""answer_start"": [0]}"\n')
    config = load_config(None, ["task=qa", f"data.train_file={csv_path}"])
    QuestionAnswering(config).check(load_splits(config.data))


@pytest.mark.parametrize("case,message", [
    ("bad_start", "answer_start 3 does not match the answer text 'Alice'"),
    ("no_answer_v1", "version_2_with_negative"),
    ("long_question", "must be more than task_options.stride=16"),
    ("missing_column", "column 'context' not found"),
])
def test_bad_input_fails_with_one_clear_line(case, message, tiny_model, tmp_path):
    row = {"id": "1", "question": "Who met Bob?", "context": "Alice met Bob in Paris.",
           "answers": {"text": ["Alice"], "answer_start": [0]}}
    if case == "bad_start":
        row["answers"]["answer_start"] = [3]
    elif case == "no_answer_v1":
        row["answers"] = {"text": [], "answer_start": []}
    elif case == "long_question":
        row["question"] = "who " * 50
    else:
        row.pop("context")
    data = _write_jsonl(tmp_path / "qa.jsonl", [row] * 20)
    with pytest.raises(FtjaxError, match=message) as e:
        Trainer(load_config(None, _overrides(tiny_model, data, tmp_path / "run")))
    assert "\n" not in str(e.value) and ("example 0" in str(e.value) or case == "missing_column")


def test_tiny_qa_trains_evaluates_and_predicts(tiny_model, tmp_path):
    data = _write_jsonl(tmp_path / "qa.jsonl", _lee_rows(unanswerable=True)[:200])
    out = tmp_path / "run"
    trainer = Trainer(load_config(None, _overrides(tiny_model, data, out, **{"task_options.version_2_with_negative": "true"})))
    results = trainer.train()
    assert {"exact_match", "f1", "loss"} <= set(results["validation"])
    assert results["train"]["compiles"]["train_step"] <= 2 and results["train"]["compiles"]["eval_step"] <= 2
    losses = [json.loads(line)["train/loss"] for line in (out / "log.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert losses[-1] < losses[0]
    records = [{"question": "Who met Bob?", "context": "Alice met Bob in Paris. " * 20}, {"question": "", "context": "x"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert cli.main(["predict", _cfg_file(tmp_path, out, tiny_model, data), "--input", str(tmp_path / "in.jsonl"),
                     "--output", str(tmp_path / "pred.jsonl")]) == 0
    preds = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    first = preds[0]["prediction"]
    assert set(first) == {"answer", "start", "end", "score"}
    assert first["answer"] == records[0]["context"][first["start"]:first["end"]] and 0 <= first["score"] <= 1
    assert preds[1]["note"] == "empty input"


def _cfg_file(tmp_path, out, model, data):
    import yaml
    values = {"task": "qa", "model": {"name_or_path": model, "max_length": 64}, "training": {"output_dir": str(out)},
              "data": {"train_file": data}, "task_options": {"stride": 16, "version_2_with_negative": True},
              "mesh": {"data": 1}}
    path = tmp_path / "qa.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_minilm_learns_real_text_questions(tmp_path):
    """A few steps of the real MiniLM-L6 checkpoint on cloze questions over real news text."""
    data = _write_jsonl(tmp_path / "qa.jsonl", _lee_rows())
    trainer = Trainer(load_config(None, _overrides(MINILM, data, tmp_path / "run", **{
        "model.max_length": 96, "task_options.stride": 24, "data.bucket_lengths": "[96]", "data.max_train_samples": 96,
        "data.max_eval_samples": 24, "training.learning_rate": 1e-4, "training.num_train_epochs": 1,
        "training.per_device_train_batch_size": 16, "training.save_strategy": "no", "training.eval_strategy": "no"})))
    before = trainer.evaluate("validation")
    results = trainer.train()
    assert results["validation"]["f1"] > before["f1"] + 5 and results["validation"]["loss"] < before["loss"]
