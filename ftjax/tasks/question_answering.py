"""Extractive question answering (SQuAD v1.1 / v2.0): predict the answer span in a context.

A context longer than ``model.max_length`` is cut into windows overlapping by ``task_options.stride`` tokens
(features); each feature's label is the answer's start / end token, or the CLS token when the
window does not hold the answer (or the question has none, SQuAD v2). The jitted eval step keeps
only the ``n_best_size`` best start and end tokens inside the context of each feature; the host
maps them back to text through the split's meta (contexts, feature -> example map, offsets) and
picks the best span per example across its windows (``null_score_diff_threshold`` decides "no
answer" for v2).
EM / F1 use the official SQuAD answer normalisation.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import json
import re
import string
from typing import Any

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax.errors import FtjaxError
from ftjax.tasks.base import MODEL_INPUTS, Split, Task, model_output, register, require_columns


# ---- official SQuAD evaluation (pure functions) ------------------------------------------------
def normalize_answer(s: str) -> str:
    """Lower case, no punctuation, no articles (a / an / the), single spaces: the SQuAD v1.1/v2.0
    evaluation script's normalisation."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:  # no-answer: right only if both are empty
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], golds: list[list[str]]) -> dict[str, float]:
    """EM and F1 (x100), each the max over an example's gold answers ([""] when unanswerable);
    with unanswerable examples also the HasAns_ / NoAns_ breakdown of the v2.0 script."""
    em = np.array([max(exact_match(p, g) for g in (gs or [""])) for p, gs in zip(predictions, golds)])
    fs = np.array([max(f1(p, g) for g in (gs or [""])) for p, gs in zip(predictions, golds)])
    out = {"exact_match": 100 * float(em.mean()), "f1": 100 * float(fs.mean())}
    has = np.array([bool(gs) for gs in golds])
    if not has.all():
        for name, sel in (("HasAns", has), ("NoAns", ~has)):
            if sel.any():
                out[f"{name}_exact"], out[f"{name}_f1"] = 100 * float(em[sel].mean()), 100 * float(fs[sel].mean())
    return out


# ---- answers ---------------------------------------------------------------------------------
def parse_answers(value: Any, where: str) -> tuple[list[str], list[int]]:
    """``{text: [...], answer_start: [...]}`` from a dict (json / parquet / hub) or a JSON or Python
    literal string (csv)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise FtjaxError(f"{where}: answers {value[:80]!r} is not a mapping "
                                 "{text: [...], answer_start: [...]}") from None
    if not isinstance(value, dict) or "text" not in value or "answer_start" not in value:
        raise FtjaxError(f"{where}: answers must be {{text: [...], answer_start: [...]}}, got {value!r:.80}")
    texts, starts = value["text"], value["answer_start"]
    texts = [texts] if isinstance(texts, str) else list(texts or [])
    starts = [starts] if isinstance(starts, (int, float)) else list(starts or [])
    if len(texts) != len(starts):
        raise FtjaxError(f"{where}: {len(texts)} answer texts but {len(starts)} answer_start values")
    return [str(t) for t in texts], [int(s) for s in starts]


@dataclasses.dataclass
class QuestionAnsweringOptions:
    """``run_qa.py`` names and meanings."""

    question_column: str = "question"
    context_column: str = "context"
    answer_column: str = "answers"  # {text: [...], answer_start: [...]} (a JSON string in csv)
    stride: int = 32  # tokens shared by consecutive windows of a long context
    version_2_with_negative: bool = False  # SQuAD v2: questions may have no answer
    n_best_size: int = 20
    max_answer_length: int = 30  # tokens
    null_score_diff_threshold: float = 0.0  # v2: predict "" when null score - best span score > this


@register
class QuestionAnswering(Task):
    name = "qa"
    long_inputs = "windowed"  # overlapping windows: no input token is dropped
    auto_class = "FlaxAutoModelForQuestionAnswering"
    Options = QuestionAnsweringOptions

    @property
    def input_columns(self) -> list[str]:
        return [self.options.question_column, self.options.context_column]

    # ---- host: data ------------------------------------------------------------------------
    def check(self, splits: datasets.DatasetDict) -> None:
        o = self.options
        for split, ds in splits.items():
            require_columns(ds, split, [o.question_column, o.context_column, o.answer_column])
            for i, (context, answers) in enumerate(zip(ds[o.context_column], ds[o.answer_column])):
                where = f"{split} split, example {i}"
                texts, starts = parse_answers(answers, where)
                if not texts and not o.version_2_with_negative:
                    raise FtjaxError(f"{where}: no answer; set task_options.version_2_with_negative=true for "
                                     "SQuAD v2 data with unanswerable questions")
                for text, start in zip(texts, starts):
                    found = (context or "")[start:start + len(text)]
                    if found != text:
                        raise FtjaxError(f"{where}: answer_start {start} does not match the answer text "
                                         f"{text!r} in the context (the context there reads {found!r})")

    def _tokenize(self, tokenizer, questions: list[str], contexts: list[str], split: str):
        """Question + context windows (only the context is cut), with offsets and the
        feature -> example map; one clear error when a question leaves no room for the stride."""
        stride, max_length = self.options.stride, self.max_length
        if tokenizer.padding_side != "right":
            raise FtjaxError("qa needs a tokenizer that pads on the right (question first, then context)")
        questions = [q.lstrip() for q in questions]  # leading spaces break truncation room
        room = max_length - tokenizer.num_special_tokens_to_add(pair=True)
        q_lens = [len(x) for x in tokenizer(questions, add_special_tokens=False, verbose=False)["input_ids"]]
        bad = next((i for i, n in enumerate(q_lens) if room - n <= stride), None)
        if bad is not None:
            raise FtjaxError(f"{split} split, example {bad}: the question has {q_lens[bad]} tokens, which leaves "
                             f"{room - q_lens[bad]} context tokens per window with model.max_length={max_length}; "
                             f"that must be more than task_options.stride={stride} (raise max_length or lower stride)")
        try:
            return tokenizer(questions, contexts, truncation="only_second", max_length=max_length, stride=stride,
                             return_overflowing_tokens=True, return_offsets_mapping=True)
        except Exception as e:  # tokenizers raises plain Exceptions
            raise FtjaxError(f"{split} split: cannot tokenize question + context: {str(e).splitlines()[0]}") from None

    def _features(self, tokenizer, questions, contexts, answers, split: str) -> tuple[dict, np.ndarray, list]:
        """Model inputs, ``context_mask`` and (with ``answers``) start / end labels per feature;
        the feature -> example map and each feature's character offsets (-1 outside the context)."""
        enc = self._tokenize(tokenizer, questions, contexts, split)
        example_of = np.asarray(enc["overflow_to_sample_mapping"], np.int64)
        cols = {k: enc[k] for k in MODEL_INPUTS if k in enc}
        cols["context_mask"], starts, ends, offsets = [], [], [], []
        for i, ids in enumerate(enc["input_ids"]):
            seq = np.array([-1 if s is None else s for s in enc.sequence_ids(i)])
            offs = np.asarray(enc["offset_mapping"][i], np.int32).reshape(-1, 2)
            in_context = seq == 1
            cols["context_mask"].append(in_context.astype(np.int32).tolist())
            offsets.append(np.where(in_context[:, None], offs, -1))
            if answers is None:
                continue
            cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            texts, answer_starts = answers[example_of[i]]
            start = end = cls
            if texts:
                ctx = np.flatnonzero(in_context)
                s_char, e_char = answer_starts[0], answer_starts[0] + len(texts[0])
                if offs[ctx[0], 0] <= s_char and offs[ctx[-1], 1] >= e_char:  # the window holds the answer
                    start = int(ctx[np.searchsorted(offs[ctx, 0], s_char, side="right") - 1])
                    end = int(ctx[np.argmax(offs[ctx, 1] >= e_char)])
            starts.append(start)
            ends.append(end)
        if answers is not None:
            cols["start_positions"], cols["end_positions"] = starts, ends
        return cols, example_of, offsets

    def _split(self, ds: datasets.Dataset, tokenizer, split: str, with_answers: bool) -> Split:
        """Features as rows; meta: contexts, gold answers, feature -> example map, offsets."""
        o = self.options
        questions = [str(q or "") for q in ds[o.question_column]]
        contexts = [str(c or "") for c in ds[o.context_column]]
        answers = [parse_answers(a, f"{split} split, example {i}") for i, a in enumerate(ds[o.answer_column])] \
            if with_answers else None
        cols, example_of, offsets = self._features(tokenizer, questions, contexts, answers, split)
        meta = {"contexts": contexts, "golds": [a[0] for a in answers] if answers else None,
                "example_of": example_of, "offsets": offsets}
        return Split(datasets.Dataset.from_dict(cols), meta)

    def prepare(self, splits: datasets.DatasetDict, tokenizer) -> dict[str, Split]:
        return {split: self._split(ds, tokenizer, split, True) for split, ds in splits.items()}

    def encode(self, records: list[dict], tokenizer) -> Split:
        columns = (self.options.question_column, self.options.context_column)
        ds = datasets.Dataset.from_dict({c: [r.get(c) for r in records] for c in columns})
        return self._split(ds, tokenizer, "predict", with_answers=False)

    # ---- device ----------------------------------------------------------------------------
    @staticmethod
    def _row_loss(start, end, batch):
        return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(start, batch["start_positions"])
                      + optax.softmax_cross_entropy_with_integer_labels(end, batch["end_positions"]))

    def loss(self, model, params, batch, rng, train):
        out = model_output(model, params, batch, rng, train)
        start, end = out.start_logits.astype(jnp.float32), out.end_logits.astype(jnp.float32)
        w = batch["weight"]
        return (self._row_loss(start, end, batch) * w).sum(), w.sum()

    def outputs(self, model, params, batch):
        """Per feature: the ``n_best_size`` best start / end tokens inside the context (fixed shape
        whatever the bucket length) and the null (CLS) score."""
        out = model_output(model, params, batch, None, False)
        start, end = out.start_logits.astype(jnp.float32), out.end_logits.astype(jnp.float32)
        k = min(self.options.n_best_size, start.shape[1])
        mask = batch["context_mask"] > 0
        start_val, start_idx = jax.lax.top_k(jnp.where(mask, start, -jnp.inf), k)
        end_val, end_idx = jax.lax.top_k(jnp.where(mask, end, -jnp.inf), k)
        result = {"index": batch["index"], "weight": batch["weight"], "start_idx": start_idx,
                  "start_val": start_val, "end_idx": end_idx, "end_val": end_val,
                  "null_score": start[:, 0] + end[:, 0]}
        if "start_positions" in batch:
            result["loss_sum"] = self._row_loss(start, end, batch) * batch["weight"]
            result["loss_weight"] = batch["weight"]
        return result

    # ---- host: scores ----------------------------------------------------------------------
    def best_answers(self, outputs: dict[str, np.ndarray], meta: dict) -> list[dict]:
        """Per example (in order): the best span across its features, as answer text, character
        start / end in the context and a score (softmax over the example's candidates)."""
        o = self.options
        candidates = collections.defaultdict(list)  # example -> [(score, start_char, end_char)]
        null = {}
        for row, feature in enumerate(outputs["index"]):
            ex, offs = int(meta["example_of"][feature]), meta["offsets"][feature]
            null[ex] = min(null.get(ex, np.inf), float(outputs["null_score"][row]))
            s_idx, e_idx = outputs["start_idx"][row], outputs["end_idx"][row]
            scores = outputs["start_val"][row][:, None] + outputs["end_val"][row][None, :]
            length = e_idx[None, :] - s_idx[:, None] + 1
            ok = np.isfinite(scores) & (length >= 1) & (length <= o.max_answer_length)
            for a, b in zip(*np.nonzero(ok)):
                candidates[ex].append((float(scores[a, b]), int(offs[s_idx[a], 0]), int(offs[e_idx[b], 1])))
        results = []
        for ex in range(len(meta["contexts"])):
            cands = sorted(candidates.get(ex, []), reverse=True)[:o.n_best_size]
            if o.version_2_with_negative and ex in null:
                cands.append((null[ex], -1, -1))
            if not cands:
                results.append({"answer": "", "start": -1, "end": -1, "score": 0.0})
                continue
            scores = np.array([c[0] for c in cands])
            probs = np.exp(scores - scores.max())
            probs /= probs.sum()
            best = max(range(len(cands)), key=lambda i: cands[i][0] if cands[i][1] >= 0 else -np.inf)
            if cands[best][1] < 0 or (o.version_2_with_negative
                                      and null[ex] - cands[best][0] > o.null_score_diff_threshold):
                best = next(i for i, c in enumerate(cands) if c[1] < 0)
            score, s, e = cands[best]
            results.append({"answer": meta["contexts"][ex][s:e] if s >= 0 else "", "start": s, "end": e,
                            "score": float(probs[best])})
        return results

    def metric_names(self) -> set[str]:
        return {"exact_match", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1"}

    def metrics(self, outputs: dict[str, np.ndarray], meta: dict) -> dict[str, Any]:
        answers = self.best_answers(outputs, meta)
        out = squad_scores([a["answer"] for a in answers], meta["golds"])
        out["num_examples"] = len(answers)  # questions, not windows
        return out

    def predictions(self, outputs: dict[str, np.ndarray], meta: dict) -> list[dict]:
        return self.best_answers(outputs, meta)
