"""Packing for language modelling: documents tokenized whole, joined with a separator, cut into blocks.

No token is padding except (with ``remainder="pad"``) the tail of the last block, so every step
computes real tokens and every block has the same shape (one compile)::

    docs  = ["a b c", "d e"]                       ->  ids [a b c SEP d e SEP]
    pack(ids, block_size=4, remainder="pad")       ->  [a b c SEP] [d e SEP <pad>]

``word_ids`` (one id per token, unique over the corpus, -1 on separators) let the MLM masking
choose whole words.

``pack_dataset`` never holds the corpus in memory: documents are tokenized by a (cached) batched
``datasets.map``; a second map over block numbers (``BlockReader``) reads for each batch of blocks
only the documents they span and writes the blocks to Arrow on disk. Both maps run over
``num_proc`` processes, and the result equals ``pack`` on the whole token stream.
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
                       map_fn: Optional[Callable] = None, num_proc: Optional[int] = None) -> datasets.Dataset:
    """``input_ids`` (and ``word_ids`` with their count ``num_words``) of every non-empty document, no
    special tokens, no truncation.
    ``map_fn(ds, function, name, **kwargs)`` runs the map (default ``Dataset.map``; ftjax passes a cached one)."""
    map_fn = map_fn or (lambda data, function, name, **kw: data.map(function, desc=name, **kw))

    def encode(batch):
        texts = [str(t) for t in batch[text_column] if str(t or "").strip()]
        if not texts:  # the tokenizer fails on an empty list
            return {"input_ids": [], **({"word_ids": [], "num_words": []} if with_word_ids else {})}
        enc = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)
        out = {"input_ids": enc["input_ids"]}
        if with_word_ids:
            out["word_ids"] = [[-1 if w is None else w for w in enc.word_ids(i)] for i in range(len(texts))]
            out["num_words"] = [max(w, default=-1) + 1 for w in out["word_ids"]]
        return out

    return map_fn(ds, encode, "tokenize", batched=True, remove_columns=ds.column_names, num_proc=num_proc)


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


class BlockReader:
    """A batched-map function over block numbers: each batch reads from the tokenized table only the
    documents its blocks span, joins them (each followed by the separator) and cuts the blocks out.
    ``ends`` (cumulative document lengths, separators included) and ``word_offsets`` place every
    document in the corpus-wide stream, so batches are independent: any order, any ``num_proc``,
    and the result equals ``pack`` on the whole stream."""

    def __init__(self, tokenized: datasets.Dataset, ends: np.ndarray, word_offsets: Optional[np.ndarray],
                 block_size: int, separator_id: int, total: int):
        self.tokenized, self.ends, self.word_offsets = tokenized, ends, word_offsets
        self.block_size, self.separator_id, self.total = block_size, separator_id, total

    def __call__(self, batch: dict) -> dict:
        numbers = np.asarray(batch["block"], np.int64)
        size = self.block_size
        lo, hi = int(numbers.min()) * size, min((int(numbers.max()) + 1) * size, self.total)
        first, last = np.searchsorted(self.ends, [lo, hi - 1], side="right")
        table = self.tokenized.with_format("arrow")[int(first):int(last) + 1]
        ids = table["input_ids"].combine_chunks()
        lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
        doc = np.repeat(np.arange(len(lengths)), lengths)
        at = np.arange(len(doc)) + doc  # a token's place in the joined stream (one separator per document)
        stream = np.full(int(lengths.sum()) + len(lengths), self.separator_id, np.int32)
        stream[at] = pc.list_flatten(ids).to_numpy(zero_copy_only=False)
        if self.word_offsets is not None:
            words = pc.list_flatten(table["word_ids"].combine_chunks()).to_numpy(zero_copy_only=False)
            word_stream = np.full(len(stream), -1, np.int64)
            word_stream[at] = np.where(words >= 0, words + self.word_offsets[first + doc], -1)
        base = int(self.ends[first]) - int(lengths[0]) - 1  # where this stream starts in the corpus
        cuts = [(b * size - base, min((b + 1) * size, self.total) - base) for b in numbers]
        out = {"input_ids": [stream[s:e] for s, e in cuts]}
        out["attention_mask"] = [np.ones(e - s, np.int8) for s, e in cuts]
        if self.word_offsets is not None:
            out["word_ids"] = [word_stream[s:e] for s, e in cuts]
        return out


def pack_dataset(ds: datasets.Dataset, tokenizer, block_size: int, separator_id: int, split: str = "train",
                 text_column: str = "text", remainder: str = "drop", with_word_ids: bool = False,
                 map_fn: Optional[Callable] = None, batch_size: int = 1000,
                 num_proc: Optional[int] = None) -> tuple[datasets.Dataset, PackStats]:
    """Tokenizes and packs one split with Arrow on disk, ``batch_size`` blocks at a time over
    ``num_proc`` processes; fails with one line when nothing is left to train on. ``map_fn`` as in
    ``tokenize_documents``."""
    map_fn = map_fn or (lambda data, function, name, **kw: data.map(function, desc=name, **kw))
    tokenized = tokenize_documents(ds, tokenizer, text_column, with_word_ids, map_fn, num_proc=num_proc)
    if len(tokenized) == 0:
        raise FtjaxError(f"{split} split: the corpus is empty (no non-blank text in column '{text_column}')")
    columns = tokenized.with_format("arrow")  # offsets and the small per-document column only
    ends = np.cumsum(pc.list_value_length(columns["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int64) + 1)
    word_offsets = None
    if with_word_ids:
        counts = columns["num_words"].to_numpy(zero_copy_only=False).astype(np.int64)
        word_offsets = np.cumsum(counts) - counts
    total = int(ends[-1])
    keep = total if remainder == "pad" else total // block_size * block_size
    stats = PackStats(documents=len(tokenized), tokens=keep, dropped_tokens=total - keep,
                      blocks=-(-keep // block_size), block_size=block_size)
    if stats.blocks == 0:
        raise FtjaxError(f"{split} split: {stats.dropped_tokens} tokens are fewer than one block of "
                         f"{block_size}; use task_options.remainder=pad or a smaller task_options.block_size")
    numbers = datasets.Dataset.from_dict({"block": np.arange(stats.blocks, dtype=np.int64)})
    reader = BlockReader(tokenized, ends, word_offsets, block_size, separator_id, keep)
    blocks = map_fn(numbers, reader, f"pack {block_size}", batched=True, remove_columns=["block"],
                    batch_size=batch_size, num_proc=num_proc,
                    features=datasets.Features({
                        "input_ids": datasets.Sequence(datasets.Value("int32")),
                        "attention_mask": datasets.Sequence(datasets.Value("int8")),
                        **({"word_ids": datasets.Sequence(datasets.Value("int64"))} if with_word_ids else {})}))
    return blocks, stats


def document_segments(input_ids: np.ndarray, attention_mask: np.ndarray, separator_id: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``segment_ids`` (1, 2, ... per document of each packed block, 0 on padding) and
    ``position_ids`` restarting at 0 with each document, ``[batch, block]``. A document ends with
    its separator; a block's first tokens continue a document begun in the block before."""
    begins = np.ones(input_ids.shape, bool)
    begins[:, 1:] = input_ids[:, :-1] == separator_id
    segments = np.cumsum(begins, axis=1, dtype=np.int32) * (attention_mask > 0)
    at = np.broadcast_to(np.arange(input_ids.shape[1], dtype=np.int32), input_ids.shape)
    starts = np.maximum.accumulate(np.where(begins, at, 0), axis=1)
    return segments.astype(np.int32), (at - starts).astype(np.int32)
