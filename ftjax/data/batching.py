"""Fixed-shape batches from tokenized examples: length buckets, length grouping, masked padding rows.

Every batch is padded to the smallest bucket length that fits its longest row, so the train step
compiles once per bucket. Fields of a ``LengthGroup`` (seq2seq targets) get their own bucket length,
chosen from the group's first field. A short last batch is filled with rows of weight 0 so evaluation never
drops examples and shapes never change. The batch order of an epoch is a pure function of
(seed, epoch), so a resumed run skips to its data position without reading anything.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence

import datasets
import jax
import numpy as np

# Value used to pad each known sequence field; a sequence field not listed pads with 0.
DEFAULT_PAD = {"attention_mask": 0, "token_type_ids": 0, "labels": -100, "special_tokens_mask": 1}


def bucket_lengths(buckets: list, max_length: int) -> list[int]:
    """Sorted bucket lengths capped at ``max_length`` (which is always a bucket)."""
    return sorted({int(b) for b in buckets if int(b) < max_length} | {int(max_length)})


@dataclasses.dataclass(frozen=True)
class LengthGroup:
    """Sequence fields padded to their own length: the smallest of ``buckets`` (capped at
    ``max_length``) that fits the longest row of ``fields[0]`` in the batch. Example: seq2seq
    ``LengthGroup(("labels",), max_length=64, buckets=(16, 32, 64))`` pads labels to 16/32/64
    whatever the source length. A group whose first field is absent (no labels at predict) is skipped."""

    fields: tuple
    max_length: int
    buckets: tuple = ()


@dataclasses.dataclass
class BatchStats:
    real_tokens: int = 0
    padded_tokens: int = 0

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / max(self.padded_tokens, 1)


class Batcher:
    """Turns a tokenized ``datasets.Dataset`` into numpy batches of a few fixed shapes.

    Args:
      ds: the whole split (every process holds it); this process reads rows ``process_index``,
        ``process_index + process_count``, ... Sequence columns are lists of ints, others scalars.
      batch_size: rows per batch on this process.
      max_length: the largest sequence length (last bucket).
      buckets: candidate padded lengths.
      pad_id: padding value of ``input_ids``.
      shuffle / group_by_length / window: training order; evaluation uses file order.
      process_index / process_count: for the global example ``index`` of each row.
      groups: ``LengthGroup``s of fields with their own padded length (default: every sequence
        field is padded to the ``input_ids`` bucket).
    """

    def __init__(self, ds: datasets.Dataset, batch_size: int, max_length: int, buckets: list,
                 pad_id: int, seed: int = 0, shuffle: bool = False, group_by_length: bool = False,
                 window: int = 32, process_index: int = 0, process_count: int = 1,
                 groups: Sequence[LengthGroup] = ()):
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.group_by_length, self.window = group_by_length, window
        self.buckets = bucket_lengths(buckets, max_length)
        self.pad = dict(DEFAULT_PAD, input_ids=pad_id, decoder_input_ids=pad_id)
        self.process_index, self.process_count = process_index, process_count
        cols, first = ds.column_names, ds[0]
        if process_count > 1:  # strided, so a global batch holds the rows a one-process run would
            ds = ds.shard(num_shards=process_count, index=process_index, contiguous=False)
        self.seq_fields = [c for c in cols if isinstance(first[c], list)]
        self.scalar_fields = [c for c in cols if c not in self.seq_fields]
        self.columns = ds[:]  # dict of python lists
        self.lengths = np.array([len(x) for x in self.columns["input_ids"]], np.int64)
        self.groups = [g for g in groups if g.fields[0] in self.seq_fields]
        self.group_lengths = [np.array([len(x) for x in self.columns[g.fields[0]]], np.int64) for g in self.groups]
        self.group_buckets = [bucket_lengths(g.buckets, g.max_length) for g in self.groups]
        self.field_group = {f: i for i, g in enumerate(self.groups) for f in g.fields}
        self.num_examples = len(ds)
        self.stats = BatchStats()

    def num_batches(self, num_examples: Optional[int] = None) -> int:
        n = self.num_examples if num_examples is None else num_examples
        return -(-n // self.batch_size)

    def epoch_order(self, epoch: int, num_batches: Optional[int] = None) -> list[np.ndarray]:
        """Row indices of each batch of an epoch; -1 marks a padding row."""
        n, bs = self.num_examples, self.batch_size
        order = np.arange(n)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n)
            if self.group_by_length:
                win = self.window * bs
                order = np.concatenate([
                    chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                    for chunk in np.array_split(order, range(win, n, win))])
        nb = self.num_batches() if num_batches is None else num_batches
        padded = np.full(nb * bs, -1)
        take = min(n, nb * bs)
        padded[:take] = order[:take]
        batches = list(padded.reshape(nb, bs))
        if self.shuffle and self.group_by_length:
            rng.shuffle(batches)
        return batches

    def padded_length(self, rows: np.ndarray, lengths: Optional[np.ndarray] = None,
                      buckets: Optional[list] = None) -> int:
        lengths = self.lengths if lengths is None else lengths
        buckets = self.buckets if buckets is None else buckets
        longest = int(lengths[rows[rows >= 0]].max(initial=1))
        return next((b for b in buckets if b >= longest), buckets[-1])

    def group_padded_lengths(self, rows: np.ndarray) -> list[int]:
        """The padded length of each ``LengthGroup`` for these rows."""
        return [self.padded_length(rows, n, b) for n, b in zip(self.group_lengths, self.group_buckets)]

    def make_batch(self, rows: np.ndarray, length: Optional[int] = None,
                   group_lengths: Optional[Sequence[int]] = None) -> dict[str, np.ndarray]:
        """Numpy arrays ``[batch, length]`` for sequence fields (a group's fields ``[batch, its
        length]``), ``[batch]`` for scalars, plus ``weight`` (1 real row, 0 padding row) and
        ``index`` (global example index, -1 padding)."""
        length = self.padded_length(rows) if length is None else length
        group_lengths = self.group_padded_lengths(rows) if group_lengths is None else group_lengths
        real = rows >= 0
        batch = {}
        for f in self.seq_fields:
            width = group_lengths[self.field_group[f]] if f in self.field_group else length
            arr = np.full((len(rows), width), self.pad.get(f, 0), np.int32)
            for i, r in enumerate(rows):
                if r >= 0:
                    seq = self.columns[f][r][:width]
                    arr[i, :len(seq)] = seq
            batch[f] = arr
        for f in self.scalar_fields:
            values = [self.columns[f][r] if r >= 0 else 0 for r in rows]
            batch[f] = np.asarray(values, np.float32 if isinstance(values[0], float) else np.int32)
        batch["weight"] = real.astype(np.float32)
        batch["index"] = np.where(real, rows * self.process_count + self.process_index, -1).astype(np.int32)
        self.stats.real_tokens += int(np.minimum(self.lengths[rows[real]], length).sum())
        self.stats.padded_tokens += len(rows) * length
        return batch

    def batches(self, epoch: int = 0, start: int = 0, num_batches: Optional[int] = None
                ) -> Iterator[dict[str, np.ndarray]]:
        """The epoch's batches from position ``start``; lengths agreed across processes."""
        order = self.epoch_order(epoch, num_batches)
        per_batch = [[self.padded_length(r)] + self.group_padded_lengths(r) for r in order]
        lengths = agree_max(np.ravel(per_batch).tolist()).reshape(len(order), -1) if order else []
        for rows, ls in list(zip(order, lengths))[start:]:
            yield self.make_batch(rows, int(ls[0]), [int(x) for x in ls[1:]])


def agree_max(values: list[int]) -> np.ndarray:
    """Elementwise max of an int list over all processes (identity with one process)."""
    arr = np.asarray(values, np.int32)
    if jax.process_count() == 1:
        return arr
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(arr)).max(axis=0)


def agree_min(value: int) -> int:
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return int(np.asarray(multihost_utils.process_allgather(np.int32(value))).min())
