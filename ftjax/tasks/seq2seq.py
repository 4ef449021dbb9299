"""Sequence-to-sequence (summarization, translation, title generation): BART, Pegasus, T5 / mT5 and
encoder-decoder pairs built from an encoder checkpoint (BERT2BERT).

Sources are cut at ``model.max_length`` tokens (with ``task_options.source_prefix`` in front, e.g.
T5's "summarize: "), targets at ``task_options.max_target_length`` and padded with -100 to their own bucket
length (a ``LengthGroup``). Decoder inputs are the labels shifted right by the model's own
``shift_tokens_right``. With ``training.predict_with_generate`` the jitted eval step also decodes
(greedy or beam search, settings in ``inference``) and evaluation reports ROUGE and sacreBLEU.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Any

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax.data.batching import LengthGroup
from ftjax.errors import FtjaxError
from ftjax.models import (flax_transformers, forward, generate, load_encoder_decoder, load_model, locate,
                          model_config as load_config)
from ftjax.tasks.base import Split, Task, register, require_columns, tokenize_split

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def decoder_inputs(model, labels: jax.Array) -> jax.Array:
    """``labels`` (-100 = ignored) shifted right with the model family's ``shift_tokens_right``
    (BART's for families without one, e.g. ``FlaxEncoderDecoderModel``: the same rule)."""
    from transformers.models.bart.modeling_flax_bart import shift_tokens_right as bart_shift
    shift = getattr(sys.modules[type(model).__module__], "shift_tokens_right", bart_shift)
    pad = model.config.pad_token_id
    if len(inspect.signature(shift).parameters) == 2:  # mBART: starts with the last non-pad token
        return shift(labels, pad)
    return shift(labels, pad, model.config.decoder_start_token_id)


def token_cross_entropy(logits: jax.Array, labels: jax.Array, per_row: bool = False) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, number of tokens) over positions whose label is not -100; per row
    (``[batch]`` each) with ``per_row``."""
    mask = labels != -100
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(mask, labels, 0))
    axis = -1 if per_row else None
    return (losses * mask).sum(axis), mask.sum(axis).astype(jnp.float32)


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F-measure (``rouge_score``, stemmed; Lsum splits sentences at newlines) and
    corpus sacreBLEU, all x100 like the Hugging Face examples. Offline."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score(ref, pred) for ref, pred in zip(references, predictions)]
    out = {k: 100 * float(np.mean([s[k].fmeasure for s in scores])) for k in ROUGE_TYPES}
    out["bleu"] = float(sacrebleu.corpus_bleu(predictions, [references]).score)
    return out


@dataclasses.dataclass
class Seq2SeqOptions:
    source_column: str = "source"
    target_column: str = "target"
    source_prefix: str = ""  # e.g. "summarize: " for T5
    max_target_length: int = 128  # target tokens (labels are cut here)
    target_bucket_lengths: list[int] = dataclasses.field(default_factory=lambda: [16, 32, 64, 128])


@register
class Seq2Seq(Task):
    name = "seq2seq"
    auto_class = "FlaxAutoModelForSeq2SeqLM"
    Options = Seq2SeqOptions

    @property
    def input_columns(self) -> list[str]:
        return [self.options.source_column]

    def length_groups(self) -> tuple:
        o = self.options
        return (LengthGroup(("labels",), o.max_target_length, tuple(o.target_bucket_lengths)),)

    # ---- host: data ------------------------------------------------------------------------
    def _encode(self, tokenizer, examples: dict, with_labels: bool) -> dict:
        o = self.options
        sources = [o.source_prefix + ("" if s is None else str(s)) for s in examples[o.source_column]]
        enc = tokenizer(sources, truncation=True, max_length=self.max_length)
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if with_labels:
            targets = [str(t) for t in examples[o.target_column]]
            out["labels"] = tokenizer(text_target=targets, truncation=True, max_length=o.max_target_length)["input_ids"]
        return out

    def check(self, splits: datasets.DatasetDict) -> None:
        o = self.options
        for split, ds in splits.items():
            require_columns(ds, split, [o.source_column, o.target_column])
            bad = next((i for i, t in enumerate(ds[o.target_column]) if t is None or not str(t).strip()), None)
            if bad is not None:
                raise FtjaxError(f"{split} split, example {bad}: empty target (column '{o.target_column}')")

    def prepare(self, splits: datasets.DatasetDict, tokenizer) -> dict[str, Split]:
        o = self.options
        out = {}
        for split, ds in splits.items():
            references = [str(t) for t in ds[o.target_column]]
            rows = tokenize_split(self, ds, lambda ex: self._encode(tokenizer, ex, True), split, tokenizer,
                                  remove_columns=ds.column_names)
            out[split] = Split(rows, {"references": references, "tokenizer": tokenizer})
        return out

    def encode(self, records: list[dict], tokenizer) -> Split:
        ds = datasets.Dataset.from_list(records)
        rows = ds.map(lambda ex: self._encode(tokenizer, ex, False), batched=True, remove_columns=ds.column_names)
        return Split(rows, {"tokenizer": tokenizer})

    # ---- model -----------------------------------------------------------------------------
    def load_model(self, model_config, bf16: bool, tokenizer, **kwargs):
        """A seq2seq checkpoint as is; an encoder-only one (BERT, RoBERTa...) as a BERT2BERT-style
        ``FlaxEncoderDecoderModel`` whose decoder starts from the same weights (cross-attention new).
        Returns ``(model, weights)`` like ``ftjax.models.load_model``."""
        name, from_pt = locate(model_config.name_or_path)
        if load_config(model_config).is_encoder_decoder:
            return load_model(self.auto_class, model_config, bf16, **kwargs)
        start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        if start is None or end is None or tokenizer.pad_token_id is None:
            raise FtjaxError(f"tokenizer of {name} has no cls/bos, sep/eos or pad token to build an encoder-decoder")
        model, weights = load_encoder_decoder(name, from_pt, model_config, bf16)
        for c in (model.config, model.generation_config):
            c.decoder_start_token_id, c.bos_token_id, c.eos_token_id = start, start, end
            c.pad_token_id = tokenizer.pad_token_id
        model.config.vocab_size = model.config.decoder.vocab_size
        return model, weights

    # ---- device ----------------------------------------------------------------------------
    @staticmethod
    def _logits(model, params, batch, rng, train):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                  "decoder_input_ids": decoder_inputs(model, batch["labels"])}
        return forward(model, params, inputs, rng, train).logits

    def loss(self, model, params, batch, rng, train):
        return token_cross_entropy(self._logits(model, params, batch, rng, train), batch["labels"])

    def generate_ids(self, model, params, batch: dict) -> jax.Array:
        """``[batch, max_new_tokens + 1]`` token ids (decoder start first), traced inside jit."""
        flax_transformers()  # the no-repeat-n-gram shim, for models built by hand too
        inf = self.config.inference
        special = {k: next((v for v in (getattr(model.generation_config, k, None), getattr(model.config, k, None))
                            if v is not None), None)
                   for k in ("decoder_start_token_id", "pad_token_id", "eos_token_id")}
        return generate(
            model, params, batch["input_ids"], attention_mask=batch["attention_mask"],
            max_new_tokens=inf.max_new_tokens, num_beams=inf.num_beams, length_penalty=inf.length_penalty,
            no_repeat_ngram_size=inf.no_repeat_ngram_size or None, do_sample=False, **special)

    def outputs(self, model, params, batch):
        out = {"index": batch["index"], "weight": batch["weight"]}
        if "labels" in batch:
            scores = self._logits(model, params, batch, None, False)
            out["loss_sum"], out["loss_weight"] = token_cross_entropy(scores, batch["labels"], per_row=True)
        if "labels" not in batch or self.config.training.predict_with_generate:
            out["generated"] = self.generate_ids(model, params, batch)
        return out

    # ---- host: scores ----------------------------------------------------------------------
    @staticmethod
    def decode(tokenizer, token_ids: np.ndarray) -> list[str]:
        return [t.strip() for t in tokenizer.batch_decode(token_ids, skip_special_tokens=True)]

    def metric_names(self) -> set[str]:
        """ROUGE / BLEU only when evaluation generates (``training.predict_with_generate``)."""
        return {*ROUGE_TYPES, "bleu", "gen_len"} if self.config.training.predict_with_generate else set()

    def metrics(self, outputs: dict[str, np.ndarray], meta: dict) -> dict[str, Any]:
        if "generated" not in outputs:
            return {}
        tokenizer = meta["tokenizer"]
        predictions = self.decode(tokenizer, outputs["generated"])
        out = generation_metrics(predictions, [meta["references"][i] for i in outputs["index"]])
        special = set(tokenizer.all_special_ids)
        out["gen_len"] = float(np.mean([sum(t not in special for t in row) for row in outputs["generated"].tolist()]))
        return out

    def predictions(self, outputs: dict[str, np.ndarray], meta: dict) -> list[dict]:
        return [{"generated_text": t} for t in self.decode(meta["tokenizer"], outputs["generated"])]
