"""Rotary position embeddings as PyTorch transformers computes them: ``rope_theta`` and ``rope_scaling``.

transformers' Flax Llama / Mistral / Gemma build their sin/cos table with base 10000 and no scaling,
whatever the config says; ``ftjax.compat`` replaces their rotary ``setup`` with ``rotary_setup``,
which builds the table from ``inv_frequencies`` (the same formulas as ``transformers.modeling_rope_utils``).

Implemented ``rope_type``s: ``default``, ``linear`` (positions divided by ``factor``) and ``llama3``
(Llama 3.1: low frequencies divided by ``factor``, a smooth blend between ``low_freq_factor`` and
``high_freq_factor``). The others (``dynamic``, whose frequencies change with each call's length,
``yarn``, ``longrope``...) are refused with one line by ``check_rope_scaling`` when the model's
config is read, rather than silently run as unscaled RoPE.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from ftjax.errors import FtjaxError

SUPPORTED = ("default", "linear", "llama3")


def rope_type(config) -> str:
    scaling = getattr(config, "rope_scaling", None) or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def check_rope_scaling(config) -> None:
    """One FtjaxError line when ``config.rope_scaling`` asks for a RoPE ftjax does not implement."""
    kind = rope_type(config)
    if kind not in SUPPORTED:
        raise FtjaxError(f"rope_scaling type '{kind}' ({type(config).__name__}) is not implemented in ftjax "
                         f"(supported: {', '.join(SUPPORTED)}); remove it from the model config or use a supported type")


def inv_frequencies(config, head_dim: int) -> np.ndarray:
    """The ``head_dim // 2`` inverse frequencies of ``config``'s RoPE (float64)."""
    check_rope_scaling(config)
    base = float(getattr(config, "rope_theta", 10000.0))
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    kind, scaling = rope_type(config), getattr(config, "rope_scaling", None) or {}
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        old_context = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return np.where(medium, blended, scaled)
    return inv_freq


def sincos_table(config, head_dim: int) -> jnp.ndarray:
    """``[max_position_embeddings, 1, 2 * head_dim]``: sin then cos, as transformers' Flax rotary layers index it."""
    freqs = np.outer(np.arange(config.max_position_embeddings), inv_frequencies(config, head_dim)).astype("float32")
    emb = np.concatenate((freqs, freqs), axis=-1)
    return jnp.array(np.concatenate((np.sin(emb)[:, None, :], np.cos(emb)[:, None, :]), axis=-1))


def rotary_setup(self) -> None:
    """``setup`` for transformers' Flax Llama / Mistral / Gemma rotary modules (``self.config``)."""
    cfg = self.config
    head_dim = getattr(cfg, "head_dim", None) if cfg.model_type == "gemma" else None
    self.sincos = sincos_table(cfg, head_dim or cfg.hidden_size // cfg.num_attention_heads)
