"""data.streaming: blocks packed on the fly equal packing the corpus, a seeded shuffle buffer,
disjoint per-process streams, exact resume (batcher and trainer), progress with examples/s."""

import io
import json

import datasets
import numpy as np
import pytest
import transformers

from conftest import MINILM
from ftjax.config import load_config
from ftjax.data.packing import pack, pack_dataset
from ftjax.data.streaming import BlockStream, StreamBatcher, StreamPosition, shuffled, stream_file
from ftjax.errors import FtjaxError
from ftjax.paths import resolve_path
from ftjax.trainer import Trainer
from test_language_modeling import LEE, lm_overrides


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(resolve_path(MINILM))


@pytest.fixture(scope="module")
def lee_texts():
    return [r["text"] for r in stream_file(LEE)]


def small_stream(tokenizer, texts, **kw):
    source = datasets.Dataset.from_dict({"text": texts}).to_iterable_dataset()
    kw = {"with_word_ids": True, "shuffle_buffer": 16, "seed": 3, **kw}
    return BlockStream(source, tokenizer, 32, tokenizer.sep_token_id, **kw)


def test_stream_blocks_equal_packing_the_corpus(tokenizer, lee_texts):
    stream = BlockStream(stream_file(LEE), tokenizer, 32, tokenizer.sep_token_id, with_word_ids=True,
                         shuffle_buffer=0)
    texts = [t for t in lee_texts if t.strip()]
    enc = tokenizer(texts, add_special_tokens=False, verbose=False)
    words = [[-1 if w is None else w for w in enc.word_ids(i)] for i in range(len(texts))]
    columns, stats = pack(enc["input_ids"], 32, tokenizer.sep_token_id, word_ids=words)
    blocks = stream.blocks(StreamPosition())
    got = [next(blocks) for _ in range(stats.blocks + 1)]
    for (block, _), ids, w in zip(got, columns["input_ids"], columns["word_ids"]):
        np.testing.assert_array_equal(block["input_ids"], ids)
        np.testing.assert_array_equal(block["word_ids"], w)
    assert got[stats.blocks - 1][1].epoch == 0 and got[stats.blocks][1].epoch == 1  # the next epoch begins


def test_shuffle_buffer_shuffles_and_is_seeded(tokenizer, lee_texts):
    def order(seed, size=10):
        return list(shuffled(range(100), size, np.random.default_rng(seed)))
    assert sorted(order(0)) == list(range(100)) and order(0) != list(range(100))
    assert order(0) == order(0) and order(0) != order(1)
    assert list(shuffled(range(10), 0, np.random.default_rng(0))) == list(range(10))
    stream = small_stream(tokenizer, lee_texts[:40])
    first, again, second = list(stream.documents(0)), list(stream.documents(0)), list(stream.documents(1))
    assert first == again and first != second and sorted(first) == sorted(second) == sorted(lee_texts[:40])
    assert first != lee_texts[:40]


def test_two_processes_get_disjoint_streams(tokenizer, lee_texts):
    texts = [f"{i} {t}" for i, t in enumerate(lee_texts[:60])]
    shares = [list(small_stream(tokenizer, texts, process_index=p, process_count=2).documents(0)) for p in (0, 1)]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(texts)
    batches = [next(StreamBatcher(small_stream(tokenizer, texts, process_index=p, process_count=2), 4, 10).batches())
               for p in (0, 1)]
    assert set(batches[0]["index"] % 2) == {0} and set(batches[1]["index"] % 2) == {1}


def test_batcher_resumed_at_any_step_continues_exactly(tokenizer, lee_texts):
    """30 batches of 4 blocks cross several stream epochs of 24 short documents; a batcher restored
    at step k (in a later epoch, inside a document) yields batches k+1.. identical to the uninterrupted run's."""
    texts = [t[:150] for t in lee_texts[:24]]
    positions = []
    full = list(StreamBatcher(small_stream(tokenizer, texts), 4, 30).batches())
    assert len(full) == 30
    for k in (1, 7, 13, 22):
        first = StreamBatcher(small_stream(tokenizer, texts), 4, 30)
        for _ in zip(range(k), first.batches()):
            pass
        state = json.loads(json.dumps(first.state_at(k)))  # as in the checkpoint's meta
        positions.append(StreamPosition.from_list(state))
        resumed = StreamBatcher(small_stream(tokenizer, texts), 4, 30)
        resumed.load_state_dict(state)
        rest = list(resumed.batches(start=k))
        assert len(rest) == 30 - k
        for a, b in zip(full[k:], rest):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])
    assert positions[0].epoch == 0 and positions[-1].epoch >= 2
    assert any(p.skip > 0 and p.documents > 0 for p in positions)  # resumed inside a document


def test_streaming_run_stopped_and_resumed_sees_the_same_batches(tiny_model, tmp_path, monkeypatch):
    """A run stopped (SIGTERM path) at step 3 and resumed gets the same batches and the same losses
    at steps 4-6 as a run never stopped."""
    def trainer(out, **extra):
        return Trainer(load_config(None, lm_overrides(tiny_model, out, **{
            "data.streaming": "true", "data.shuffle_buffer": 64, "data.max_eval_samples": 8,
            "task_options.whole_word_masking": "true", "training.max_steps": 6, "training.logging_steps": 1,
            "training.per_device_train_batch_size": 4, "training.save_strategy": "steps",
            "training.save_steps": 100, **extra})))

    def record(t):
        seen = []
        transform = t.task.host_transform

        def spy(batch, epoch, train):
            if train:
                seen.append({k: v.copy() for k, v in batch.items()})
            return transform(batch, epoch, train)
        t.task.host_transform = spy
        return seen

    def losses(out):
        log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        return [r["train/loss"] for r in log if "train/loss" in r]

    whole = trainer(tmp_path / "whole")
    whole_seen = record(whole)
    whole.train()

    stopped = trainer(tmp_path / "parts")
    original_init = Trainer.init_state

    def init_state(self, *a, **kw):
        original_init(self, *a, **kw)
        jitted = self.train_step

        def counted(state, batch):
            out = jitted(state, batch)
            if int(out[0].step) == 3:
                self._sigterm = True  # as the SIGTERM handler does
            return out
        self.train_step = counted
        self.train_step._cache_size = jitted._cache_size
        self.train_step.lower = jitted.lower  # FLOPs are read from the compiled step
    monkeypatch.setattr(Trainer, "init_state", init_state)
    assert stopped.train()["step"] == 3
    monkeypatch.setattr(Trainer, "init_state", original_init)
    resumed = trainer(tmp_path / "parts", **{"training.resume_from_checkpoint": "latest"})
    resumed_seen = record(resumed)
    resumed.train()
    assert len(whole_seen) == 6 and len(resumed_seen) == 3
    for a, b in zip(whole_seen[3:], resumed_seen):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")


def test_streaming_errors_are_one_clear_line(tiny_model, tmp_path):
    with pytest.raises(FtjaxError, match="needs training.max_steps"):
        Trainer(load_config(None, lm_overrides(tiny_model, tmp_path / "a", **{
            "data.streaming": "true", "training.max_steps": -1})))
    from conftest import tiny_overrides, write_sentiment_csv
    csv = write_sentiment_csv(tmp_path / "s.csv", n=20)
    with pytest.raises(FtjaxError, match="supports tasks mlm and clm"):
        Trainer(load_config(None, tiny_overrides(tiny_model, str(csv), tmp_path / "b", **{
            "task": "classification", "data.streaming": "true", "training.max_steps": 2})))


def test_tokenization_and_packing_show_examples_per_second(tokenizer, lee_texts, capsys):
    datasets.enable_progress_bars()
    ds = datasets.Dataset.from_dict({"text": lee_texts[:50]})
    pack_dataset(ds, tokenizer, 32, tokenizer.sep_token_id)
    err = capsys.readouterr().err
    assert "tokenize" in err and "pack 32" in err and "examples/s" in err
    stream = small_stream(tokenizer, lee_texts[:50], progress=True)
    import ftjax.data.streaming as streaming
    buffer = io.StringIO()
    original = streaming.tqdm
    streaming.tqdm = lambda *a, **kw: original(*a, **{**kw, "file": buffer, "mininterval": 0})
    try:
        list(zip(range(40), stream.blocks(StreamPosition())))
    finally:
        streaming.tqdm = original
    assert "stream: tokenize + pack" in buffer.getvalue() and "examples/s" in buffer.getvalue()


def test_two_processes_stream_and_resume_exactly(tiny_model, tmp_path):
    """2 processes x 1 device: each streams its share; a run resumed from the step-2 checkpoint of
    another gets the same losses at steps 3-4 (every process back at its own stream position)."""
    from test_multihost import launch
    config = tmp_path / "config.yaml"
    config.write_text("task: mlm\n")
    base = lm_overrides(tiny_model, tmp_path / "unused", **{
        "data.streaming": "true", "data.shuffle_buffer": 32, "data.max_eval_samples": 6,
        "training.max_steps": 4, "training.logging_steps": 1, "training.per_device_train_batch_size": 2,
        "training.save_strategy": "steps", "training.save_steps": 2, "training.save_total_limit": "null",
        "mesh.data": -1})
    base = [o for o in base if not o.startswith("training.output_dir=")]

    def losses(out):
        log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        return np.array([r["train/loss"] for r in log if "train/loss" in r])

    launch(2, 1, str(config), [f"training.output_dir={tmp_path / 'whole'}", *base], tmp_path / "logs-whole")
    launch(2, 1, str(config), [f"training.output_dir={tmp_path / 'resumed'}", *base,
                               f"training.resume_from_checkpoint={tmp_path / 'whole' / 'checkpoints' / '2'}"],
           tmp_path / "logs-resumed")
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert len(whole) == 4 and len(resumed) == 2
    np.testing.assert_allclose(resumed, whole[2:], rtol=1e-6)


def test_a_hub_dataset_while_offline_is_one_clear_line_streamed_or_not():
    from ftjax.data.loading import load_splits
    from ftjax.data.streaming import stream_splits
    cfg = load_config(None, ["data.dataset_name=imdb"]).data  # conftest: HF_DATASETS_OFFLINE=1
    for read in (load_splits, stream_splits):
        with pytest.raises(FtjaxError, match="dataset 'imdb' is on the Hugging Face Hub and the Hub is offline"):
            read(cfg)
