"""Packing for language modelling: documents tokenized whole, joined with a separator, cut into blocks.

No token is padding except (with ``remainder="pad"``) the tail of the last block, so every step
computes real tokens and every block has the same shape (one compile)::

    docs  = ["a b c", "d e"]                       ->  ids [a b c SEP d e SEP]
    pack(ids, block_size=4, remainder="pad")       ->  [a b c SEP] [d e SEP <pad>]

``word_ids`` (one id per token, unique over the corpus, -1 on separators) let the MLM masking
choose whole words.
"""

from __future__ import annotations

import dataclasses

import datasets
import numpy as np

from ftjax.errors import FtjaxError


@dataclasses.dataclass
class PackStats:
    documents: int
    tokens: int  # real tokens kept in blocks (separators included)
    dropped_tokens: int  # the remainder, when dropped
    blocks: int
    block_size: int

    @property
    def efficiency(self) -> float:
        """Real tokens / tokens computed (1.0 unless the last block is padded)."""
        return self.tokens / max(self.blocks * self.block_size, 1)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "packing_efficiency": self.efficiency}


def tokenize_documents(ds: datasets.Dataset, tokenizer, text_column: str = "text", with_word_ids: bool = False,
                       num_proc: int | None = None) -> datasets.Dataset:
    """``input_ids`` (and ``word_ids``) of every non-empty document, no special tokens, no truncation."""
    ds = ds.filter(lambda ex: bool(str(ex[text_column] or "").strip()), num_proc=num_proc, desc="drop empty")

    def encode(batch):
        enc = tokenizer([str(t) for t in batch[text_column]], add_special_tokens=False, truncation=False,
                        verbose=False)
        out = {"input_ids": enc["input_ids"]}
        if with_word_ids:
            out["word_ids"] = [[-1 if w is None else w for w in enc.word_ids(i)] for i in range(len(enc["input_ids"]))]
        return out

    return ds.map(encode, batched=True, remove_columns=ds.column_names, num_proc=num_proc, desc="tokenize")


def pack(input_ids: list[list[int]], block_size: int, separator_id: int, remainder: str = "drop",
         word_ids: list[list[int]] | None = None) -> tuple[dict[str, list], PackStats]:
    """Joins documents (each followed by ``separator_id``) and cuts the stream into blocks.

    Args:
      input_ids: token ids per document.
      block_size: tokens per block.
      separator_id: the separator / EOS token appended to every document.
      remainder: ``drop`` the last partial block, or keep it (``pad``; the batcher pads it and
        ``attention_mask`` marks the real tokens).
      word_ids: per-document word index of each token (-1 for none); made unique over the corpus.

    Returns:
      Columns ``input_ids``, ``attention_mask`` (and ``word_ids``) as lists of blocks, and stats.
    """
    lengths = np.fromiter((len(x) + 1 for x in input_ids), np.int64, len(input_ids))
    stream = np.full(int(lengths.sum()), separator_id, np.int32)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    for s, ids in zip(starts, input_ids):
        stream[s:s + len(ids)] = ids
    words = None
    if word_ids is not None:
        words = np.full(len(stream), -1, np.int64)
        offset = 0
        for s, w in zip(starts, word_ids):
            w = np.asarray(w, np.int64)
            words[s:s + len(w)] = np.where(w >= 0, w + offset, -1)
            offset += int(w.max(initial=-1)) + 1
    total = len(stream)
    full = total // block_size
    keep = total if remainder == "pad" else full * block_size
    cuts = range(0, keep, block_size)
    columns = {"input_ids": [stream[i:i + block_size].tolist() for i in cuts]}
    columns["attention_mask"] = [[1] * len(b) for b in columns["input_ids"]]
    if words is not None:
        columns["word_ids"] = [words[i:i + block_size].tolist() for i in cuts]
    stats = PackStats(documents=len(input_ids), tokens=keep, dropped_tokens=total - keep,
                      blocks=len(columns["input_ids"]), block_size=block_size)
    return columns, stats


def pack_dataset(ds: datasets.Dataset, tokenizer, block_size: int, separator_id: int, split: str = "train",
                 text_column: str = "text", remainder: str = "drop", with_word_ids: bool = False,
                 num_proc: int | None = None) -> tuple[datasets.Dataset, PackStats]:
    """Tokenizes and packs one split; fails with one line when nothing is left to train on."""
    tokenized = tokenize_documents(ds, tokenizer, text_column, with_word_ids, num_proc)
    if len(tokenized) == 0:
        raise FtjaxError(f"{split} split: the corpus is empty (no non-blank text in column '{text_column}')")
    columns, stats = pack(tokenized["input_ids"], block_size, separator_id, remainder,
                          tokenized["word_ids"] if with_word_ids else None)
    if stats.blocks == 0:
        raise FtjaxError(f"{split} split: {stats.dropped_tokens} tokens are fewer than one block of "
                         f"{block_size}; use task_options.remainder=pad or a smaller task_options.block_size")
    return datasets.Dataset.from_dict(columns), stats
