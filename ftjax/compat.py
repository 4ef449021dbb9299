"""Compatibility shims for the pinned transformers (4.57.6, the last release with Flax models).

Two things in transformers' Flax code break on jax >= 0.10 (this project pins 0.10.2; the GPU image
has 0.11.2):

1. Flax T5 / mT5 / LongT5 call ``jnp.clip(x, a_max=...)``; jax 0.10 removed the ``a_min`` / ``a_max``
   keywords (now ``min`` / ``max``), so the models fail while tracing. Those modules get a ``jnp``
   that also accepts the old keywords; jax itself is not changed.
2. ``FlaxNoRepeatNGramLogitsProcessor`` (``no_repeat_ngram_size`` in ``generate``) gathers from a
   ``jax.experimental.sparse`` BCOO matrix in a mode new jax does not implement. Its ``__call__`` is
   replaced by a dense equivalent that bans the same tokens (and is cheaper: O(batch x length x n)).

3. The Flax Llama / Mistral / Gemma rotary embeddings hardcode the base 10000 and ignore
   ``config.rope_theta`` (SmolLM2 uses 100000: its loss is off by ~0.1 nats without this) and
   ``config.rope_scaling`` (Llama 3.1); their ``setup`` is replaced by ``ftjax.rope.rotary_setup``.
4. With PyTorch disabled (``USE_TORCH=0``, what ftjax sets: ``ftjax.runtime``) but accelerate
   installed, ``import transformers.pipelines`` fails (``trainer_pt_utils`` subclasses torch's
   ``LRScheduler`` because ``is_accelerate_available()`` is true). accelerate cannot run without
   torch, so transformers is told it is unavailable while torch is disabled.
5. ``from_pretrained(..., from_pt=True, _do_init=False)`` (PyTorch safetensors into a model built
   without weights, what ``ftjax.models.load_model`` does) fails: the PyTorch->Flax converter reads
   ``model.params`` only for the parameter names and shapes, which a ``_do_init=False`` model does
   not have. The converter is given the model's ``params_shape_tree`` instead.
6. Packed fine-tuning needs attention kept inside each example of a row (and document attention
   inside each document of an LM block). The self-attention modules of ``SEGMENT_MASK_MODULES``
   (BERT family, GPT-2, Llama / Mistral / Gemma) turn the ``[batch, keys]`` padding mask into a
   bias with ``jnp.expand_dims(mask, axis=(-3, -2))``, which rejects a ``[batch, queries, keys]``
   mask. Those modules get a ``jnp`` whose ``expand_dims`` also takes such a mask (to ``[batch, 1,
   queries, keys]``, broadcast over heads); a 2-D mask goes the original way, so unpacked models
   compute exactly what they did. ``ftjax.segments`` builds the mask from segment ids.
7. Flax Llama / Mistral have no weight tying: with ``tie_word_embeddings`` (SmolLM2, Llama 3.2 1B...)
   they still create and train an ``lm_head`` of their own, a separate copy of the embedding (28M
   more parameters for SmolLM2-135M) that PyTorch ties to it. Their causal-LM ``__call__`` then
   computes the logits with the embedding matrix, as Flax GPT-2 / Gemma do, so the model has no
   ``lm_head`` parameter and trains what PyTorch trains; an untied config runs the original code.
8. DistilBERT's self-attention reshapes the padding mask to ``[batch, 1, 1, keys]`` with
   ``jnp.reshape``, which rejects the ``[batch, queries, keys]`` mask of packed rows (shim 6's case).
   Its module gets a ``jnp`` whose ``reshape`` makes such a mask ``[batch, 1, queries, keys]``; every
   other reshape, and a 2-D mask, go the original way.

Nothing happens at import: ``install()`` applies the shims, at once to modules already imported and
to the others when they are imported (an import hook). Code that builds a transformers Flax model
gets transformers from ``flax_transformers()``, which calls it; so do ``ftjax.models.load_model`` /
``model_config`` and ``ftjax.lm_inference``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import inspect
import sys
import types

import jax
import jax.numpy as jnp

# transformers modules that call jnp.clip(..., a_min/a_max=...) in 4.57.6.
CLIP_MODULES = ("transformers.models.t5.modeling_flax_t5",
                "transformers.models.longt5.modeling_flax_longt5")
LOGITS_MODULE = "transformers.generation.flax_logits_process"


def needs_clip_shim() -> bool:
    """True when this jax's ``jnp.clip`` no longer takes ``a_max``."""
    return "a_max" not in inspect.signature(jnp.clip).parameters


def clip(x, a_min=None, a_max=None, *, min=None, max=None):  # noqa: A002  (jnp.clip's own names)
    """``jnp.clip`` accepting both the old (``a_min`` / ``a_max``) and the new (``min`` / ``max``) names."""
    return jnp.clip(x, min=a_min if min is None else min, max=a_max if max is None else max)


class _NumpyWith(types.ModuleType):
    """Stands in for ``jax.numpy`` inside a patched module: every name is jax.numpy's except the
    shim's own functions given here."""

    def __init__(self, **functions):
        super().__init__("jax.numpy")
        self.__dict__.update(functions)

    def __getattr__(self, name):
        return getattr(jnp, name)


_JNP = _NumpyWith(clip=clip)  # shim 1


def expand_dims(a, axis):
    """``jnp.expand_dims``; a ``[batch, queries, keys]`` attention mask expanded at ``(-3, -2)``
    becomes ``[batch, 1, queries, keys]`` (one mask per query, shared by the heads)."""
    if getattr(a, "ndim", 0) == 3 and isinstance(axis, tuple) and tuple(axis) == (-3, -2):
        return a[:, None]
    return jnp.expand_dims(a, axis)


_SEGMENT_JNP = _NumpyWith(expand_dims=expand_dims)  # shim 6, inside SEGMENT_MASK_MODULES


def reshape(a, shape, *args, **kwargs):
    """``jnp.reshape``; a ``[batch, queries, keys]`` mask reshaped to ``(batch, 1, 1, keys)``
    becomes ``[batch, 1, queries, keys]``."""
    if getattr(a, "ndim", 0) == 3 and isinstance(shape, tuple) and len(shape) == 4 \
            and tuple(shape) == (a.shape[0], 1, 1, a.shape[2]):
        return a[:, None]
    return jnp.reshape(a, shape, *args, **kwargs)


_RESHAPE_JNP = _NumpyWith(reshape=reshape)  # shim 8, inside DistilBERT's module
DISTILBERT_MODULE = "transformers.models.distilbert.modeling_flax_distilbert"
# model_type -> the transformers module whose self-attention builds the mask bias (shim 6).
SEGMENT_MASK_MODULES = {
    "bert": "transformers.models.bert.modeling_flax_bert",
    "roberta": "transformers.models.roberta.modeling_flax_roberta",
    "xlm-roberta": "transformers.models.xlm_roberta.modeling_flax_xlm_roberta",
    "electra": "transformers.models.electra.modeling_flax_electra",
    # decoders: the padding mask joins the causal mask through the same expand_dims
    "gpt2": "transformers.models.gpt2.modeling_flax_gpt2",
    "llama": "transformers.models.llama.modeling_flax_llama",
    "mistral": "transformers.models.mistral.modeling_flax_mistral",
    "gemma": "transformers.models.gemma.modeling_flax_gemma",
}


def no_repeat_ngram_call(self, input_ids, scores, cur_len):
    """Dense ``FlaxNoRepeatNGramLogitsProcessor.__call__``: bans every token that would complete an
    n-gram already present in ``input_ids[:, :cur_len]``.

    Args:
      input_ids: ``[batch, max_length]`` sequences so far (positions >= cur_len are padding).
      scores: ``[batch, vocab]`` next-token scores.
      cur_len: number of valid positions (traced).
    """
    n = self.ngram_size
    batch, seq_len = input_ids.shape
    if seq_len < n:
        return scores
    count = seq_len - n + 1
    windows = jnp.stack([input_ids[:, j:j + count] for j in range(n)], axis=-1)  # [batch, count, n]
    prefix = jax.lax.dynamic_slice(input_ids, (0, jnp.maximum(cur_len - (n - 1), 0)), (batch, n - 1))
    complete = jnp.arange(count) + n <= cur_len  # n-grams fully inside the generated part
    match = (windows[..., :-1] == prefix[:, None, :]).all(-1) & complete[None, :]
    banned = jnp.zeros(scores.shape, bool).at[jnp.arange(batch)[:, None], windows[..., -1]].max(match)
    return jnp.where(banned, -jnp.inf, scores)


class _ShapesOnly:
    """A ``_do_init=False`` model as transformers' PyTorch->Flax converter uses it: parameter names
    and shapes (``params``: the model's shape tree) and ``base_model_prefix``."""

    def __init__(self, model):
        from flax.core import unfreeze
        self.params = unfreeze(model.params_shape_tree)
        self.base_model_prefix = model.base_model_prefix


def pt_loader_without_init(load):
    """Wraps ``load_pytorch_checkpoint_in_flax_state_dict`` so a model without weights can be loaded."""
    if getattr(load, "ftjax_shim", False):
        return load

    def wrapped(flax_model, *args, **kwargs):
        if not getattr(flax_model, "_is_initialized", True):
            flax_model = _ShapesOnly(flax_model)
        return load(flax_model, *args, **kwargs)

    wrapped.ftjax_shim = True
    return wrapped


def _patch(module) -> None:
    if module.__name__ in ROTARY_MODULES:
        from ftjax.rope import rotary_setup
        setattr(getattr(module, ROTARY_MODULES[module.__name__]), "setup", rotary_setup)
    if module.__name__ in TIED_HEAD_MODULES:
        cls = getattr(module, TIED_HEAD_MODULES[module.__name__])
        cls.__call__ = tied_causal_lm_call(cls.__call__)
    if module.__name__ == FLAX_UTILS_MODULE:
        module.load_pytorch_checkpoint_in_flax_state_dict = pt_loader_without_init(
            module.load_pytorch_checkpoint_in_flax_state_dict)
    elif module.__name__ == IMPORT_UTILS_MODULE:
        if not module.is_torch_available():
            module._accelerate_available = False
    elif module.__name__ in SEGMENT_MASK_MODULES.values():
        module.jnp = _SEGMENT_JNP
    elif module.__name__ == DISTILBERT_MODULE:
        module.jnp = _RESHAPE_JNP
    elif module.__name__ == LOGITS_MODULE:
        module.FlaxNoRepeatNGramLogitsProcessor.__call__ = no_repeat_ngram_call
    elif needs_clip_shim() and getattr(module, "jnp", None) is jnp:
        module.jnp = _JNP


def tied_causal_lm_call(original):
    """A Llama / Mistral causal-LM ``__call__`` that ties the output layer to the input embedding
    when the config says so (shim 7)."""
    if getattr(original, "ftjax_shim", False):
        return original

    def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic: bool = True,
                 init_cache: bool = False, output_attentions: bool = False, output_hidden_states: bool = False,
                 return_dict: bool = True):
        if not self.config.tie_word_embeddings:
            return original(self, input_ids, attention_mask, position_ids, deterministic, init_cache,
                            output_attentions, output_hidden_states, return_dict)
        outputs = self.model(input_ids, position_ids=position_ids, attention_mask=attention_mask,
                             deterministic=deterministic, init_cache=init_cache, output_attentions=output_attentions,
                             output_hidden_states=output_hidden_states, return_dict=return_dict)
        shared = self.model.variables["params"]["embed_tokens"]["embedding"].T
        logits = self.lm_head.apply({"params": {"kernel": shared}}, outputs[0])
        if not return_dict:
            return (logits,) + outputs[1:]
        from transformers.modeling_flax_outputs import FlaxCausalLMOutput
        return FlaxCausalLMOutput(logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    __call__.ftjax_shim = True
    return __call__


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds the listed modules with the normal machinery and patches them right after they execute."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in PATCHED_MODULES:
            return None
        sys.meta_path.remove(self)  # find the real spec without recursing into this finder
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


_FINDER = _PatchAfterImport()
ROTARY_MODULES = {"transformers.models.llama.modeling_flax_llama": "FlaxLlamaRotaryEmbedding",
                  "transformers.models.mistral.modeling_flax_mistral": "FlaxMistralRotaryEmbedding",
                  "transformers.models.gemma.modeling_flax_gemma": "FlaxGemmaRotaryEmbedding"}
TIED_HEAD_MODULES = {"transformers.models.llama.modeling_flax_llama": "FlaxLlamaForCausalLMModule",
                     "transformers.models.mistral.modeling_flax_mistral": "FlaxMistralForCausalLMModule"}
IMPORT_UTILS_MODULE = "transformers.utils.import_utils"
FLAX_UTILS_MODULE = "transformers.modeling_flax_utils"
PATCHED_MODULES = CLIP_MODULES + (LOGITS_MODULE, *ROTARY_MODULES, IMPORT_UTILS_MODULE, FLAX_UTILS_MODULE) \
    + tuple(SEGMENT_MASK_MODULES.values()) + (DISTILBERT_MODULE,)


def flax_transformers():
    """The ``transformers`` module, ready to build Flax models: PyTorch kept out of the process if
    transformers is not imported yet (``ftjax.runtime.transformers_without_torch``) and the shims
    installed. Idempotent and cheap after the first call.

    Example: ``flax_transformers().FlaxEncoderDecoderModel.from_encoder_decoder_pretrained(...)``.
    """
    from ftjax.runtime import transformers_without_torch

    transformers_without_torch()
    install()
    import transformers
    return transformers


def install() -> None:
    """Applies the shims (idempotent); called by the ftjax code that builds transformers models."""
    for name in PATCHED_MODULES:
        if name in sys.modules:
            _patch(sys.modules[name])
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
