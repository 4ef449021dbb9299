"""BERT-style MLM masking on the host, in numpy, as a pure function of (seed, epoch, example index).

Each row draws from its own generator seeded by ``(seed, salt, epoch, index)``, so the masks of an
example do not depend on which batch it lands in, and a resumed run masks exactly as before.
"""

from __future__ import annotations

import numpy as np


def row_rng(seed: int, epoch: int, index: int, train: bool) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(train), int(epoch), int(index)])


def mask_row(ids: np.ndarray, candidates: np.ndarray, rng: np.random.Generator, probability: float,
             mask_id: int, vocab_size: int, word_ids: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """Masks one row.

    Args:
      ids: ``[length]`` token ids.
      candidates: ``[length]`` bool, tokens that may be masked (not special, not padding).
      rng: this row's generator.
      probability: share of candidate tokens (or whole words) chosen for prediction.
      mask_id / vocab_size: the [MASK] id and the range of random replacement tokens.
      word_ids: ``[length]`` word index of each token; when given, whole words are chosen.

    Returns:
      (inputs, labels): chosen tokens become [MASK] 80% / a random token 10% / unchanged 10%;
      labels hold the original id at chosen positions and -100 elsewhere.
    """
    length = len(ids)
    if word_ids is None:
        chosen = candidates & (rng.random(length) < probability)
    else:
        words = np.unique(word_ids[candidates & (word_ids >= 0)])
        picked = words[rng.random(len(words)) < probability]
        chosen = candidates & np.isin(word_ids, picked)
    action = rng.random(length)
    random_tokens = rng.integers(0, vocab_size, length)
    inputs = np.where(chosen & (action < 0.8), mask_id, ids)
    inputs = np.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, inputs)
    labels = np.where(chosen, ids, -100)
    return inputs.astype(ids.dtype), labels.astype(np.int32)


def mask_batch(batch: dict[str, np.ndarray], *, seed: int, epoch: int, train: bool, probability: float,
               mask_id: int, vocab_size: int, special_ids: np.ndarray, whole_word: bool = False
               ) -> dict[str, np.ndarray]:
    """A batch with masked ``input_ids`` and MLM ``labels``; padding rows (index -1) get no labels.
    ``word_ids`` is consumed (not sent to the device)."""
    batch = dict(batch)
    ids = batch["input_ids"]
    word_ids = batch.pop("word_ids", None)
    candidates = ~np.isin(ids, special_ids)
    if "attention_mask" in batch:
        candidates &= batch["attention_mask"] > 0
    inputs, labels = ids.copy(), np.full(ids.shape, -100, np.int32)
    for r, index in enumerate(batch["index"]):
        if index < 0:
            continue
        inputs[r], labels[r] = mask_row(ids[r], candidates[r], row_rng(seed, epoch, index, train), probability,
                                        mask_id, vocab_size, word_ids[r] if whole_word else None)
    batch["input_ids"], batch["labels"] = inputs, labels
    return batch
