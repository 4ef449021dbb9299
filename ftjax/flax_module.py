"""A plain ``flax.linen`` or ``flax.nnx`` model, trained by ftjax like a transformers Flax model.

``model.flax_module: "package.module:factory"`` names a Python callable that builds the model; ftjax
then trains it with the same loop, sharding, LoRA / freeze rules, checkpoints and metrics as the
transformers classes, so a model of one's own (or one transformers never had in Flax) needs no
transformers code. ``FlaxModuleModel`` gives it the few attributes ftjax uses of a transformers Flax
model (``config``, ``params_shape_tree``, ``init_weights``, ``__call__`` -> ``.logits``,
``save_pretrained``); ``ftjax.models.load_model`` builds it.

The factory is called with keyword arguments: ``vocab_size`` (the tokenizer's), ``dtype`` (the
compute dtype), ``num_labels`` (classification / NER tasks), ``rngs`` (an ``nnx.Rngs``; only when the
factory has that parameter: it then builds an ``nnx.Module``, otherwise a ``linen.Module``) and
every entry of ``model.config_overrides``. The model is called as

    linen:  module.apply({"params": p}, input_ids, attention_mask, token_type_ids=None,
                         deterministic=not train, rngs={"dropout": rng})
    nnx:    model(input_ids, attention_mask, token_type_ids=None)   # after model.train() / .eval()

and returns the logits, ``[batch, classes]`` for classification, ``[batch, length, labels or vocab]``
for NER and language modelling, or a mapping of named outputs (QA: ``start_logits``, ``end_logits``).

Parameters are created by ``jax.jit`` of the initialiser with ``out_shardings`` (sharded from
birth, like every other from-scratch model); for nnx only ``nnx.Param`` variables train, other
state (RNG streams, counters) is built once and reseeded for dropout at every step.
An export holds ``flax_model.msgpack`` (``flax.serialization``, no pickle), ``ftjax_module.json``
(the factory and its arguments) and the tokenizer; ``ftjax eval`` / ``predict`` load it back.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, serialization

from ftjax.errors import FtjaxError

MODULE_FILE = "ftjax_module.json"
WEIGHTS_FILE = "flax_model.msgpack"
MODEL_TYPE = "flax_module"  # ``config.model_type``: no transformers-specific behaviour applies
INIT_LENGTH = 8  # tokens of the dummy input that initialises a linen module


def import_factory(path: str) -> Callable:
    """The callable named ``"package.module:attribute"`` (FtjaxError with the reason otherwise)."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise FtjaxError(f"model.flax_module '{path}' is not 'package.module:factory'")
    try:
        target = importlib.import_module(module_name)
    except ImportError as e:
        raise FtjaxError(f"model.flax_module: cannot import '{module_name}' ({e})") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise FtjaxError(f"model.flax_module: '{module_name}' has no '{attribute}'")
        target = getattr(target, part)
    if not callable(target):
        raise FtjaxError(f"model.flax_module: '{path}' is not callable")
    return target


@dataclasses.dataclass
class ModuleConfig:
    """What ftjax reads of a model's config (``model.config``), for a flax module."""

    flax_module: str
    module_kwargs: dict[str, Any]
    vocab_size: int
    num_labels: Optional[int] = None
    id2label: Optional[dict[int, str]] = None
    initializer_range: float = 0.02  # model.head_init: initializer_range (new heads only; unused here)
    model_type: str = MODEL_TYPE
    dtype: str = "float32"

    def to_json(self) -> dict:
        return {"flax_module": self.flax_module, "module_kwargs": self.module_kwargs, "vocab_size": self.vocab_size,
                "num_labels": self.num_labels, "id2label": self.id2label}


class FlaxModuleModel:
    """A linen or nnx model behind the interface ftjax uses of a transformers Flax model."""

    def __init__(self, config: ModuleConfig, dtype=jnp.float32, seed: int = 0):
        self.config = config
        self.dtype = dtype
        self.key = jax.random.PRNGKey(seed)
        self.input_shape = (1, INIT_LENGTH)
        self._params = None
        factory = import_factory(config.flax_module)
        kwargs = {"vocab_size": config.vocab_size, "dtype": dtype, **config.module_kwargs}
        if config.num_labels is not None:
            kwargs["num_labels"] = config.num_labels
        self.is_nnx = "rngs" in inspect.signature(factory).parameters

        def build(rng=None):
            try:
                return factory(**kwargs, **({"rngs": nnx.Rngs(rng)} if self.is_nnx else {}))
            except TypeError as e:  # a keyword the factory does not take (config_overrides)
                raise FtjaxError(f"model.flax_module '{config.flax_module}': {e}") from None

        self._build = build
        if self.is_nnx:
            abstract = nnx.eval_shape(lambda: self._build(0))
            if not isinstance(abstract, nnx.Module):
                raise FtjaxError(f"model.flax_module '{config.flax_module}' returned {type(abstract).__name__}, "
                                 "not a flax.nnx.Module")
            self._graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
            # RNG streams and other non-parameter state: small, built once (the parameters are not kept)
            self._rest = jax.jit(lambda k: nnx.split(self._build(k), nnx.Param, ...)[2])(self.key)
        else:
            self.module = self._build()
            if not hasattr(self.module, "apply") or not hasattr(self.module, "init"):
                raise FtjaxError(f"model.flax_module '{config.flax_module}' returned {type(self.module).__name__}, "
                                 "not a flax.linen.Module (an nnx factory takes an 'rngs' argument)")

    # ---- what ftjax reads of a transformers Flax model
    @property
    def params(self):
        return self._params

    @params.setter
    def params(self, value):
        self._params = value

    def init_weights(self, rng, input_shape=None) -> dict:
        """Freshly initialised parameters, a nested dict (jit it with ``out_shardings``)."""
        if self.is_nnx:
            return _string_keys(nnx.to_pure_dict(nnx.state(self._build(rng), nnx.Param)))
        ids = jnp.zeros(input_shape or self.input_shape, jnp.int32)
        rngs = {"params": rng, "dropout": jax.random.fold_in(rng, 1)}
        return dict(self.module.init(rngs, ids, jnp.ones_like(ids), None, deterministic=True)["params"])

    @property
    def params_shape_tree(self) -> dict:
        return jax.eval_shape(self.init_weights, self.key)

    def enable_gradient_checkpointing(self):
        raise NotImplementedError  # ftjax.remat wraps the module's layers named by index instead

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, params=None, dropout_rng=None,
                 train: bool = False, **unused):
        params = self._params if params is None else params
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if self.is_nnx:
            model = nnx.merge(self._graphdef, self._param_state(params), self._rest, copy=True)
            if train:
                model.train()
            else:
                model.eval()
            if train and dropout_rng is not None:
                nnx.reseed(model, default=dropout_rng, dropout=dropout_rng)
            out = model(input_ids, attention_mask, token_type_ids)
        else:
            out = self.module.apply({"params": params}, input_ids, attention_mask, token_type_ids,
                                    deterministic=not train,
                                    rngs={"dropout": dropout_rng} if train and dropout_rng is not None else {})
        return SimpleNamespace(**out) if isinstance(out, dict) else SimpleNamespace(logits=out)

    def _param_state(self, params: dict):
        state = nnx.state(nnx.eval_shape(lambda: self._build(0)), nnx.Param)
        nnx.replace_by_pure_dict(state, params)
        return state

    def generate(self, *args, **kwargs):
        raise FtjaxError("generation needs a transformers causal LM; a model.flax_module model has no generate()")

    def save_pretrained(self, directory, params) -> None:
        """``flax_model.msgpack`` (flax.serialization: no pickle) and ``ftjax_module.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / WEIGHTS_FILE).write_bytes(serialization.msgpack_serialize(jax.tree.map(np.asarray, params)))
        (directory / MODULE_FILE).write_text(json.dumps(self.config.to_json(), indent=2) + "\n")


def _string_keys(tree):
    """nnx names list items by int; parameter paths (sharding rules, checkpoints) are strings."""
    return {str(k): _string_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def is_module_export(folder: str) -> bool:
    return (Path(folder) / MODULE_FILE).is_file()


def load_module_model(flax_module: Optional[str], folder: Optional[str], module_kwargs: dict, vocab_size: int,
                      dtype, seed: int, num_labels: Optional[int] = None, id2label: Optional[dict] = None):
    """``(model, weights)``: a ``FlaxModuleModel`` and, from an export ``folder`` (``MODULE_FILE``
    present), its weights as host arrays; otherwise weights None (initialised on the mesh)."""
    weights = None
    if folder is not None and is_module_export(folder):
        saved = json.loads((Path(folder) / MODULE_FILE).read_text())
        if flax_module not in (None, saved["flax_module"]):
            raise FtjaxError(f"model.flax_module '{flax_module}' differs from the export's '{saved['flax_module']}'")
        flax_module, module_kwargs, vocab_size = saved["flax_module"], saved["module_kwargs"], saved["vocab_size"]
        num_labels = saved["num_labels"] if num_labels is None else num_labels
        id2label = id2label or {int(k): v for k, v in (saved["id2label"] or {}).items()} or None
        weights = serialization.msgpack_restore((Path(folder) / WEIGHTS_FILE).read_bytes())
    config = ModuleConfig(flax_module, dict(module_kwargs), vocab_size, num_labels, id2label)
    return FlaxModuleModel(config, dtype, seed), weights
