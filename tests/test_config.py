import dataclasses
import functools
import typing
from pathlib import Path

import pytest

from ftjax.config import Config, build_dataclass, load_config, valid_keys
from ftjax.errors import FtjaxError
from ftjax.tasks import get_task
from ftjax.tasks.base import _REGISTRY, task_class

CONFIGS = sorted(Path(__file__).parent.parent.glob("configs/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_parses(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.task
    get_task(cfg)  # its task_options too


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


def _no_optional(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp


def _fields(cls=Config, prefix=""):
    """(dotted key, type hint) of every leaf field, walking nested dataclasses."""
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _fields(tp, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, tp


def _literal_fields(cls=Config, prefix=""):
    """(key, the Literal, whether a list of it) for every choice field: X, Optional[X], [Optional] list[X]."""
    for key, tp in _fields(cls, prefix):
        inner = _no_optional(tp)
        is_list = typing.get_origin(inner) is list
        inner = _no_optional(typing.get_args(inner)[0]) if is_list else inner
        if typing.get_origin(inner) is typing.Literal:
            yield key, inner, is_list


LITERALS = list(_literal_fields())


def test_every_literal_field_is_found():
    keys = {key for key, _, _ in LITERALS}
    assert {"training.report_to", "training.eval_strategy", "model.dtype", "data.split_rule"} <= keys
    # A choice nested deeper than the walker reads must get its own test (mesh.rules: test_sharding.py).
    assert {key for key, tp in _fields() if "Literal" in repr(tp)} - keys == {"mesh.rules"}


task_class("classification")  # fills the registry
TASK_LITERALS = [(name, key, tp, is_list) for name, cls in sorted(_REGISTRY.items())
                 for key, tp, is_list in _literal_fields(cls.Options, "task_options.")]


def test_task_options_have_choice_fields():
    assert {("ner", "task_options.aggregation_strategy"), ("mlm", "task_options.remainder"),
            ("classification", "task_options.problem_type")} <= {(n, k) for n, k, _, _ in TASK_LITERALS}


@pytest.mark.parametrize("task,key,choices,is_list", TASK_LITERALS, ids=[f"{n}-{k}" for n, k, _, _ in TASK_LITERALS])
def test_a_typo_in_every_task_option_choice_names_the_key_and_the_right_value(task, key, choices, is_list):
    """Task options are checked when the task is built (the first thing a Trainer does)."""
    for choice in typing.get_args(choices):
        with pytest.raises(FtjaxError) as e:
            get_task(load_config(None, [f"task={task}", f"{key}={choice + choice[-1]}"]))
        assert f"config key '{key}'" in str(e.value) and f"did you mean '{choice}'?" in str(e.value)
        assert functools.reduce(getattr, key.split(".")[1:], get_task(load_config(
            None, [f"task={task}", f"{key}={choice}"])).options) == choice


def test_unknown_task_option_names_the_closest():
    with pytest.raises(FtjaxError, match="unknown config key 'task_options.n_best'; did you mean 'task_options.n_best_size'"):
        get_task(load_config(None, ["task=qa", "task_options.n_best=5"]))
    with pytest.raises(FtjaxError, match="unknown task 'nerr'"):
        get_task(load_config(None, ["task=nerr"]))


NEEDS = {"training.remat_policy": ["training.gradient_checkpointing=true"]}  # keys that need another


@pytest.mark.parametrize("key,choices,is_list", LITERALS, ids=[k for k, _, _ in LITERALS])
def test_a_typo_in_every_choice_field_names_the_key_and_the_right_value(key, choices, is_list):
    for choice in typing.get_args(choices):
        typo = choice + choice[-1]  # a doubled last letter: "epochh", "tensorboardd"
        value = f"[{typo}]" if is_list else typo
        with pytest.raises(FtjaxError) as e:
            load_config(None, [*NEEDS.get(key, []), f"{key}={value}"])
        assert f"config key '{key}'" in str(e.value) and f"did you mean '{choice}'?" in str(e.value)
        assert "\n" not in str(e.value)
        cfg = load_config(None, [*NEEDS.get(key, []),
                                 f"{key}=[{choice}]" if is_list else f"{key}={choice}"])  # the right value loads
        assert functools.reduce(getattr, key.split("."), cfg) == ([choice] if is_list else choice)


def test_report_to_typo_is_rejected_with_a_hint():
    with pytest.raises(FtjaxError, match=r"^config key 'training.report_to': 'tensorbaord' is not one of "
                                         r"jsonl / tensorboard; did you mean 'tensorboard'\?$"):
        load_config(None, ["training.report_to=tensorbaord"])
    assert load_config(None, ["training.report_to=tensorboard"]).training.report_to == ["tensorboard"]
    assert load_config(None, ["training.report_to=[]"]).training.report_to == []


def test_a_bad_list_item_fails_at_load_with_the_key():
    with pytest.raises(FtjaxError, match=r"^config key 'data.bucket_lengths': cannot use 'x' as int$"):
        load_config(None, ["data.bucket_lengths=[16, x]"])
    with pytest.raises(FtjaxError, match="data.target_bucket_lengths"):
        load_config(None, ["data.target_bucket_lengths=[16, 2.5]"])
    with pytest.raises(FtjaxError, match="model.config_overrides"):
        load_config(None, ["model.config_overrides=[1, 2]"])


def test_yaml_no_and_numbers_are_read_as_the_field_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {label_names: [no, yes, 3], text_column: 0}\n"
                    "training: {save_strategy: no, learning_rate: 5e-5, max_steps: 10.0, bf16: 'true'}\n")
    cfg = load_config(path)
    assert cfg.data.label_names == ["no", "yes", "3"] and cfg.data.text_column == "0"
    assert cfg.training.save_strategy == "no" and cfg.training.learning_rate == pytest.approx(5e-5)
    assert cfg.training.max_steps == 10 and isinstance(cfg.training.max_steps, int) and cfg.training.bf16 is True
    for bad in ("training.bf16=maybe", "training.max_steps=1.5", "training.learning_rate=[1]",
                "training.output_dir=[a]",
                "training.per_device_train_batch_size=null", "training=3"):
        with pytest.raises(FtjaxError, match=bad.split("=")[0].replace(".", r"\.")):
            load_config(None, [bad])


def test_unknown_key_in_another_section_names_the_right_one():
    with pytest.raises(FtjaxError, match="unknown config key 'data.learning_rate'; "
                                         "did you mean 'training.learning_rate'"):
        load_config(None, ["data.learning_rate=1e-4"])


@dataclasses.dataclass
class _Inner:
    mode: typing.Literal["fast", "slow"] = "fast"
    sizes: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Options:
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    name: typing.Optional[str] = None


def test_build_dataclass_is_generic():
    values = {"inner": {"mode": "slow", "sizes": [1, "2"]}, "weights": {"a": 1}}
    opts = build_dataclass(_Options, values, "task_options.")
    assert opts == _Options(_Inner("slow", [1, 2]), {"a": 1.0})
    assert valid_keys(_Options, "task_options.") == ["task_options.inner.mode", "task_options.inner.sizes",
                                                     "task_options.weights", "task_options.name"]
    with pytest.raises(FtjaxError, match="config key 'task_options.inner.mode': 'slwo' .*did you mean 'slow'"):
        build_dataclass(_Options, {"inner": {"mode": "slwo"}}, "task_options.")
    with pytest.raises(FtjaxError, match="unknown config key 'task_options.inner.size'; "
                                         "did you mean 'task_options.inner.sizes'"):
        build_dataclass(_Options, {"inner": {"size": [1]}}, "task_options.")
    with pytest.raises(FtjaxError, match="config key 'task_options.weights.a'"):
        build_dataclass(_Options, {"weights": {"a": "heavy"}}, "task_options.")
