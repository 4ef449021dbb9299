"""``data.streaming: true``: train MLM / CLM on a corpus read as a ``datasets.IterableDataset``,
never copied to local Arrow.

    documents (file order, this process's share) -> seeded shuffle buffer -> tokenize -> pack -> batches

* **Split over processes**: ``datasets.distributed.split_dataset_by_node`` gives each process its
  own shards, or every ``process_count``-th example: the streams are disjoint.
* **Shuffle**: a buffer of ``data.shuffle_buffer`` documents drawn from by a generator seeded with
  (seed, stream epoch, process), so the order of a stream epoch is a pure function of those.
* **Packing on the fly**: documents are tokenized ``TOKENIZE_BATCH`` at a time, joined with the
  separator and cut into ``block_size`` blocks exactly like ``ftjax.data.packing``; the last
  partial block of a stream epoch is dropped, and the next stream epoch reshuffles.
* **Exact resume**: the position after a batch is four integers per process (stream epoch,
  documents fully used, tokens of the next one already used, word-id offset) plus the counts of
  blocks and batches. A resumed run re-reads (without tokenizing) the documents of its epoch up to
  that point through the same seeded buffer, then continues with the next unseen token. (The
  datasets ``IterableDataset.state_dict`` does not keep a shuffle buffer's contents, so it cannot
  resume a shuffled stream exactly.)

The stream has no length, so ``training.max_steps`` is required; evaluation splits are the first
``data.max_eval_samples`` examples of their stream, prepared like any other split.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Iterator, Optional

import datasets
import jax
import numpy as np
from tqdm.auto import tqdm

from ftjax.data.batching import BatchStats
from ftjax.errors import FtjaxError

log = logging.getLogger(__name__)

TOKENIZE_BATCH = 256  # documents per tokenizer call
DEFAULT_EVAL_SAMPLES = 1000  # examples of each evaluation split when data.max_eval_samples is unset
_STREAM_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                    ".txt": "text", ".cor": "text"}


# ---------------------------------------------------------------- sources


def stream_file(path: str) -> datasets.IterableDataset:
    """One local csv / tsv / json / jsonl / parquet / txt file as an IterableDataset."""
    from pathlib import Path

    from ftjax.paths import resolve_path
    p = Path(resolve_path(path))
    if not p.is_file():
        raise FtjaxError(f"data file not found: {p}")
    builder = _STREAM_BUILDERS.get(p.suffix.lower())
    if builder is None:
        raise FtjaxError(f"{p}: data.streaming reads {sorted(_STREAM_BUILDERS)} files, not '{p.suffix}'")
    kwargs = {"encoding_errors": "replace"} if builder in ("text", "csv") else {}
    if p.suffix.lower() == ".tsv":
        kwargs["sep"] = "\t"
    return datasets.load_dataset(builder, data_files=str(p), split="train", streaming=True, **kwargs)


def stream_splits(cfg) -> dict[str, datasets.IterableDataset]:
    """train / validation / test streams (those that exist) of a ``DataConfig``; ``split_rule: mod10``
    routes example i of the one file by i % 10 as ``ftjax.data.loading.split_mod10`` does."""
    from ftjax.data.loading import hub_splits
    if cfg.dataset_name:
        splits = dict(hub_splits(cfg, streaming=True))
    else:
        if not cfg.train_file:
            raise FtjaxError("no data: set data.train_file (local file) or data.dataset_name (hub)")
        splits = {k: stream_file(v) for k, v in {"train": cfg.train_file, "validation": cfg.validation_file,
                                                 "test": cfg.test_file}.items() if v}
    if cfg.split_rule == "mod10":
        if len(splits) != 1:
            raise FtjaxError("data.split_rule=mod10 splits one file: give only data.train_file")
        whole = splits["train"]
        rule = {"train": lambda i: i % 10 >= 2, "validation": lambda i: i % 10 == 1, "test": lambda i: i % 10 == 0}
        splits = {name: whole.filter(lambda _, i, keep=keep: keep(i), with_indices=True) for name, keep in rule.items()}
    if "train" not in splits:
        raise FtjaxError("no train split")
    return splits


def take_examples(stream: datasets.IterableDataset, n: int, split: str) -> datasets.Dataset:
    """The first ``n`` examples of a stream as a (small, in-memory) Dataset."""
    rows = list(stream.take(n))
    if not rows:
        raise FtjaxError(f"the {split} split is empty")
    return datasets.Dataset.from_list(rows)


def shuffled(items, buffer_size: int, rng: np.random.Generator) -> Iterator:
    """Buffer shuffling: each new item replaces a random one of ``buffer_size`` held items, which is
    emitted; the rest come out shuffled at the end. ``buffer_size <= 1`` keeps the order."""
    if buffer_size <= 1:
        yield from items
        return
    buf = []
    for item in items:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        i = int(rng.integers(buffer_size))
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


# ---------------------------------------------------------------- position and blocks


@dataclasses.dataclass
class StreamPosition:
    """Where this process's stream stands after a batch (see the module docstring)."""

    epoch: int = 0  # stream epochs (passes over this process's share) completed
    documents: int = 0  # shuffled documents of this epoch whose tokens are all in emitted blocks
    skip: int = 0  # tokens (separator included) of the next document already in emitted blocks
    word_offset: int = 0  # word-id offset of the next document (unique word ids for masking)
    blocks: int = 0  # blocks emitted since the run began (the example ``index`` of the next)
    batches: int = 0  # batches emitted since the run began (= train steps)

    FIELDS = ("epoch", "documents", "skip", "word_offset", "blocks", "batches")

    def as_list(self) -> list[int]:
        return [int(getattr(self, f)) for f in self.FIELDS]

    @classmethod
    def from_list(cls, values) -> "StreamPosition":
        return cls(**{f: int(v) for f, v in zip(cls.FIELDS, values)})


@dataclasses.dataclass
class BlockStream:
    """The training split of a streaming run: how to read, shuffle, tokenize and pack it."""

    source: datasets.IterableDataset  # the whole train split; each process takes its share
    tokenizer: object
    block_size: int
    separator_id: int
    text_column: str = "text"
    with_word_ids: bool = False
    shuffle_buffer: int = 10000
    seed: int = 0
    process_index: int = 0
    process_count: int = 1
    progress: bool = False

    def share(self) -> datasets.IterableDataset:
        if self.process_count == 1:
            return self.source
        from datasets.distributed import split_dataset_by_node
        return split_dataset_by_node(self.source, rank=self.process_index, world_size=self.process_count)

    def documents(self, epoch: int) -> Iterator[str]:
        """This process's texts of a stream epoch, in shuffled order (blank ones included)."""
        rng = np.random.default_rng([self.seed, epoch, self.process_index])
        texts = (str(row.get(self.text_column) or "") for row in self.share())
        return shuffled(texts, self.shuffle_buffer, rng)

    def encode(self, texts: list[str], word_offset: int) -> tuple[list, list, list[int], int]:
        """Token ids (+ separator) and word ids (offset to be unique) of each document, each
        document's word offset, and the offset after them. Blank documents give no tokens."""
        keep = [i for i, t in enumerate(texts) if t.strip()]
        ids: list = [np.zeros(0, np.int32)] * len(texts)
        words: list = [np.zeros(0, np.int64)] * len(texts)
        enc = self.tokenizer([texts[i] for i in keep], add_special_tokens=False, truncation=False,
                             verbose=False) if keep else None
        for j, i in enumerate(keep):
            ids[i] = np.append(np.asarray(enc["input_ids"][j], np.int32), np.int32(self.separator_id))
            if self.with_word_ids:
                words[i] = np.append(np.asarray([-1 if x is None else x for x in enc.word_ids(j)], np.int64), -1)
        offsets = []
        for i in range(len(texts)):
            offsets.append(word_offset)
            if self.with_word_ids and len(words[i]):
                w = words[i]
                words[i] = np.where(w >= 0, w + word_offset, -1)
                word_offset += int(w.max(initial=-1)) + 1
        return ids, words, offsets, word_offset

    def blocks(self, start: StreamPosition) -> Iterator[tuple[dict[str, np.ndarray], StreamPosition]]:
        """``(block, position after it)`` from ``start`` on, stream epoch after stream epoch, forever."""
        epoch, first_doc, skip, word_offset, n_blocks = (start.epoch, start.documents, start.skip,
                                                         start.word_offset, start.blocks)
        bar = tqdm(desc="stream: tokenize + pack", unit="examples", disable=not self.progress, dynamic_ncols=True)
        try:
            while True:
                docs = self.documents(epoch)
                for _ in range(first_doc):  # resume: re-read, not tokenize, the documents already used
                    if next(docs, None) is None:
                        raise FtjaxError("the train stream is shorter than the saved position: the data changed")
                ids, words = np.zeros(0, np.int32), np.zeros(0, np.int64)
                held = collections.deque()  # [tokens left, tokens, word offset] of documents in ``ids``
                done, emitted, exhausted, fresh = first_doc, 0, False, first_doc == 0 and skip == 0
                while True:
                    while len(ids) < self.block_size and not exhausted:
                        texts = [t for _, t in zip(range(TOKENIZE_BATCH), docs)]
                        exhausted = len(texts) < TOKENIZE_BATCH
                        if not texts:
                            break
                        new_ids, new_words, offsets, word_offset = self.encode(texts, word_offset)
                        if skip:  # a resumed epoch: the first document's first tokens are used
                            new_ids[0], new_words[0] = new_ids[0][skip:], new_words[0][skip:]
                        held.extend([len(x), len(x) + (skip if k == 0 else 0), o]
                                    for k, (x, o) in enumerate(zip(new_ids, offsets)))
                        skip = 0
                        ids = np.concatenate([ids, *new_ids])
                        if self.with_word_ids:
                            words = np.concatenate([words, *new_words])
                        bar.update(len(texts))
                    if len(ids) < self.block_size:
                        break  # the epoch's last partial block is dropped
                    block = {"input_ids": ids[:self.block_size], "attention_mask": np.ones(self.block_size, np.int32)}
                    ids = ids[self.block_size:]
                    if self.with_word_ids:
                        block["word_ids"], words = words[:self.block_size], words[self.block_size:]
                    used = self.block_size
                    while held and held[0][0] <= used:
                        used -= held.popleft()[0]
                        done += 1
                    if held:
                        held[0][0] -= used
                    n_blocks, emitted = n_blocks + 1, emitted + 1
                    head = held[0] if held else None
                    yield block, StreamPosition(epoch, done, head[1] - head[0] if head else 0,
                                                head[2] if head else word_offset, n_blocks)
                if emitted == 0 and fresh:
                    raise FtjaxError(f"the train stream of process {self.process_index} holds fewer than "
                                     f"{self.block_size} tokens: nothing to train on")
                epoch, first_doc, skip = epoch + 1, 0, 0
        finally:
            bar.close()


# ---------------------------------------------------------------- batches


class StreamBatcher:
    """``Batcher``'s interface over a ``BlockStream``: ``batches`` yields numpy batches of
    ``batch_size`` blocks (``weight`` 1, ``index`` a run-wide block number unique over processes),
    and ``state_at(step)`` / ``load_state_dict`` save and restore the position.

    The stream has no length: ``num_batches`` is the run's ``max_steps``, so the trainer's one
    "epoch" is the whole run (stream epochs are counted in the position)."""

    def __init__(self, stream: BlockStream, batch_size: int, max_steps: int):
        self.stream, self.batch_size, self.max_steps = stream, batch_size, max_steps
        self.position = StreamPosition()
        self.stats = BatchStats()
        self._after: dict[int, StreamPosition] = {}  # batches emitted -> position after them (recent)

    @property
    def num_examples(self) -> Optional[int]:
        return None

    def num_batches(self, num_examples: Optional[int] = None) -> int:
        return self.max_steps

    def load_state_dict(self, state: list[int]) -> None:
        self.position = StreamPosition.from_list(state)
        self._after = {self.position.batches: self.position}

    def state_at(self, step: int) -> list[int]:
        """This process's position after ``step`` batches (a recent one: saved at that step)."""
        if step == 0:
            return StreamPosition().as_list()
        if step not in self._after:
            raise FtjaxError(f"no stream position recorded for step {step}")
        return self._after[step].as_list()

    def gathered_state(self, step: int) -> list[list[int]]:
        """Every process's position after ``step`` batches, in process order (for the checkpoint)."""
        mine = np.asarray(self.state_at(step), np.int64)
        if jax.process_count() == 1:
            return [mine.tolist()]
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1).tolist()

    def batches(self, epoch: int = 0, start: int = 0, num_batches: Optional[int] = None
                ) -> Iterator[dict[str, np.ndarray]]:
        """Batches ``start`` (the restored position's step) to ``num_batches`` of the run."""
        if start != self.position.batches:
            raise FtjaxError(f"the stream position is at step {self.position.batches}, not {start}: "
                             "the checkpoint has no data position of a streaming run")
        end = self.max_steps if num_batches is None else num_batches
        blocks = self.stream.blocks(self.position)
        pc, pi = self.stream.process_count, self.stream.process_index
        for step in range(start + 1, end + 1):
            rows, position = [], None
            for _ in range(self.batch_size):
                block, position = next(blocks)
                rows.append(block)
            batch = {k: np.stack([r[k] for r in rows]).astype(np.int32) for k in rows[0]}
            batch["weight"] = np.ones(self.batch_size, np.float32)
            first = position.blocks - self.batch_size
            batch["index"] = ((np.arange(first, position.blocks) * pc + pi) % 2**31).astype(np.int32)
            position = dataclasses.replace(position, batches=step)
            self._after[step] = position
            self._after.pop(step - 64, None)  # keep the recent ones (prefetch is a few batches ahead)
            self.stats.real_tokens += int(batch["attention_mask"].sum())
            self.stats.padded_tokens += batch["input_ids"].size
            yield batch


# ---------------------------------------------------------------- the run's splits


def prepare_streaming(config, task, tokenizer, progress: bool = False) -> dict:
    """The splits of a ``data.streaming`` run: train as a ``BlockStream``, evaluation splits as the
    first ``data.max_eval_samples`` examples of their streams, prepared by the task as usual."""
    from ftjax.tasks.base import Split
    from ftjax.tasks.language_modeling import LanguageModeling
    d, args = config.data, config.training
    if not isinstance(task, LanguageModeling):
        raise FtjaxError(f"data.streaming supports tasks mlm and clm, not {task.name}: "
                         "set data.streaming=false (splits are read from memory-mapped Arrow)")
    if args.max_steps <= 0:
        raise FtjaxError("data.streaming needs training.max_steps: a stream has no length to count epochs in")
    if d.shuffle_buffer < 0:
        raise FtjaxError(f"data.shuffle_buffer must be >= 0, got {d.shuffle_buffer}")
    streams = stream_splits(d)
    task.check_model(tokenizer)
    n_eval = d.max_eval_samples
    evals = [s for s in streams if s != "train"]
    if evals and n_eval is None:
        n_eval = DEFAULT_EVAL_SAMPLES
        log.warning("data.streaming: evaluating on the first %d examples of %s (set data.max_eval_samples)",
                    n_eval, " and ".join(evals))
    splits = task.prepare(datasets.DatasetDict({s: take_examples(streams[s], n_eval, s) for s in evals}),
                          tokenizer) if evals else {}
    train = streams["train"]
    if d.max_train_samples is not None:
        train = train.take(d.max_train_samples)
    stream = BlockStream(train, tokenizer, task.max_length, task.separator_id(tokenizer), d.text_column,
                         with_word_ids=not task.causal and task.options.whole_word_masking,
                         shuffle_buffer=d.shuffle_buffer if d.shuffle else 0, seed=config.data_seed,
                         process_index=jax.process_index(), process_count=jax.process_count(), progress=progress)
    splits["train"] = Split(stream, {"streaming": {"shuffle_buffer": stream.shuffle_buffer,
                                                   "block_size": stream.block_size}})
    return splits
