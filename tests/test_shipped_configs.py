"""Every config in configs/ whose model and data resolve offline runs to its end through the CLI,
with its own save / eval / best-model / save_total_limit settings intact: only sizes are
overridden (samples, epochs, batch sizes, one device, no PyTorch export) so each takes seconds.
Two epochs of two steps, so that epoch evaluation and saving happen twice and the checkpoint
limit and the best-model restore are exercised (the NER config once lost its best checkpoint);
language-model configs stop at 4 steps, inside their first epoch (their samples are documents),
and evaluate and save once, at the end."""

import json
from pathlib import Path

import pytest

from ftjax.cli import main
from ftjax.config import load_config
from ftjax.errors import FtjaxError
from ftjax.models import locate
from ftjax.paths import resolve_path
from test_multihost import _qa_file

CONFIGS = sorted(Path("configs").glob("*.yaml"))
LOCAL_DATA = {"data/lee_qa.jsonl": _qa_file}  # made by `scripts/run_qa.py --make-lee-data` in the README


def _offline(path: Path) -> bool:
    cfg = load_config(path)
    if cfg.data.dataset_name:
        return False
    if cfg.data.train_file not in LOCAL_DATA and not Path(resolve_path(cfg.data.train_file)).exists():
        return False
    try:
        if cfg.model.from_scratch:
            locate(cfg.model.tokenizer_name_or_path or cfg.model.name_or_path, "tokenizer", need_weights=False)
        else:
            locate(cfg.model.name_or_path)
    except (FtjaxError, OSError):
        return False
    return True


OFFLINE = [p for p in CONFIGS if _offline(p)]  # clm-smollm2-lee (135M parameters) included: ~70 s


def test_most_shipped_configs_work_offline():
    assert len(OFFLINE) >= 7, OFFLINE  # classification, clm x2, mlm, ner, qa, seq2seq


@pytest.mark.parametrize("path", OFFLINE, ids=[p.stem for p in OFFLINE])
def test_shipped_config_runs_to_its_end(path, tmp_path, capsys):
    cfg = load_config(path)
    args = cfg.training
    sizes = {"training.output_dir": tmp_path / "run", "data.max_train_samples": 8, "data.max_eval_samples": 8,
             "training.num_train_epochs": 2, "training.max_steps": -1, "training.per_device_train_batch_size": 4,
             "training.per_device_eval_batch_size": 8, "mesh.data": 1, "mesh.fsdp": 1, "training.disable_tqdm": "true",
             "training.export_pytorch": "false", "inference.max_new_tokens": 4}
    if cfg.task in ("mlm", "clm"):  # samples are whole documents (a Wikipedia page: ~100 blocks), so
        sizes.update({"data.max_train_samples": 4, "data.max_eval_samples": 2, "training.max_steps": 4})
    if cfg.data.train_file in LOCAL_DATA:
        sizes["data.train_file"] = LOCAL_DATA[cfg.data.train_file](tmp_path / Path(cfg.data.train_file).name)
    code = main(["train", str(path), *[f"{k}={v}" for k, v in sizes.items()]])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())["train"]
    assert results["stopped_by"] is None and (run / "export" / "config.json").is_file()
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    if args.save_strategy != "no":
        assert steps and steps[-1] == results["global_step"]
        if args.save_total_limit:  # the newest `limit`, and the best besides
            assert len(steps) <= args.save_total_limit + 1
    if args.load_best_model_at_end:
        assert results["best_step"] in steps  # kept, and restored at the end
    if args.eval_strategy != "no":
        assert results["best_metric"] is not None and results["compiles"]["eval_step"] >= 1
