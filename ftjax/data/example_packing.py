"""Short examples packed several to a row, each kept apart by segment ids (packed fine-tuning).

``pack_examples`` turns a tokenized split of short examples (tweets, sentences) into rows of at
most ``row_length`` tokens, best-fit decreasing, so that almost no padding is left. A packed row has

* every sequence field of the examples concatenated (``input_ids``, ``token_type_ids``, NER
  ``labels`` / ``word_start``...); ``attention_mask`` is replaced by
* ``segment_ids``: 1, 2, ... for the row's examples, and ``position_ids``: restarting at 0 each;
* per example (a list per row): ``segment_starts`` (first token, the CLS), ``segment_weight``
  (1 each), ``segment_index`` (the example's row in the unpacked split) and ``segment_<name>`` for
  each scalar field (classification ``labels`` -> ``segment_labels``).

``packed_groups`` gives the per-example lists their own padded length (``LengthGroup``), so the
batch's segment axis is as short as its fullest row needs. ``ftjax.segments`` turns the segment ids
into the model's block-diagonal attention. An example longer than ``row_length`` has been truncated
at tokenization (``model.max_length``), so every example fits in a row.
"""

from __future__ import annotations

import dataclasses

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ftjax.data.batching import LengthGroup
from ftjax.errors import FtjaxError

SEGMENT_FIELDS = ("segment_starts", "segment_weight", "segment_index")


@dataclasses.dataclass
class ExamplePackStats:
    """What packing did to a split: examples, rows and the share of row tokens that are real."""

    examples: int
    rows: int
    tokens: int
    row_length: int

    @property
    def examples_per_row(self) -> float:
        return self.examples / max(self.rows, 1)

    @property
    def fill(self) -> float:
        """Real tokens / (rows x row_length): the padding efficiency at full-length rows."""
        return self.tokens / max(self.rows * self.row_length, 1)

    def to_dict(self) -> dict:
        return {"examples": self.examples, "rows": self.rows, "tokens": self.tokens,
                "row_length": self.row_length, "examples_per_row": self.examples_per_row, "fill": self.fill}


def best_fit_bins(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Example indices of each bin: longest first, each into the fullest bin it still fits
    (best-fit decreasing; within a few percent of the fewest bins). Deterministic.

    >>> best_fit_bins(np.array([5, 3, 4, 2]), 8)
    [[0, 1], [2, 3]]
    """
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise FtjaxError(f"an example of {lengths.max()} tokens does not fit a packed row of {capacity}")
    open_bins: list[list[int]] = [[] for _ in range(capacity + 1)]  # room left -> bins with that room
    bins: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable"):
        need = int(lengths[i])
        room = next((r for r in range(need, capacity + 1) if open_bins[r]), None)
        if room is None:
            b, room = len(bins), capacity
            bins.append([])
        else:
            b = open_bins[room].pop()
        bins[b].append(int(i))
        left = room - need
        if left > 0:
            open_bins[left].append(b)
    return bins


def _list_column(values: pa.Array, counts: np.ndarray) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def pack_examples(ds: datasets.Dataset, row_length: int) -> tuple[datasets.Dataset, ExamplePackStats]:
    """Packs a tokenized split (columns: sequence fields with ``input_ids``, scalar fields) into
    rows of at most ``row_length`` tokens; see the module docstring for the columns."""
    table = ds.with_format("arrow")[:]
    if len(table) == 0:
        raise FtjaxError("data.packing: the train split is empty")
    lengths = pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
    bins = best_fit_bins(lengths, row_length)
    order = np.fromiter((i for b in bins for i in b), np.int64, count=len(lengths))
    per_row = np.array([len(b) for b in bins], np.int64)
    ordered = table.take(pa.array(order))
    seg_lengths = lengths[order]
    row_tokens = np.add.reduceat(seg_lengths, np.concatenate([[0], np.cumsum(per_row)[:-1]]))
    columns: dict[str, pa.Array] = {}
    for name in ordered.column_names:
        column = ordered[name].combine_chunks()
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            if name != "attention_mask":
                columns[name] = _list_column(column.flatten(), row_tokens)
        elif pa.types.is_integer(column.type):
            columns[f"segment_{name}"] = _list_column(column.cast(pa.int64()), per_row)
        else:
            raise FtjaxError(f"data.packing: column '{name}' ({column.type}) cannot be packed "
                             "(regression targets are not supported)")
    # segment ids 1..k and positions 0..len-1, per row
    segment_number = np.concatenate([np.arange(1, k + 1) for k in per_row])
    columns["segment_ids"] = _list_column(pa.array(np.repeat(segment_number, seg_lengths).astype(np.int32)),
                                          row_tokens)
    starts_in_stream = np.concatenate([[0], np.cumsum(seg_lengths)[:-1]])
    positions = np.arange(int(seg_lengths.sum())) - np.repeat(starts_in_stream, seg_lengths)
    columns["position_ids"] = _list_column(pa.array(positions.astype(np.int32)), row_tokens)
    row_start = np.repeat(np.concatenate([[0], np.cumsum(row_tokens)[:-1]]), per_row)
    columns["segment_starts"] = _list_column(pa.array((starts_in_stream - row_start).astype(np.int32)), per_row)
    columns["segment_weight"] = _list_column(pa.array(np.ones(len(order), np.int32)), per_row)
    columns["segment_index"] = _list_column(pa.array(order.astype(np.int32)), per_row)
    packed = datasets.Dataset(pa.table(columns))
    stats = ExamplePackStats(examples=len(lengths), rows=len(bins), tokens=int(lengths.sum()), row_length=row_length)
    return packed, stats


def packed_groups(ds: datasets.Dataset, row_length: int) -> tuple[LengthGroup, ...]:
    """The per-example fields of a packed split, padded together to one segment count for the whole
    split: its most examples in a row, rounded up to a power of two. One width means one compiled
    train step (a width per batch compiled it 3 times on 2,000 packed tweets, ~3 s each on a 2-core
    CPU); the extra columns cost a gather of a few rows more."""
    fields = SEGMENT_FIELDS + tuple(c for c in ds.column_names if c.startswith("segment_") and c not in SEGMENT_FIELDS
                                    and c != "segment_ids")
    most = int(pc.max(pc.list_value_length(ds.data.column("segment_starts"))).as_py() or 1)
    width = 1 << (most - 1).bit_length()
    return (LengthGroup(fields, width, (width,)),)


def packed_batch_rows(examples_per_batch: int, stats: ExamplePackStats, multiple: int) -> int:
    """Packed rows per batch that hold about ``examples_per_batch`` examples (so a packed run takes
    as many optimizer steps per epoch as an unpacked one): the nearest multiple of ``multiple``
    (devices x accumulation steps), at least one.

    >>> packed_batch_rows(64, ExamplePackStats(examples=96, rows=25, tokens=0, row_length=32), 16)
    16
    """
    rows = examples_per_batch / stats.examples_per_row
    return max(1, round(rows / multiple)) * multiple


def pack_for_training(task, model_config, rows: datasets.Dataset, examples_per_batch: int, multiple: int):
    """The train split packed for ``task``: ``(packed rows, global rows per batch, length groups,
    stats)``. FtjaxError when the task or the model family cannot train on packed rows."""
    from ftjax.segments import check_segment_support
    if not getattr(task, "packing", False):
        raise FtjaxError(f"data.packing: task {task.name} does not train on packed rows "
                         "(supported: classification, ner, token_classification)")
    check_segment_support(model_config)
    packed, stats = pack_examples(rows, task.max_length)
    groups = tuple(task.length_groups()) + packed_groups(packed, task.max_length)
    return packed, packed_batch_rows(examples_per_batch, stats, multiple), groups, stats
