"""The MLM head computed at the masked positions only.

A masked-LM model computes vocabulary logits for every token, but the loss reads only the ~15%
that were masked. For a small encoder the head is most of the step: MiniLM-L6's decoder (384 x
30,522) costs about as many FLOPs per token as its six layers together. Here the encoder runs on the
whole block, then its hidden states are gathered at the masked positions (``[batch, K]``) and only
they go through the family's LM head: the same loss and gradients (the unmasked logits were never
used), with the head's work cut to K / L.

K is static per block length (``capacity``: the mean masked count plus six standard deviations,
rounded up to 8), so one program serves nearly every batch; a batch with a row above it gets the
next multiple of 8 (one more compile, never a dropped label). The host (``gather_masked``) sends
``masked_positions`` and the labels gathered the same way; the device (``masked_logits``) computes
``[batch, K, vocab]``.

Families: BERT (``bert`` + ``cls``), RoBERTa and XLM-R (``roberta`` + ``lm_head``); others keep the
full logits (``SUPPORTED``). Document attention (segment ids) goes through the same path.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ftjax.segments import segment_inputs

# model_type -> (encoder attribute, head attribute) of transformers' Flax *ForMaskedLMModule
SUPPORTED = {"bert": ("bert", "cls"), "roberta": ("roberta", "lm_head"), "xlm-roberta": ("roberta", "lm_head")}
ALIGN = 8


def capacity(length: int, probability: float) -> int:
    """Masked positions kept per row: mean + 6 standard deviations of the masked count, rounded up."""
    mean = length * probability
    k = mean + 6 * math.sqrt(length * probability * (1 - probability))
    return min(length, ALIGN * math.ceil(k / ALIGN))


def gather_masked(batch: dict, probability: float) -> dict:
    """Host: ``masked_positions`` ``[B, K]`` (each row's masked token positions, then 0s) and
    ``labels`` gathered at them (-100 where a row has fewer than K)."""
    labels = batch["labels"]
    masked = labels >= 0
    k = max(capacity(labels.shape[1], probability), ALIGN * math.ceil(int(masked.sum(1).max(initial=0)) / ALIGN))
    k = min(k, labels.shape[1])
    positions = np.argsort(~masked, axis=1, kind="stable")[:, :k].astype(np.int32)  # masked first, in order
    kept = np.take_along_axis(masked, positions, axis=1)
    return {**batch, "masked_positions": np.where(kept, positions, 0).astype(np.int32),
            "labels": np.where(kept, np.take_along_axis(labels, positions, axis=1), -100).astype(np.int32)}


def _position_ids(model_config, input_ids):
    """The position ids transformers' own ``__call__`` would make for these ids."""
    if model_config.model_type in ("roberta", "xlm-roberta"):  # numbered after the padding id
        from transformers.models.roberta.modeling_flax_roberta import create_position_ids_from_input_ids
        return create_position_ids_from_input_ids(input_ids, model_config.pad_token_id)
    return jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)


def masked_logits(model, params, batch: dict, rng: Optional[jax.Array], train: bool) -> jax.Array:
    """``[B, K, vocab]``: the LM head at ``batch["masked_positions"]`` of the encoder's output."""
    encoder_name, head_name = SUPPORTED[model.config.model_type]
    if "segment_ids" in batch:  # document attention: block-diagonal mask, positions per document
        inputs = segment_inputs(model.config, batch)
    else:
        ids = batch["input_ids"]
        inputs = {"input_ids": ids, "attention_mask": batch.get("attention_mask", jnp.ones_like(ids)),
                  "position_ids": _position_ids(model.config, ids)}
    token_types = batch.get("token_type_ids", jnp.zeros_like(inputs["input_ids"]))

    def forward(module, input_ids, attention_mask, token_type_ids, position_ids, positions, deterministic):
        encoder = getattr(module, encoder_name)
        hidden = encoder(input_ids, attention_mask, token_type_ids, position_ids, None, deterministic=deterministic)[0]
        hidden = jnp.take_along_axis(hidden, positions[:, :, None], axis=1)
        shared = (encoder.variables["params"]["embeddings"]["word_embeddings"]["embedding"]
                  if module.config.tie_word_embeddings else None)
        return getattr(module, head_name)(hidden, shared_embedding=shared)

    from ftjax.models import apply_method
    return apply_method(model, params, forward, inputs["input_ids"], inputs["attention_mask"], token_types,
                        inputs["position_ids"], batch["masked_positions"], rng=rng, train=train)
