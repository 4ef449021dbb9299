"""Token classification (NER, POS, chunking): word tags on subwords, seqeval metrics, entity groups.

Words are tagged, models see subwords: ``align_labels`` puts each word's tag on its first subword
(or, with ``task_options.label_all_tokens``, on every subword, B- turned into I- after the first) and -100
on special tokens and the rest, from the fast tokenizer's ``word_ids``. Metrics are computed on
word-level tags (the first subword's prediction). ``ftjax predict`` returns entity groups with the
transformers token-classification pipeline's aggregation strategies and its own post-processing
code, over overlapping windows so long texts lose no word.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections import defaultdict
from itertools import chain
from types import SimpleNamespace
from typing import Any, Literal, Optional

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax import metrics as M
from ftjax.data.conll import BIO_PREFIXES, sort_tags
from ftjax.errors import FtjaxError
from ftjax.segments import packed_token_logits
from ftjax.tasks.base import MODEL_INPUTS, Split, Task, model_output, register, require_columns, tokenize_split

log = logging.getLogger(__name__)

WORST_SENTENCES = 25  # sentences shown in the error analysis


# ---- label alignment (pure functions, usable outside ftjax) -------------------------------------
def b_to_i_map(label_names: list[str]) -> dict[int, int]:
    """Label id of ``B-x`` -> label id of ``I-x`` (for tags on continuation subwords)."""
    index = {n: i for i, n in enumerate(label_names)}
    return {i: index["I-" + n[2:]] for i, n in enumerate(label_names)
            if n.startswith("B-") and "I-" + n[2:] in index}


def align_labels(word_ids: list[Optional[int]], word_tags: list[int], label_all_tokens: bool = False,
                 b_to_i: Optional[dict[int, int]] = None) -> tuple[list[int], list[int]]:
    """Token labels and first-subword marks from a fast tokenizer's ``word_ids``.

    Args:
      word_ids: word index of each token, None for special tokens.
      word_tags: tag id of each word.
      label_all_tokens: label continuation subwords too (B- mapped to I- by ``b_to_i``).

    Returns:
      ``(labels, word_start)``: -100 where no loss is taken; 1 on the first subword of each word.

    >>> align_labels([None, 0, 0, 1, None], [3, 0])
    ([-100, 3, -100, 0, -100], [0, 1, 0, 1, 0])
    """
    b_to_i = b_to_i or {}
    labels, starts, previous = [], [], None
    for w in word_ids:
        if w is None:
            labels.append(-100)
            starts.append(0)
        elif w != previous:
            labels.append(word_tags[w])
            starts.append(1)
        else:
            labels.append(b_to_i.get(word_tags[w], word_tags[w]) if label_all_tokens else -100)
            starts.append(0)
        previous = w
    return labels, starts


def _empty_words(tokenizer, words: list[str], word_ids: list[Optional[int]]) -> set[int]:
    """Words that produce no token at all (e.g. a lone zero-width space), as opposed to words lost
    to truncation."""
    seen = set(w for w in word_ids if w is not None)
    missing = [j for j in range(len(words)) if j not in seen]
    if not missing:
        return set()
    pieces = tokenizer([words[j] for j in missing], add_special_tokens=False, verbose=False)["input_ids"]
    return {j for j, ids in zip(missing, pieces) if not ids}


def encode_words(tokenizer, words: list[list[str]], tags: list[list[int]], max_length: int,
                 label_all_tokens: bool = False, b_to_i: Optional[dict[int, int]] = None) -> dict[str, list]:
    """Tokenizes pre-split sentences and aligns their tags.

    A word that produces no token is replaced by the tokenizer's unknown token, so every word keeps
    a position (and a prediction). Words past ``max_length`` are lost to truncation: ``num_words`` -
    ``sum(word_start)`` counts them.

    Returns:
      the tokenizer's fields plus ``labels``, ``word_start`` (per token), ``num_words`` and
      ``empty_words`` (per sentence).
    """
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    out = {k: list(v) for k, v in enc.items()}
    out.update(labels=[], word_start=[], num_words=[], empty_words=[])
    for i, (sentence, sentence_tags) in enumerate(zip(words, tags)):
        word_ids = enc.word_ids(i)
        empty = _empty_words(tokenizer, sentence, word_ids) if tokenizer.unk_token else set()
        if empty:
            fixed = [tokenizer.unk_token if j in empty else w for j, w in enumerate(sentence)]
            one = tokenizer([fixed], is_split_into_words=True, truncation=True, max_length=max_length)
            for k in enc:
                out[k][i] = one[k][0]
            word_ids = one.word_ids(0)
        labels, starts = align_labels(word_ids, sentence_tags, label_all_tokens, b_to_i)
        out["labels"].append(labels)
        out["word_start"].append(starts)
        out["num_words"].append(len(sentence))
        out["empty_words"].append(len(empty))
    return out


def _byte_level(tokenizer) -> bool:
    state = json.loads(tokenizer.backend_tokenizer.pre_tokenizer.__getstate__() or "{}") \
        if tokenizer.backend_tokenizer.pre_tokenizer is not None else {}
    return state.get("type") == "ByteLevel"


def with_prefix_space(tokenizer):
    """A byte-level BPE tokenizer (GPT-2, RoBERTa) reloaded with ``add_prefix_space=True``, so each
    pre-split word is tokenized as in running text ("Ġword"); other tokenizers unchanged."""
    if not _byte_level(tokenizer) or getattr(tokenizer, "add_prefix_space", False):
        return tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return type(tokenizer).from_pretrained(tmp, add_prefix_space=True)


# ---- metrics ----------------------------------------------------------------------------------
def is_bio(label_names: list[str]) -> bool:
    """Entity tags (B-/I-/E-/S- prefixes and O), as opposed to plain tags such as POS."""
    return any(n != "O" for n in label_names) and all(
        n == "O" or n.startswith(BIO_PREFIXES) for n in label_names)


def entity_metrics(y_true: list[list[str]], y_pred: list[list[str]], scheme: Optional[str] = None) -> dict:
    """seqeval entity-level precision / recall / F1 (micro, and per entity type) and token accuracy.

    ``scheme`` (e.g. "IOB2") selects seqeval's strict mode: an entity counts only with a valid
    B-... I-... sequence and matching boundaries; the default is conlleval's lenient reading.
    """
    from seqeval import metrics as sm
    from seqeval import scheme as schemes

    kwargs = {"mode": "strict", "scheme": getattr(schemes, scheme)} if scheme else {}
    report = sm.classification_report(y_true, y_pred, output_dict=True, zero_division=0, **kwargs)
    micro = report.get("micro avg", {})
    out = {"precision": float(micro.get("precision", 0.0)), "recall": float(micro.get("recall", 0.0)),
           "f1": float(micro.get("f1-score", 0.0)), "accuracy": float(sm.accuracy_score(y_true, y_pred))}
    out["per_type"] = {t: {"precision": float(r["precision"]), "recall": float(r["recall"]),
                           "f1": float(r["f1-score"]), "support": int(r["support"])}
                       for t, r in report.items() if not t.endswith(" avg")}
    return out


def entity_report(y_true: list[list[str]], y_pred: list[list[str]], scheme: Optional[str] = None) -> str:
    """seqeval's per-entity text report."""
    from seqeval import metrics as sm
    from seqeval import scheme as schemes

    kwargs = {"mode": "strict", "scheme": getattr(schemes, scheme)} if scheme else {}
    return sm.classification_report(y_true, y_pred, digits=4, zero_division=0, **kwargs)


# ---- predictions: the transformers pipeline's post-processing -----------------------------------
def _pipeline_postprocess(tokenizer, id2label: dict[int, str]):
    """The token-classification pipeline's gather / aggregate / overlap-merge methods without its
    PyTorch model (they use only the tokenizer and ``model.config.id2label``)."""
    from ftjax.models import flax_transformers
    flax_transformers()  # torch kept out before the pipelines module is first imported
    from transformers.pipelines.token_classification import TokenClassificationPipeline

    class Postprocess(TokenClassificationPipeline):
        def __init__(self):  # the pipeline's own __init__ needs a PyTorch / TF model
            self.tokenizer = tokenizer
            self.model = SimpleNamespace(config=SimpleNamespace(id2label=id2label))
            self.framework = "np"

    return Postprocess()


def _plain(entity: dict) -> dict:
    """JSON-ready values (the pipeline returns numpy scalars)."""
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in entity.items()}


def group_entities(postprocess, text: str, windows: list[dict], strategy: str) -> list[dict]:
    """Entities of one text from its windows: ``[{input_ids, offsets, special, probs}]``."""
    from transformers.pipelines.token_classification import AggregationStrategy

    strategy = AggregationStrategy(strategy)
    entities = []
    for w in windows:
        pre = postprocess.gather_pre_entities(text, np.asarray(w["input_ids"]), w["probs"], w["offsets"],
                                              np.asarray(w["special"]), strategy)
        entities += [e for e in postprocess.aggregate(pre, strategy)
                     if e.get("entity", e.get("entity_group")) != "O"]
    if len(windows) > 1:
        entities = postprocess.aggregate_overlapping_entities(entities)
    return [_plain(e) for e in entities]


@dataclasses.dataclass
class TokenClassificationOptions:
    label_all_tokens: bool = False  # label every subword (B- -> I- on continuations), not only the first
    # None: conlleval-style lenient scoring; a scheme: seqeval's strict mode with that scheme.
    seqeval_scheme: Optional[Literal["IOB1", "IOB2", "IOE1", "IOE2", "IOBES", "BILOU"]] = None
    # predict: entity grouping, with the transformers token-classification pipeline's meanings.
    # "first": each whole word takes its first subword's label, the subword ftjax trains on, so an
    # entity never ends mid-word; "simple" groups subwords and can cut a word ("Ekeus" -> "ek").
    aggregation_strategy: Literal["none", "simple", "first", "max", "average"] = "first"
    stride: int = 32  # predict: tokens shared by consecutive windows of a text longer than max_length


@register
class TokenClassification(Task):
    name = "token_classification"
    long_inputs = "windowed"  # overlapping windows: no input token is dropped
    auto_class = "FlaxAutoModelForTokenClassification"
    empty_prediction: Any = ()  # no entities
    packing = True
    Options = TokenClassificationOptions

    label_names: list[str] = []  # from the train split (or data.label_names), or the model

    # ---- host: data ----------------------------------------------------------------------------
    def _source(self, split: str) -> Optional[str]:
        d = self.config.data
        return d.train_file if d.split_rule == "mod10" else getattr(d, f"{split}_file", None)

    def _where(self, split: str, ds: datasets.Dataset, i: int) -> str:
        """File and line for CoNLL data, else split and example index."""
        if "line" in ds.column_names:
            return f"{self._source(split)}:{ds[i]['line']}"
        return f"{split} split, example {i}"

    def _label_names_from(self, train: datasets.Dataset) -> list[str]:
        d = self.config.data
        inner = getattr(train.features[d.tags_column], "feature", None)
        if isinstance(inner, datasets.ClassLabel):
            return list(inner.names)
        if d.label_names:
            return [str(n) for n in d.label_names]
        if getattr(inner, "dtype", None) == "string":
            return sort_tags(chain.from_iterable(train[d.tags_column]))
        raise FtjaxError(f"train split: column '{d.tags_column}' holds tag ids without names; set data.label_names")

    def _check_split(self, split: str, ds: datasets.Dataset, seen_in_train: Optional[set]) -> set:
        """Tokens and tags of equal length; every tag known (and, for CoNLL files whose label set
        came from the data, seen in training). Returns the tag ids used."""
        d = self.config.data
        inner = getattr(ds.features[d.tags_column], "feature", None)
        if isinstance(inner, datasets.ClassLabel) and list(inner.names) != self.label_names:
            raise FtjaxError(f"{split} split: its tag names differ from the train split's")
        index = {n: i for i, n in enumerate(self.label_names)}
        check_seen = seen_in_train is not None and "line" in ds.column_names and not d.label_names
        used = set()
        for i, (tokens, tags) in enumerate(zip(ds[d.tokens_column], ds[d.tags_column])):
            if tokens is None or tags is None or len(tokens) != len(tags):
                raise FtjaxError(f"{self._where(split, ds, i)}: {len(tokens or [])} tokens but "
                                 f"{len(tags or [])} tags")
            for tag in tags:
                tag_id = tag if isinstance(tag, int) else index.get(str(tag))
                if tag_id is None or not 0 <= tag_id < len(self.label_names):
                    raise FtjaxError(f"{self._where(split, ds, i)}: tag {tag!r} is not in the training "
                                     f"label set {self.label_names[:25]}")
                if check_seen and tag_id not in seen_in_train:
                    raise FtjaxError(f"{self._where(split, ds, i)}: tag '{self.label_names[tag_id]}' of the "
                                     f"{split} split never occurs in the train split")
                used.add(tag_id)
        return used

    def check(self, splits: datasets.DatasetDict) -> None:
        """Columns, label set (from the train split) and every split's tags; FtjaxError on bad input."""
        d = self.config.data
        for split, ds in splits.items():
            if ds.column_names == ["text"] and d.tokens_column not in ds.column_names:
                raise FtjaxError(f"{split} split was read as plain text, one example a line (no "
                                 f"'{d.tokens_column}' / '{d.tags_column}' columns); for CoNLL `token TAG` "
                                 "lines set data.format=conll (or use a .conll suffix)")
            require_columns(ds, split, [d.tokens_column, d.tags_column])
        self.label_names = self._label_names_from(splits["train"])
        seen_in_train = self._check_split("train", splits["train"], None)
        for split in [s for s in splits if s != "train"]:
            self._check_split(split, splits[split], seen_in_train)

    def labels_from_model(self, model_config) -> None:
        self.label_names = [model_config.id2label[i] for i in range(model_config.num_labels)]

    def model_kwargs(self) -> dict:
        return {"num_labels": len(self.label_names), "id2label": dict(enumerate(self.label_names)),
                "label2id": {n: i for i, n in enumerate(self.label_names)}}

    def adapt_tokenizer(self, tokenizer):
        if not tokenizer.is_fast:
            raise FtjaxError(f"{type(tokenizer).__name__} is a slow tokenizer; token classification needs a "
                             "fast one (word_ids and character offsets)")
        return with_prefix_space(tokenizer)

    def prepare(self, splits: datasets.DatasetDict, tokenizer) -> dict[str, Split]:
        """Sentences as rows; meta: their words, CoNLL lines and alignment counts (for reports)."""
        d = self.config.data
        b_to_i = b_to_i_map(self.label_names)
        index = {n: i for i, n in enumerate(self.label_names)}

        def encode(batch):
            tags = [[t if isinstance(t, int) else index[str(t)] for t in s] for s in batch[d.tags_column]]
            return encode_words(tokenizer, batch[d.tokens_column], tags, self.max_length,
                                self.options.label_all_tokens, b_to_i)

        out = {}
        for split, ds in splits.items():
            enc = tokenize_split(self, ds, encode, split, tokenizer, remove_columns=ds.column_names)
            meta = {"words": list(ds[d.tokens_column]), "source": self._source(split),
                    "lines": list(ds["line"]) if "line" in ds.column_names else None,
                    "alignment": self._alignment_stats(split, enc)}
            out[split] = Split(enc.remove_columns(["empty_words"]), meta)
        return out

    def _alignment_stats(self, split: str, enc: datasets.Dataset) -> dict:
        words = np.asarray(list(enc["num_words"]))
        aligned = np.asarray([sum(s) for s in enc["word_start"]])
        lost = words - aligned
        stats = {"words": int(words.sum()), "truncated_words": int(lost.sum()),
                 "truncated_sentences": int((lost > 0).sum()), "empty_words": int(sum(enc["empty_words"]))}
        if stats["truncated_words"]:
            log.warning("%s split: %d words in %d sentences lost to truncation at model.max_length=%d "
                        "(not trained on, not scored)", split, stats["truncated_words"],
                        stats["truncated_sentences"], self.max_length)
        if stats["empty_words"]:
            log.warning("%s split: %d words produce no token; they are fed as the unknown token",
                        split, stats["empty_words"])
        return stats

    def encode(self, records: list[dict], tokenizer) -> Split:
        """Raw texts in overlapping windows of ``model.max_length`` tokens (``stride`` shared, at most
        half a window); meta: what the pipeline's post-processing needs per window."""
        max_length = self.max_length
        stride = min(self.options.stride, (max_length - tokenizer.num_special_tokens_to_add()) // 2)
        column = self.config.data.text_column
        texts = ["" if r.get(column) is None else str(r[column]) for r in records]
        enc = tokenizer(texts, truncation=True, max_length=max_length, stride=stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True,
                        return_special_tokens_mask=True)
        meta = {"texts": texts, "tokenizer": tokenizer, "record": enc["overflow_to_sample_mapping"],
                "input_ids": enc["input_ids"], "offsets": enc["offset_mapping"], "special": enc["special_tokens_mask"]}
        return Split(datasets.Dataset.from_dict({k: enc[k] for k in MODEL_INPUTS if k in enc}), meta)

    # ---- device --------------------------------------------------------------------------------
    @staticmethod
    def _token_loss(scores, batch):
        """Per-token cross-entropy and the tokens that count (a label, in a real row), ``[B, T]``."""
        labels = batch["labels"]
        counted = (labels >= 0) & (batch["weight"][:, None] > 0)
        per_token = optax.softmax_cross_entropy_with_integer_labels(scores, jnp.where(counted, labels, 0))
        return per_token * counted, counted.astype(jnp.float32)

    def loss(self, model, params, batch, rng, train):
        if "segment_ids" in batch:  # packed rows: attention within each sentence (ftjax.segments)
            logits = packed_token_logits(model, params, batch, rng, train)
        else:
            logits = model_output(model, params, batch, rng, train).logits
        per_token, counted = self._token_loss(logits.astype(jnp.float32), batch)
        return per_token.sum(), counted.sum()

    def outputs(self, model, params, batch):
        """Per-token arrays padded to ``max_length`` so batches of every bucket concatenate."""
        scores = model_output(model, params, batch, None, False).logits.astype(jnp.float32)
        pad = self.max_length - scores.shape[1]

        def wide(x, value):
            return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)

        out = {"index": batch["index"], "weight": batch["weight"]}
        if "labels" in batch:
            per_token, counted = self._token_loss(scores, batch)
            out.update(prediction=wide(scores.argmax(-1), -100), labels=wide(batch["labels"], -100),
                       word_start=wide(batch["word_start"], 0), num_words=batch["num_words"],
                       loss_sum=per_token.sum(-1), loss_weight=counted.sum(-1))
        else:
            out["probs"] = wide(jax.nn.softmax(scores, axis=-1), 0.0)
        return out

    # ---- host: scores --------------------------------------------------------------------------
    def word_tags(self, outputs: dict[str, np.ndarray]) -> tuple[list[list[str]], list[list[str]]]:
        """(gold, predicted) tag names per sentence, one per word the model saw (first subword)."""
        names = self.label_names
        gold, pred = [], []
        for labels, prediction, starts in zip(outputs["labels"], outputs["prediction"], outputs["word_start"]):
            first = starts == 1
            gold.append([names[i] for i in labels[first]])
            pred.append([names[i] for i in prediction[first]])
        return gold, pred

    def metric_names(self) -> set[str]:
        if is_bio(self.label_names):
            return {"precision", "recall", "f1", "accuracy", "truncated_words"}
        return {"accuracy", "truncated_words"} | {
            f"{m}_{avg}" for m in ("precision", "recall", "f1") for avg in ("macro", "weighted")}

    def metrics(self, outputs: dict[str, np.ndarray], meta: dict) -> dict[str, Any]:
        gold, pred = self.word_tags(outputs)
        if is_bio(self.label_names):
            out = entity_metrics(gold, pred, self.options.seqeval_scheme)
        else:  # POS-style tags: tag-level scores
            index = {n: i for i, n in enumerate(self.label_names)}
            out = M.classification_metrics([index[t] for t in chain(*pred)], [index[t] for t in chain(*gold)],
                                           self.label_names)
        out["truncated_words"] = int(outputs["num_words"].sum() - outputs["word_start"].sum())
        return out

    def reports(self, outputs: dict[str, np.ndarray], meta: dict, split: str) -> dict[str, str]:
        """``error_analysis_<split>.txt``: the per-entity report, then the sentences with the most
        word errors, tokens / gold / predicted side by side."""
        gold, pred = self.word_tags(outputs)
        words, lines = meta.get("words", []), meta.get("lines")
        scheme = self.options.seqeval_scheme
        parts = [f"Error analysis: {split} split, {len(gold)} sentences, "
                 f"{sum(map(len, gold))} words scored, "
                 f"{int(outputs['num_words'].sum() - outputs['word_start'].sum())} lost to truncation\n",
                 entity_report(gold, pred, scheme) if is_bio(self.label_names) else ""]
        errors = [sum(g != p for g, p in zip(gs, ps)) for gs, ps in zip(gold, pred)]
        worst = [i for i in np.argsort(-np.asarray(errors), kind="stable")[:WORST_SENTENCES] if errors[i]]
        parts.append(f"\nSentences with the most word errors ({len(worst)} shown)\n")
        tag_width = max(len(n) for n in self.label_names) + 2
        for i in worst:
            row = int(outputs["index"][i])
            tokens = words[row] if row < len(words) else [f"#{k}" for k in range(len(gold[i]))]
            where = f", {meta['source']}:{lines[row]}" if lines is not None else ""
            parts.append(f"\nexample {row}{where}: {errors[i]} of {len(gold[i])} words wrong\n")
            width = max([len(t) for t in tokens[:len(gold[i])]] + [5]) + 2
            parts.append(f"{'token':<{width}}{'gold':<{tag_width}}predicted\n")
            for t, g, p in zip(tokens, gold[i], pred[i]):
                parts.append(f"{t:<{width}}{g:<{tag_width}}{p}{'   <<' if g != p else ''}\n")
        return {f"error_analysis_{split}.txt": "".join(parts)}

    def predictions(self, outputs: dict[str, np.ndarray], meta: dict) -> list[list[dict]]:
        """Entities of each record: ``entity_group`` (or ``entity`` for strategy none), ``word``,
        ``start`` / ``end`` character offsets, ``score``."""
        postprocess = _pipeline_postprocess(meta["tokenizer"], dict(enumerate(self.label_names)))
        windows = defaultdict(list)
        for row, probs in zip(outputs["index"], outputs["probs"]):
            n = len(meta["input_ids"][row])
            windows[meta["record"][row]].append({"input_ids": meta["input_ids"][row], "probs": probs[:n],
                                                 "offsets": meta["offsets"][row], "special": meta["special"][row]})
        strategy = self.options.aggregation_strategy
        return [group_entities(postprocess, text, windows[i], strategy) if text.strip() else []
                for i, text in enumerate(meta["texts"])]


@register
class Ner(TokenClassification):
    name = "ner"
