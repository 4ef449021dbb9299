"""Fill-mask and text generation with a Flax masked / causal LM (what ``ftjax predict`` runs for
``task: mlm`` / ``task: clm``), usable on their own::

    model = FlaxAutoModelForMaskedLM.from_pretrained(folder); tok = AutoTokenizer.from_pretrained(folder)
    fill_mask(model, tok, ["Paris is the [MASK] of France."], top_k=3)
    # zero-shot sentiment: compare the scores of two target words at the mask
    fill_mask(model, tok, [review + " My opinion of the movie is [MASK]."], targets=["positive", "negative"])

    model = FlaxAutoModelForCausalLM.from_pretrained(folder)
    generate_text(model, tok, ["The capital of France is"], max_new_tokens=8)            # greedy
    generate_text(model, tok, prompts, do_sample=True, temperature=0.8, top_p=0.9, seed=1)

Inputs are padded to a multiple of 16 tokens (generation pads on the left), so a few shapes compile.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ftjax import compat
from ftjax.errors import FtjaxError

PAD_MULTIPLE = 16


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield i, items[i:i + size]


def target_ids(tokenizer, targets: list[str]) -> list[int]:
    """The first token of each target word (as the fill-mask pipeline does)."""
    ids = []
    for t in targets:
        pieces = tokenizer(str(t), add_special_tokens=False, verbose=False)["input_ids"]
        if not pieces:
            raise FtjaxError(f"fill-mask target {t!r} has no tokens")
        ids.append(pieces[0])
    return ids


@functools.partial(jax.jit, static_argnames=("model", "top_k"))
def _mask_scores(model, params, input_ids, attention_mask, top_k: int, targets):
    from ftjax.models import forward
    logits = forward(model, params, {"input_ids": input_ids, "attention_mask": attention_mask}, None, False).logits
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    if targets is not None:
        return probs[..., targets], jnp.broadcast_to(targets, probs.shape[:-1] + targets.shape)
    return jax.lax.top_k(probs, top_k)


def fill_mask(model, tokenizer, texts: list[str], top_k: int = 5, targets: Optional[list[str]] = None,
              params=None, batch_size: int = 8, max_length: Optional[int] = None) -> list[list[list[dict]]]:
    """Candidates for every mask token of every text.

    Returns:
      ``result[text][mask]`` = candidates ``{"token", "token_str", "score"}``, best first: the
      ``top_k`` most probable tokens, or the ``targets`` (their first token) ranked by probability.
    """
    compat.install()  # a model built outside ftjax.models gets the Flax fixes too (ftjax/compat.py)
    if tokenizer.mask_token_id is None:
        raise FtjaxError("fill-mask needs a tokenizer with a mask token")
    for i, text in enumerate(texts):
        if tokenizer.mask_token not in str(text):
            raise FtjaxError(f"fill-mask input {i}: no {tokenizer.mask_token} in {str(text)[:60]!r}")
    params = model.params if params is None else params
    tids = jnp.asarray(target_ids(tokenizer, targets), jnp.int32) if targets else None
    results = []
    for _, chunk in _batches(list(texts), batch_size):
        enc = tokenizer([str(t) for t in chunk], padding=True, truncation=max_length is not None,
                        max_length=max_length, pad_to_multiple_of=PAD_MULTIPLE, return_tensors="np")
        scores, ids = jax.device_get(_mask_scores(model, params, enc["input_ids"], enc["attention_mask"],
                                                  top_k, tids))
        for row, input_ids in enumerate(enc["input_ids"]):
            per_mask = []
            for pos in np.flatnonzero(input_ids == tokenizer.mask_token_id):
                order = np.argsort(-scores[row, pos], kind="stable")
                per_mask.append([{"token": int(ids[row, pos, j]), "token_str": tokenizer.decode([int(ids[row, pos, j])]).strip(),
                                  "score": float(scores[row, pos, j])} for j in order])
            results.append(per_mask)
    return results


@functools.partial(jax.jit, static_argnames=("model", "options"))
def _generate(model, params, input_ids, attention_mask, key, options: tuple):
    from ftjax.models import generate
    return generate(model, params, input_ids, attention_mask=attention_mask, prng_key=key, **dict(options))


def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, do_sample: bool = False,
                  temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0, seed: int = 0,
                  params=None, batch_size: int = 8, max_length: Optional[int] = None) -> list[str]:
    """Continuations of each prompt (the generated text only, special tokens removed): greedy, or
    sampled with temperature / top-k (0 = off) / top-p; the same seed gives the same text."""
    compat.install()  # e.g. Llama's rope_theta for a model built outside ftjax.models (ftjax/compat.py)
    params = model.params if params is None else params
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options = {"max_new_tokens": int(max_new_tokens), "do_sample": bool(do_sample), "pad_token_id": pad_id,
               "eos_token_id": tokenizer.eos_token_id}
    if do_sample:
        options.update(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    padding_side, truncation_side = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"  # prompts end where generation starts
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    key = jax.random.PRNGKey(seed)
    texts = []
    try:
        for start, chunk in _batches(list(prompts), batch_size):
            enc = tokenizer([str(p) for p in chunk], padding=True, truncation=max_length is not None,
                            max_length=max_length, pad_to_multiple_of=PAD_MULTIPLE, return_tensors="np")
            seqs = _generate(model, params, enc["input_ids"], enc["attention_mask"], jax.random.fold_in(key, start),
                             tuple(sorted(options.items())))
            new = np.asarray(seqs)[:, enc["input_ids"].shape[1]:]
            texts += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = padding_side, truncation_side
    return texts
