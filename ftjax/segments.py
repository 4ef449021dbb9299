"""Packed rows through a transformers Flax encoder: each example of a row sees only itself.

A packed row holds several examples one after the other; ``segment_ids`` numbers them 1, 2, ...
(0 is padding) and ``position_ids`` restarts at 0 with each. From them this module builds what the
model needs so that every example is computed exactly as if it were alone in its row:

* the attention mask ``[batch, L, L]``: a query attends to the keys of its own segment only (the
  BERT-family attention accepts it through the ``ftjax.compat`` shim 6, DistilBERT's through shim 8);
* position ids restarted per segment, shifted as the family numbers positions (RoBERTa / XLM-R
  start after ``pad_token_id``);
* for sequence classification, the head applied to each segment's first token (the CLS of each
  example): logits ``[batch, segments, labels]``. Token classification keeps the model's own
  per-token head.

The same mask and positions keep each document of a packed language-modelling block to itself
(``task_options.document_attention``; ``document_segments`` finds the documents on the host).

Supported: packed fine-tuning for the encoder families of ``FAMILIES`` (BERT, RoBERTa, XLM-R,
ELECTRA, DistilBERT; ``check_segment_support``), document attention for every family of
``compat.SEGMENT_MASK_MODULES`` (those and GPT-2, Llama, Mistral, Gemma;
``check_document_attention``). Any other is rejected with one line.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from ftjax import compat
from ftjax.errors import FtjaxError


def _cls_head_bert(module, cls, deterministic: bool):
    """BERT: pooler (dense + tanh on the first token), dropout, classifier."""
    pooled = module.bert.pooler(cls)
    return module.classifier(module.dropout(pooled, deterministic=deterministic))


def _cls_head_own(module, cls, deterministic: bool):
    """RoBERTa / XLM-R / ELECTRA: the classification head reads the first token itself."""
    return module.classifier(cls, deterministic=deterministic)


def _cls_head_distilbert(module, cls, deterministic: bool):
    """DistilBERT: dense + ReLU on the first token, dropout, classifier (its ``__call__``'s head)."""
    pooled = jax.nn.relu(module.pre_classifier(cls[:, 0]))
    return module.classifier(module.dropout(pooled, deterministic=deterministic))


def _hidden_distilbert(module, input_ids, attention_mask, token_type_ids, position_ids, deterministic: bool):
    """DistilBERT's encoder output with the given position ids (its embeddings count 0..L-1 themselves
    and take no ``position_ids``): word + position embeddings, LayerNorm, dropout, the layers."""
    encoder = module.distilbert
    embeddings = encoder.embeddings
    words = embeddings.word_embeddings(input_ids.astype("i4"))
    if encoder.config.sinusoidal_pos_embds:
        positions = jnp.take(embeddings.pos_encoding[0], position_ids, axis=0).astype(words.dtype)
    else:
        positions = embeddings.position_embeddings(position_ids.astype("i4"))
    hidden = embeddings.dropout(embeddings.LayerNorm(words + positions), deterministic=deterministic)
    return encoder.transformer(hidden, attention_mask, deterministic=deterministic)[0]


def _token_head_distilbert(module, hidden, deterministic: bool):
    """DistilBERT token classification: dropout, classifier."""
    return module.classifier(module.dropout(hidden, deterministic=deterministic))


@dataclasses.dataclass(frozen=True)
class Family:
    """How an encoder family takes packed rows of a classification task."""

    encoder: str  # attribute of the task module holding the encoder (FlaxBertModule...)
    cls_head: Callable  # (task module, [n, 1, hidden], deterministic) -> [n, labels]
    # For a family whose __call__ takes no position_ids: (task module, ids, mask, token types, positions,
    # deterministic) -> hidden states, and the token-classification head on them.
    hidden: Optional[Callable] = None
    token_head: Optional[Callable] = None

    def encode(self, module, input_ids, attention_mask, token_type_ids, position_ids, deterministic: bool):
        if self.hidden is not None:
            return self.hidden(module, input_ids, attention_mask, token_type_ids, position_ids, deterministic)
        return getattr(module, self.encoder)(input_ids, attention_mask, token_type_ids, position_ids, None,
                                             deterministic=deterministic)[0]


FAMILIES: dict[str, Family] = {
    "bert": Family("bert", _cls_head_bert),
    "electra": Family("electra", _cls_head_own),
    "roberta": Family("roberta", _cls_head_own),
    "xlm-roberta": Family("roberta", _cls_head_own),
    # the mask through compat shim 8, the positions through _hidden_distilbert
    "distilbert": Family("distilbert", _cls_head_distilbert, _hidden_distilbert, _token_head_distilbert),
}
assert set(FAMILIES) - {"distilbert"} <= set(compat.SEGMENT_MASK_MODULES)


def first_position(model_config) -> int:
    """Position id of a segment's first token: RoBERTa / XLM-R number from ``pad_token_id + 1``."""
    return model_config.pad_token_id + 1 if model_config.model_type in ("roberta", "xlm-roberta") else 0


def _check(model_config, supported, setting: str) -> None:
    model_type = getattr(model_config, "model_type", None)
    if model_type not in supported:
        raise FtjaxError(f"{setting}: {model_type} models do not support it (supported: "
                         f"{', '.join(sorted(supported))}); set {setting}=false")
    compat.install()


def check_segment_support(model_config) -> None:
    """FtjaxError unless packed rows of a classification task can go through this model family."""
    _check(model_config, FAMILIES, "data.packing")


def check_document_attention(model_config) -> None:
    """FtjaxError unless this family takes the segment mask (LM document attention)."""
    _check(model_config, compat.SEGMENT_MASK_MODULES, "task_options.document_attention")


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """``[batch, L, L]`` int32: 1 where query and key are in the same (non-padding) segment."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & (segment_ids[:, None, :] > 0)).astype(jnp.int32)


def segment_inputs(model_config, batch: dict) -> dict:
    """The model inputs of a packed batch: ids, block-diagonal mask, restarted positions."""
    compat.install()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": segment_mask(batch["segment_ids"]),
              "position_ids": batch["position_ids"] + first_position(model_config)}
    if "token_type_ids" in batch:
        inputs["token_type_ids"] = batch["token_type_ids"]
    return inputs


def packed_token_logits(model, params, batch: dict, rng: Optional[jax.Array], train: bool) -> jax.Array:
    """``[batch, L, labels]``: a token-classification (or LM) model's logits of a packed batch."""
    from ftjax.models import apply_method, forward
    inputs = segment_inputs(model.config, batch)
    family = FAMILIES.get(model.config.model_type)
    if family is None or family.token_head is None:  # the class's own __call__ takes the positions
        return forward(model, params, inputs, rng, train).logits

    def token_logits(module, input_ids, attention_mask, position_ids, deterministic):
        hidden = family.encode(module, input_ids, attention_mask, None, position_ids, deterministic)
        return family.token_head(module, hidden, deterministic)

    return apply_method(model, params, token_logits, inputs["input_ids"], inputs["attention_mask"],
                        inputs["position_ids"], rng=rng, train=train)


def packed_sequence_logits(model, params, batch: dict, rng: Optional[jax.Array], train: bool) -> jax.Array:
    """``[batch, segments, labels]``: a sequence-classification model's logits of each segment,
    its head applied to the segment's first token (``batch["segment_starts"]``)."""
    from ftjax.models import apply_method
    inputs = segment_inputs(model.config, batch)
    family = FAMILIES[model.config.model_type]

    def forward(module, input_ids, attention_mask, token_type_ids, position_ids, starts, deterministic):
        hidden = family.encode(module, input_ids, attention_mask, token_type_ids, position_ids, deterministic)
        cls = jnp.take_along_axis(hidden, starts[:, :, None], axis=1)  # [batch, segments, hidden]
        rows, segments, width = cls.shape
        return family.cls_head(module, cls.reshape(rows * segments, 1, width), deterministic).reshape(rows, segments, -1)

    token_types = inputs.get("token_type_ids", jnp.zeros_like(inputs["input_ids"]))
    return apply_method(model, params, forward, inputs["input_ids"], inputs["attention_mask"], token_types,
                        inputs["position_ids"], batch["segment_starts"], rng=rng, train=train)
