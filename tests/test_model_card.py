"""Model cards beside every export, the config that reproduces the run, and push_to_hub's checks."""

import json

import pytest
import yaml

from conftest import tiny_overrides
from ftjax import model_card
from ftjax.config import load_config
from ftjax.errors import FtjaxError
from ftjax.trainer import Trainer


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_a_finished_run_exports_a_card_and_a_config_that_reproduces_it(tiny_model, sentiment_csv, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_model, sentiment_csv, out, **{"training.max_steps": 4})
    results = Trainer(load_config(None, overrides)).train()
    card = (out / "export" / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["pipeline_tag"] == "text-classification" and "ftjax" in meta["tags"]
    assert "base_model" not in meta  # a local folder is not a Hub name
    assert "accuracy" in meta["metrics"]
    assert f"fine-tuned from `{tiny_model}`" in card
    assert f"- train: `{sentiment_csv}`" in card
    assert f"accuracy | {results['test']['accuracy']:.4f}" in card  # the test split's own table
    assert "| **negative** |" in card  # confusion matrix rows named by label
    assert "| learning_rate | `" in card and "jax " in card and "ftjax train ftjax_config.yaml" in card
    # the saved config loads as a config and is the run's config, defaults filled in
    again = load_config(out / "export" / model_card.CONFIG_FILE)
    assert again.to_dict() == {**load_config(None, overrides).to_dict(),
                               "task_options": json.loads((out / "config.json").read_text())["task_options"]}


def test_ner_card_has_the_per_entity_table_and_a_hub_base_model():
    record = load_config(None, ["task=ner", "model.name_or_path=dslim/bert-base-NER",
                                "data.dataset_name=conll2003"]).to_dict()
    record["task_options"] = {"label_all_tokens": False}
    results = {"train": {"global_step": 10, "epochs": 1.0},
               "validation": {"f1": 0.5, "precision": 0.4, "recall": 0.6, "num_examples": 7,
                              "per_type": {"PER": {"precision": 0.5, "recall": 0.25, "f1": 1 / 3, "support": 4}}}}
    env = {"devices": "1 x cpu", "platform": "cpu", "mesh": {"data": 1}, "python": "3", "host": "x86_64",
           "versions": {"jax": "0"}}
    card = model_card.render(record, results, env, {"train": 10, "validation": 7}, ["O", "B-PER", "I-PER"])
    meta = _front_matter(card)
    assert meta["base_model"] == "dslim/bert-base-NER" and meta["datasets"] == ["conll2003"]
    assert meta["pipeline_tag"] == "token-classification"
    assert "| PER | 0.5000 | 0.2500 | 0.3333 | 4 |" in card
    assert "rows after preprocessing: train 10, validation 7" in card
    assert "`task_options.label_all_tokens`: False" in card and "labels: O, B-PER, I-PER" in card
    assert "### test" not in card


def test_push_to_hub_fails_before_training_when_offline_or_unnamed(tiny_model, sentiment_csv, tmp_path):
    base = tiny_overrides(tiny_model, sentiment_csv, tmp_path / "run", **{"training.push_to_hub": "true"})
    with pytest.raises(FtjaxError, match="needs training.hub_model_id"):
        Trainer(load_config(None, base)).train()
    with pytest.raises(FtjaxError, match="the Hub is offline"):  # conftest sets HF_HUB_OFFLINE=1
        Trainer(load_config(None, base + ["training.hub_model_id=me/model"])).train()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_push_uploads_the_export_folder(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw["private"]))

        def upload_folder(self, repo_id, folder_path, **kw):
            calls.append(("upload", repo_id, folder_path))
            return type("Commit", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    from ftjax import hub
    assert hub.push(tmp_path, "me/model", private=True) == "https://hub/me/model/commit/1"
    assert calls == [("create", "me/model", True), ("upload", "me/model", str(tmp_path))]

    class BrokenApi(FakeApi):
        def upload_folder(self, *a, **kw):
            raise OSError("401 Unauthorized\nlong details")

    monkeypatch.setattr(huggingface_hub, "HfApi", BrokenApi)
    with pytest.raises(FtjaxError, match=r"failed: 401 Unauthorized; the export is in .*huggingface-cli upload"):
        hub.push(tmp_path, "me/model", private=False)
