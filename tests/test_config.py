from pathlib import Path

import pytest

from ftjax.config import Config, load_config
from ftjax.errors import FtjaxError

CONFIGS = sorted(Path(__file__).parent.parent.glob("configs/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_parses(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.task


def test_overrides_are_typed():
    cfg = load_config(None, ["training.learning_rate=1e-4", "training.num_train_epochs=2",
                             "data.bucket_lengths=[16, 32]", "training.bf16=true", "mesh.fsdp=2"])
    assert cfg.training.learning_rate == pytest.approx(1e-4)
    assert cfg.training.num_train_epochs == 2.0 and cfg.training.bf16 is True
    assert cfg.data.bucket_lengths == [16, 32] and cfg.mesh.fsdp == 2


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(FtjaxError, match="did you mean 'training.learning_rate'"):
        load_config(None, ["training.learning_rat=1e-4"])
    with pytest.raises(FtjaxError, match="did you mean 'training.warmup_ratio'"):
        load_config(None, ["warmup_ratio=0.1"])


def test_bad_values_fail_with_the_key():
    with pytest.raises(FtjaxError, match="training.max_steps"):
        load_config(None, ["training.max_steps=many"])
    with pytest.raises(FtjaxError, match="eval_strategy"):
        load_config(None, ["training.eval_strategy=sometimes"])
    with pytest.raises(FtjaxError, match="load_best_model_at_end"):
        load_config(None, ["training.load_best_model_at_end=true", "training.eval_strategy=no"])


def test_yaml_is_read_safely(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(Exception, match="could not determine a constructor|ConstructorError"):
        load_config(bad)
