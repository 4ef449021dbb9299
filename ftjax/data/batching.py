"""Fixed-shape batches from tokenized examples: length buckets, length grouping, masked padding rows.

Rows are read from the split's (memory-mapped) Arrow table batch by batch and padded with numpy:
no split is ever held as Python objects, so host memory does not grow with the corpus.

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
import pyarrow as pa
import pyarrow.compute as pc

# Value used to pad each known sequence field; a sequence field not listed pads with 0.
DEFAULT_PAD = {"attention_mask": 0, "token_type_ids": 0, "labels": -100, "special_tokens_mask": 1}


def bucket_lengths(buckets: list, max_length: int) -> list[int]:
    """Sorted bucket lengths capped at ``max_length`` (which is always a bucket)."""
    return sorted({int(b) for b in buckets if int(b) < max_length} | {int(max_length)})


def choose_buckets(lengths: np.ndarray, max_length: int, max_buckets: int = 4, multiple: int = 8) -> list[int]:
    """Bucket lengths that minimise the padding of ``lengths`` with at most ``max_buckets`` shapes
    used (one compile each): exact dynamic programming over the length histogram, candidates the
    multiples of ``multiple`` (friendly to the matmul tiling) up to the longest length. ``max_length``
    is always the last bucket too (for rows longer than any of these). Each length counts as padded
    to its own bucket (``Batcher`` passes the longest row of each batch).

    >>> choose_buckets(np.array([10, 12, 30, 31, 60]), 64, max_buckets=3)
    [16, 32, 64]
    """
    lengths = np.minimum(np.asarray(lengths, np.int64), max_length)
    if len(lengths) == 0 or max_buckets <= 1:
        return [int(max_length)]
    top = min(int(max_length), -(-int(lengths.max()) // multiple) * multiple)  # the longest needs this
    candidates = np.array(sorted({c for c in range(multiple, top, multiple)} | {top}))
    # rows[i]: rows whose smallest fitting candidate is i; cost of a bucket c serving candidates
    # (j, i]: sum over those rows of c - length = count * c - token sum.
    slot = np.searchsorted(candidates, lengths)
    count = np.bincount(slot, minlength=len(candidates)).astype(np.float64)
    tokens = np.bincount(slot, weights=lengths, minlength=len(candidates))
    cum_count, cum_tokens = np.concatenate([[0], np.cumsum(count)]), np.concatenate([[0], np.cumsum(tokens)])
    n = len(candidates)
    inf = float("inf")
    # best[k][i]: least padding of candidates [0, i] with k buckets, the last one candidates[i].
    best = np.full((max_buckets + 1, n), inf)
    back = np.zeros((max_buckets + 1, n), np.int64)
    for i in range(n):
        best[1, i] = cum_count[i + 1] * candidates[i] - cum_tokens[i + 1]
    for k in range(2, max_buckets + 1):
        for i in range(1, n):
            j = np.arange(i)  # previous bucket candidates[j]; this one serves (j, i]
            cost = best[k - 1, j] + (cum_count[i + 1] - cum_count[j + 1]) * candidates[i] \
                - (cum_tokens[i + 1] - cum_tokens[j + 1])
            back[k, i], best[k, i] = int(np.argmin(cost)), float(np.min(cost))
    least = best[1:, n - 1].min()
    k = min(k for k in range(1, max_buckets + 1) if best[k, n - 1] <= least)  # the fewest shapes that do it
    chosen, i = [], n - 1
    while k >= 1:
        chosen.append(int(candidates[i]))
        i, k = int(back[k, i]), k - 1
    return sorted(set(chosen) | {int(max_length)})  # max_length: no batch of these lengths uses it


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
      buckets: candidate padded lengths; None: chosen from the lengths of this split's batches
        (``choose_buckets`` over ``_batch_maxima``, at most ``max_buckets`` shapes).
      pad_id: padding value of ``input_ids``.
      shuffle / group_by_length / window: training order (shuffled windows of ``window`` batches,
        each sorted by length); otherwise file order.
      sort_by_length: evaluation order: the whole split sorted by length, longest first, so each
        batch pads little (the trainer puts outputs back in row order by ``index``).
      process_index / process_count: for the global example ``index`` of each row.
      groups: ``LengthGroup``s of fields with their own padded length (default: every sequence
        field is padded to the ``input_ids`` bucket).
    """

    pack_stats = None  # packed training rows: their ``example_packing.ExamplePackStats`` (set by the trainer)

    def __init__(self, ds: datasets.Dataset, batch_size: int, max_length: int, buckets: Optional[list],
                 pad_id: int, seed: int = 0, shuffle: bool = False, group_by_length: bool = False,
                 window: int = 32, process_index: int = 0, process_count: int = 1,
                 groups: Sequence[LengthGroup] = (), max_buckets: int = 4, sort_by_length: bool = False):
        self.batch_size, self.seed, self.shuffle, self.sort_by_length = batch_size, seed, shuffle, sort_by_length
        self.group_by_length, self.window = group_by_length, window
        self.pad = dict(DEFAULT_PAD, input_ids=pad_id, decoder_input_ids=pad_id)
        self.rows = ds.with_format("arrow")  # ``rows[[i, j]]`` -> a pyarrow Table of those rows
        # This process's rows, strided, so a global batch holds the rows a one-process run would.
        self.global_rows = np.arange(process_index, len(ds), process_count)
        schema = ds.features.arrow_schema
        self.seq_fields = [f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)]
        self.scalar_fields = [f.name for f in schema if f.name not in self.seq_fields]
        self.lengths = self._lengths("input_ids")
        self.groups = [g for g in groups if g.fields[0] in self.seq_fields]
        self.group_lengths = [self._lengths(g.fields[0]) for g in self.groups]
        self.group_buckets = [bucket_lengths(g.buckets, g.max_length) for g in self.groups]
        self.field_group = {f: i for i, g in enumerate(self.groups) for f in g.fields}
        self.num_examples = len(self.global_rows)
        self.buckets = bucket_lengths(buckets or [], max_length)
        if buckets is None:
            self.buckets = choose_buckets(self._batch_maxima(), max_length, max_buckets)
        self.stats = BatchStats()

    def _lengths(self, field: str) -> np.ndarray:
        """Length of each of this process's rows of a sequence field, from the Arrow offsets of the
        memory-mapped column (no row is decoded or copied)."""
        if len(self.rows) == 0:
            return np.zeros(0, np.int64)
        every = pc.list_value_length(self.rows[field]).to_numpy(zero_copy_only=False)
        return every[self.global_rows].astype(np.int64)

    def _batch_maxima(self) -> np.ndarray:
        """The longest row of each global batch of the first epoch (agreed by all processes): the
        lengths buckets are chosen for, since a batch is padded to its longest row. Later epochs
        shuffle differently but draw from the same histogram."""
        nb = int(agree_max([self.num_batches()])[0])
        return agree_max([int(self.lengths[r[r >= 0]].max(initial=1)) for r in self.epoch_order(0, nb)])

    def num_batches(self, num_examples: Optional[int] = None) -> int:
        n = self.num_examples if num_examples is None else num_examples
        return -(-n // self.batch_size)

    def epoch_order(self, epoch: int, num_batches: Optional[int] = None) -> list[np.ndarray]:
        """Row indices of each batch of an epoch; -1 marks a padding row."""
        n, bs = self.num_examples, self.batch_size
        order = np.arange(n)
        if self.sort_by_length:
            order = np.argsort(-self.lengths, kind="stable")
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
        table = self.rows[self.global_rows[rows[real]].tolist()]
        batch = {}
        for f in self.seq_fields:
            width = group_lengths[self.field_group[f]] if f in self.field_group else length
            arr = np.full((len(rows), width), self.pad.get(f, 0), np.int32)
            arr[real] = pad_lists(table.column(f), width, self.pad.get(f, 0))
            batch[f] = arr
        for f in self.scalar_fields:
            column = table.column(f)
            dtype = np.float32 if pa.types.is_floating(column.type) else np.int32
            values = np.zeros(len(rows), dtype)
            values[real] = column.to_numpy(zero_copy_only=False)
            batch[f] = values
        batch["weight"] = real.astype(np.float32)
        batch["index"] = np.where(real, self.global_rows[np.maximum(rows, 0)], -1).astype(np.int32)
        self.stats.real_tokens += int(np.minimum(self.lengths[rows[real]], length).sum())
        self.stats.padded_tokens += len(rows) * length
        return batch

    def largest_batch(self, size: int) -> dict[str, np.ndarray]:
        """A batch of ``size`` rows (the first rows, then padding rows) padded to the last bucket of
        every length group: the largest shapes this batcher produces, for compiling a step ahead of
        time (``ftjax plan``, ``training.auto_eval_batch_size``)."""
        order = np.full(size, -1)
        order[:min(size, self.num_examples)] = np.arange(min(size, self.num_examples))
        return self.make_batch(order, self.buckets[-1], [b[-1] for b in self.group_buckets])

    def batches(self, epoch: int = 0, start: int = 0, num_batches: Optional[int] = None
                ) -> Iterator[dict[str, np.ndarray]]:
        """The epoch's batches from position ``start``; lengths agreed across processes."""
        order = self.epoch_order(epoch, num_batches)
        per_batch = [[self.padded_length(r)] + self.group_padded_lengths(r) for r in order]
        lengths = agree_max(np.ravel(per_batch).tolist()).reshape(len(order), -1) if order else []
        for rows, ls in list(zip(order, lengths))[start:]:
            yield self.make_batch(rows, int(ls[0]), [int(x) for x in ls[1:]])


def pad_lists(column: pa.ChunkedArray, width: int, pad_value: int) -> np.ndarray:
    """``[rows, width]`` int32 from an Arrow list column: each list cut or padded to ``width``."""
    column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if len(column) == 0:
        return np.zeros((0, width), np.int32)
    column = column.cast(pa.list_(pa.int64())) if not pa.types.is_list(column.type) else column
    offsets = column.offsets.to_numpy()
    values = column.flatten().to_numpy(zero_copy_only=False)  # the values of these rows only
    starts, lengths = offsets[:-1] - offsets[0], np.diff(offsets)
    positions = np.arange(width)[None, :]
    valid = positions < lengths[:, None]
    gathered = values[np.minimum(starts[:, None] + positions, max(len(values) - 1, 0))] if len(values) else 0
    return np.where(valid, gathered, pad_value).astype(np.int32)


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
