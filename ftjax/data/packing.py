"""Packing for language modelling: documents tokenized whole, joined with a separator, cut into blocks.

No token is padding except (with ``remainder="pad"``) the tail of the last block, so every step
computes real tokens and every block has the same shape (one compile)::

    docs  = ["a b c", "d e"]                       ->  ids [a b c SEP d e SEP]
    pack(ids, block_size=4, remainder="pad")       ->  [a b c SEP] [d e SEP <pad>]

``word_ids`` (one id per token, unique over the corpus, -1 on separators) let the MLM masking
choose whole words.

``pack_dataset`` never holds the corpus in memory: documents are tokenized by a (cached) batched
``datasets.map``, and a second, sequential map (``BlockPacker``) streams them into blocks written
to Arrow on disk, carrying the unfinished block from one map batch to the next; its result equals
``pack`` on the whole token stream.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import datasets
import numpy as np
import pyarrow.compute as pc

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
                       map_fn: Optional[Callable] = None) -> datasets.Dataset:
    """``input_ids`` (and ``word_ids``) of every non-empty document, no special tokens, no truncation.
    ``map_fn(ds, function, name, **kwargs)`` runs the map (default ``Dataset.map``; ftjax passes a cached one)."""
    map_fn = map_fn or (lambda data, function, name, **kw: data.map(function, desc=name, **kw))

    def encode(batch):
        texts = [str(t) for t in batch[text_column] if str(t or "").strip()]
        if not texts:  # the tokenizer fails on an empty list
            return {"input_ids": [], **({"word_ids": []} if with_word_ids else {})}
        enc = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)
        out = {"input_ids": enc["input_ids"]}
        if with_word_ids:
            out["word_ids"] = [[-1 if w is None else w for w in enc.word_ids(i)] for i in range(len(texts))]
        return out

    return map_fn(ds, encode, "tokenize", batched=True, remove_columns=ds.column_names)


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


class BlockPacker:
    """A stateful batched-map function: documents in, ``block_size`` blocks out. The tail that does
    not fill a block waits for the next batch; the last batch (it holds row ``num_rows - 1``) also
    emits the remainder (``pad``) or drops it. Needs the batches in order (``num_proc=None``)."""

    def __init__(self, block_size: int, separator_id: int, num_rows: int, remainder: str, with_word_ids: bool):
        self.block_size, self.separator_id, self.num_rows = block_size, separator_id, num_rows
        self.remainder, self.with_word_ids = remainder, with_word_ids
        self.ids = np.zeros(0, np.int32)
        self.words = np.zeros(0, np.int64)
        self.word_offset = 0

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        docs = batch["input_ids"]
        ids = [self.ids] + [np.append(np.asarray(d, np.int32), np.int32(self.separator_id)) for d in docs]
        self.ids = np.concatenate(ids)
        if self.with_word_ids:
            parts = [self.words]
            for w in batch["word_ids"]:
                w = np.asarray(w, np.int64)
                parts.append(np.append(np.where(w >= 0, w + self.word_offset, -1), -1))
                self.word_offset += int(w.max(initial=-1)) + 1
            self.words = np.concatenate(parts)
        last = bool(indices) and indices[-1] == self.num_rows - 1
        full = len(self.ids) // self.block_size * self.block_size
        keep = len(self.ids) if last and self.remainder == "pad" else full
        cuts = range(0, keep, self.block_size)
        out = {"input_ids": [self.ids[i:i + self.block_size] for i in cuts]}
        out["attention_mask"] = [np.ones(len(b), np.int8) for b in out["input_ids"]]
        if self.with_word_ids:
            out["word_ids"] = [self.words[i:i + self.block_size] for i in cuts]
            self.words = self.words[full:]
        self.ids = self.ids[full:]
        return out


def pack_dataset(ds: datasets.Dataset, tokenizer, block_size: int, separator_id: int, split: str = "train",
                 text_column: str = "text", remainder: str = "drop", with_word_ids: bool = False,
                 map_fn: Optional[Callable] = None, batch_size: int = 1000) -> tuple[datasets.Dataset, PackStats]:
    """Tokenizes and packs one split with Arrow on disk, ``batch_size`` documents at a time; fails
    with one line when nothing is left to train on. ``map_fn`` as in ``tokenize_documents``."""
    map_fn = map_fn or (lambda data, function, name, **kw: data.map(function, desc=name, **kw))
    tokenized = tokenize_documents(ds, tokenizer, text_column, with_word_ids, map_fn)
    if len(tokenized) == 0:
        raise FtjaxError(f"{split} split: the corpus is empty (no non-blank text in column '{text_column}')")
    total = int(pc.sum(pc.list_value_length(tokenized.with_format("arrow")["input_ids"])).as_py()) + len(tokenized)
    keep = total if remainder == "pad" else total // block_size * block_size
    stats = PackStats(documents=len(tokenized), tokens=keep, dropped_tokens=total - keep,
                      blocks=-(-keep // block_size), block_size=block_size)
    if stats.blocks == 0:
        raise FtjaxError(f"{split} split: {stats.dropped_tokens} tokens are fewer than one block of "
                         f"{block_size}; use task_options.remainder=pad or a smaller task_options.block_size")
    packer = BlockPacker(block_size, separator_id, len(tokenized), remainder, with_word_ids)
    blocks = map_fn(tokenized, packer, f"pack {block_size}", batched=True, with_indices=True,
                    remove_columns=tokenized.column_names, batch_size=batch_size, num_proc=None,
                    features=datasets.Features({
                        "input_ids": datasets.Sequence(datasets.Value("int32")),
                        "attention_mask": datasets.Sequence(datasets.Value("int8")),
                        **({"word_ids": datasets.Sequence(datasets.Value("int64"))} if with_word_ids else {})}))
    return blocks, stats
