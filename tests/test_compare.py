"""ftjax compare: labels from the config values that differ, default metrics per task, NER per entity type."""

import csv
import json

import pytest

from ftjax import compare
from ftjax.errors import FtjaxError


def _run(folder, train_file, seed, test):
    folder.mkdir(parents=True)
    config = {"task": "ner", "data": {"train_file": train_file}, "training": {"seed": seed, "output_dir": str(folder)}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "results.json").write_text(json.dumps({"train": {"train_loss": 0.5}, "test": test}))
    return str(folder)


def _ner(f1, per):
    return {"precision": f1 + 0.05, "recall": f1 - 0.05, "f1": f1, "accuracy": 0.9, "num_examples": 10,
            "per_type": {t: {"precision": v, "recall": v, "f1": v, "support": 3} for t, v in per.items()}}


def test_compare_labels_metrics_and_entity_types(tmp_path):
    a = _run(tmp_path / "a", "/data/wnut.conll", 1, _ner(0.4, {"person": 0.6, "location": 0.2}))
    b = _run(tmp_path / "b", "/data/german.conll", 1, _ner(0.3, {"person": 0.5}))
    result = compare.compare([a, b], output=str(tmp_path / "out"))
    assert result["split"] == "test" and result["metrics"] == ["precision", "recall", "f1", "accuracy"]
    assert [r["run"] for r in result["rows"]] == ["train_file=wnut.conll", "train_file=german.conll"]
    assert [r["f1"] for r in result["rows"]] == [0.4, 0.3]
    per = list(csv.DictReader(open(tmp_path / "out" / "compare_per_type.csv")))
    assert [(p["run"], p["type"], float(p["f1"])) for p in per] == [
        ("train_file=wnut.conll", "location", 0.2), ("train_file=wnut.conll", "person", 0.6),
        ("train_file=german.conll", "person", 0.5)]
    assert (tmp_path / "out" / "compare.png").stat().st_size > 5000
    # labels by a chosen key; any metric; unknown ones fail with one line
    chosen = compare.compare([a, b], metrics=["f1"], by=["training.seed"], output=str(tmp_path / "o2"))
    assert [r["run"] for r in chosen["rows"]] == ["a (seed=1)", "b (seed=1)"]  # not unique: the folder too
    assert list(chosen["rows"][0]) == ["run", "dir", "f1"]
    with pytest.raises(FtjaxError, match="metric 'bleu' is in no run's test results"):
        compare.compare([a, b], metrics=["bleu"], output=str(tmp_path / "o3"))
    with pytest.raises(FtjaxError, match="no results.json"):
        compare.compare([str(tmp_path)], output=str(tmp_path / "o4"))


def test_mlm_clm_probe_items_hide_a_real_word_of_held_out_lee_sentences():
    """scripts/compare_mlm_clm.py's probe: the hidden word is in the sentence, ranked among distractors."""
    import importlib.util
    from pathlib import Path

    from ftjax.paths import resolve_path
    path = Path(__file__).parent.parent / "scripts" / "compare_mlm_clm.py"
    spec = importlib.util.spec_from_file_location("compare_mlm_clm", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    items = script.probe_items(12, 9, seed=0)
    held_out = " ".join(Path(resolve_path(script.LEE)).read_text(encoding="latin-1").lower().splitlines()[::10])
    assert len(items) == 12
    for it in items:
        assert it["candidates"][0] == it["target"] and len(set(it["candidates"])) == 10
        assert f"{it['left']} {it['target']} {it['right']}" in held_out
