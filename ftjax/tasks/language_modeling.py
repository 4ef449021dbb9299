"""Language modelling on packed text: masked LM (``task: mlm``) and causal LM (``task: clm``).

Documents are tokenized whole, joined with the separator / EOS token and cut into ``block_size``
blocks (ftjax.data.packing). MLM masks on the host (ftjax.data.masking, via ``host_transform``) as
a pure function of (seed, epoch, example), so resumed runs mask identically; CLM shifts labels by
one inside the loss. Metrics: loss, perplexity and top-1 accuracy on the predicted tokens (masked
tokens for MLM, next tokens for CLM). ``ftjax predict`` runs fill-mask (mlm) or generation (clm).
With ``task_options.document_attention`` each document of a block attends only to itself
(``with_documents`` on the host, ``ftjax.segments`` on the device).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, ClassVar, Literal, Optional

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax import mlm_head
from ftjax.data.masking import mask_batch
from ftjax.data.packing import document_segments, pack_dataset
from ftjax.errors import FtjaxError
from ftjax.segments import check_document_attention, packed_token_logits
from ftjax.tasks.base import Split, Task, model_output, register, require_columns, tokenize_split

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LanguageModelingOptions:
    block_size: Optional[int] = None  # tokens per block (default model.max_length)
    remainder: Literal["drop", "pad"] = "drop"  # the last, shorter block of a split
    mlm_probability: float = 0.15  # mlm: share of tokens (or words) predicted
    whole_word_masking: bool = False  # mlm: mask every subword of a chosen word
    # Attention kept within each document of a block (block-diagonal mask, positions restarting per
    # document; ftjax.segments) instead of across the separators. BERT family, GPT-2, Llama, Mistral, Gemma.
    document_attention: bool = False
    # mlm: the LM head computes logits at the masked positions only (ftjax.mlm_head): the same loss
    # and gradients for much less work. false: logits for every token, as transformers computes them.
    predict_masked_only: bool = True


class LanguageModeling(Task):
    """Shared by MLM and CLM: packing, per-token loss bookkeeping, metrics, prediction."""

    causal: ClassVar[bool]
    Options = LanguageModelingOptions
    base_model_predicts = True  # fill-mask / generation with the pretrained LM head

    def __init__(self, config):
        super().__init__(config)
        if not 0 < self.options.mlm_probability < 1:
            raise FtjaxError(f"task_options.mlm_probability must be in (0, 1), got {self.options.mlm_probability}")

    @property
    def max_length(self) -> int:
        """One block: the batcher pads / cuts to it."""
        return self.options.block_size or self.config.model.max_length

    def separator_id(self, tokenizer) -> int:
        first, second = ("eos_token_id", "sep_token_id") if self.causal else ("sep_token_id", "eos_token_id")
        sep = getattr(tokenizer, first)
        sep = getattr(tokenizer, second) if sep is None else sep
        if sep is None:
            raise FtjaxError(f"task {self.name}: the tokenizer has neither a separator nor an EOS token "
                             "to join documents with")
        return sep

    # ---- host: data ------------------------------------------------------------------------
    def check_model(self, tokenizer) -> None:
        """block_size within the model's positions; token ids within its vocabulary."""
        from ftjax.models import model_config, uses_flax_module
        if uses_flax_module(self.config.model):  # its own model, sized to the tokenizer
            if self.options.document_attention:
                raise FtjaxError("task_options.document_attention needs a transformers model; "
                                 "a model.flax_module model gets its own masks")
            return
        conf = model_config(self.config.model)
        positions = getattr(conf, "max_position_embeddings", None)
        if positions and self.max_length > positions:
            raise FtjaxError(f"task_options.block_size {self.max_length} is above the model's maximum of {positions} "
                             "positions (max_position_embeddings)")
        if not self.config.model.from_scratch and len(tokenizer) > conf.vocab_size:
            raise FtjaxError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
                             f"{conf.vocab_size}; use the model's own tokenizer")
        if self.options.document_attention:
            check_document_attention(conf)

    def check(self, splits: datasets.DatasetDict) -> None:
        for split, ds in splits.items():
            require_columns(ds, split, [self.config.data.text_column])

    def prepare(self, splits: datasets.DatasetDict, tokenizer) -> dict[str, Split]:
        d, o = self.config.data, self.options
        self.check_model(tokenizer)
        out = {}
        for split, ds in splits.items():
            def cached(data, function, name, split=split, **kwargs):
                return tokenize_split(self, data, function, split, tokenizer, name.replace(" ", "-"), **kwargs)

            rows, stats = pack_dataset(
                ds, tokenizer, self.max_length, self.separator_id(tokenizer), split, d.text_column, o.remainder,
                with_word_ids=not self.causal and o.whole_word_masking, map_fn=cached,
                num_proc=d.preprocessing_num_workers)
            log.info("%s: %d documents -> %d blocks of %d tokens, packing efficiency %.4f", split,
                     stats.documents, stats.blocks, stats.block_size, stats.efficiency)
            out[split] = Split(rows, {"packing": stats.as_dict()})
        return out

    def load_model(self, model_config, bf16: bool, tokenizer, **kwargs):
        if model_config.from_scratch:  # size the embeddings to the tokenizer; its special ids
            first = lambda *ids: next((i for i in ids if i is not None), None)  # noqa: E731
            kwargs.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=first(tokenizer.bos_token_id, tokenizer.cls_token_id),
                          eos_token_id=first(tokenizer.eos_token_id, tokenizer.sep_token_id))
        return super().load_model(model_config, bf16, tokenizer, **kwargs)

    def encode(self, records: list[dict], tokenizer) -> Split:
        raise FtjaxError(f"task {self.name} predicts by {'generation' if self.causal else 'fill-mask'} only")

    # ---- device ----------------------------------------------------------------------------
    def adapt_tokenizer(self, tokenizer):
        """Remembers the separator that ends each document (document attention needs it)."""
        self.separator = self.separator_id(tokenizer) if self.options.document_attention else None
        return tokenizer

    def with_documents(self, batch: dict) -> dict:
        """Host: ``segment_ids`` / ``position_ids`` of each block's documents (document attention)."""
        if not self.options.document_attention:
            return dict(batch)
        mask = batch.get("attention_mask", np.ones_like(batch["input_ids"]))
        segments, positions = document_segments(batch["input_ids"], mask, self.separator)
        return {**batch, "segment_ids": segments, "position_ids": positions}

    def token_terms(self, logits, batch):
        """Per-token cross-entropy, weights (1 where a token is predicted), targets and logits, ``[B, T]``."""
        raise NotImplementedError

    def logits(self, model, params, batch, rng, train):
        """``[B, L, vocab]``, or ``[B, K, vocab]`` at ``batch["masked_positions"]`` (MLM)."""
        positions = batch.get("masked_positions")
        if positions is not None and model.config.model_type in mlm_head.SUPPORTED:
            return mlm_head.masked_logits(model, params, batch, rng, train)
        if "segment_ids" in batch:  # document attention: each document attends to itself only
            logits = packed_token_logits(model, params, batch, rng, train)
        else:
            logits = model_output(model, params, batch, rng, train).logits
        if positions is not None:  # another family: the full logits, read at the same positions
            logits = jnp.take_along_axis(logits, positions[:, :, None], axis=1)
        return logits

    def loss(self, model, params, batch, rng, train):
        ce, w, _, _ = self.token_terms(self.logits(model, params, batch, rng, train), batch)
        return (ce * w).sum(), w.sum()

    def outputs(self, model, params, batch):
        ce, w, targets, scores = self.token_terms(self.logits(model, params, batch, None, False), batch)
        correct = (scores.argmax(-1) == targets) * w
        return {"index": batch["index"], "weight": batch["weight"], "loss_sum": (ce * w).sum(-1),
                "loss_weight": w.sum(-1), "correct": correct.sum(-1)}

    # ---- host: scores ----------------------------------------------------------------------
    def metric_names(self) -> set[str]:
        return {"perplexity", "accuracy", "predicted_tokens", "packing_efficiency"}

    def metrics(self, outputs: dict[str, np.ndarray], meta: dict) -> dict[str, Any]:
        tokens = float(outputs["loss_weight"].sum())
        loss = float(outputs["loss_sum"].sum()) / max(tokens, 1.0)
        out = {"perplexity": math.exp(min(loss, 700.0)), "accuracy": float(outputs["correct"].sum()) / max(tokens, 1.0),
               "predicted_tokens": int(tokens)}
        if "packing" in meta:
            out["packing_efficiency"] = meta["packing"]["packing_efficiency"]
        return out

    def predictions(self, outputs, meta):
        return [{"loss": float(s / max(t, 1.0))} for s, t in zip(outputs["loss_sum"], outputs["loss_weight"])]


def _shifted_ce(logits, targets, weights):
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(targets, 0))
    return ce, weights, targets, logits


@register
class MaskedLM(LanguageModeling):
    name = "mlm"
    auto_class = "FlaxAutoModelForMaskedLM"
    causal = False

    def adapt_tokenizer(self, tokenizer):
        """Checks the mask token and reads the vocabulary the host-side masking draws from."""
        if tokenizer.mask_token is None:
            raise FtjaxError(f"task mlm needs a tokenizer with a mask token; {type(tokenizer).__name__} from "
                             f"'{self.config.model.tokenizer_name_or_path or self.config.model.name_or_path}' "
                             "has none (train one with `ftjax train-tokenizer --kind wordpiece`)")
        self.vocab_size = len(tokenizer)
        self.special_ids = np.asarray(sorted(set(tokenizer.all_special_ids)), np.int32)
        self.mask_id = tokenizer.mask_token_id
        return super().adapt_tokenizer(tokenizer)

    def host_transform(self, batch, epoch, train):
        o = self.options
        batch = mask_batch(self.with_documents(batch), seed=self.config.data_seed, epoch=epoch, train=train,
                           probability=o.mlm_probability, mask_id=self.mask_id, vocab_size=self.vocab_size,
                           special_ids=self.special_ids, whole_word=o.whole_word_masking)
        return mlm_head.gather_masked(batch, o.mlm_probability) if o.predict_masked_only else batch

    def token_terms(self, logits, batch):
        labels = batch["labels"]
        weights = (labels >= 0) * batch["weight"][:, None]
        return _shifted_ce(logits, labels, weights)

    def generate(self, model, params, tokenizer, records):
        from ftjax.lm_inference import fill_mask
        inf = self.config.inference
        texts = [r[self.config.data.text_column] for r in records]
        return fill_mask(model, tokenizer, texts, top_k=inf.top_k or 5, targets=inf.targets,
                         params=jax.device_put(params), batch_size=self.config.training.per_device_eval_batch_size,
                         max_length=self.max_length)


@register
class CausalLM(LanguageModeling):
    name = "clm"
    auto_class = "FlaxAutoModelForCausalLM"
    causal = True

    def adapt_tokenizer(self, tokenizer):
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has none; padding is masked anyway
        return super().adapt_tokenizer(tokenizer)

    def host_transform(self, batch, epoch, train):
        batch = self.with_documents(batch)
        batch.pop("word_ids", None)
        return batch

    def token_terms(self, logits, batch):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask", jnp.ones_like(ids))
        # The label of position t is token t + 1; the last position predicts nothing (weight 0). The
        # labels are shifted, not the logits: slicing [B, L, vocab] would copy it (and pad its gradient).
        targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
        weights = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1) * batch["weight"][:, None]
        return _shifted_ce(logits, targets, weights)

    def generate(self, model, params, tokenizer, records):
        from ftjax.lm_inference import generate_text
        inf = self.config.inference
        prompts = [r[self.config.data.text_column] for r in records]
        texts = generate_text(model, tokenizer, prompts, max_new_tokens=inf.max_new_tokens, do_sample=inf.do_sample,
                              temperature=inf.temperature, top_k=50 if inf.top_k is None else inf.top_k,
                              top_p=inf.top_p, seed=self.config.training.seed if inf.seed is None else inf.seed,
                              params=jax.device_put(params),
                              batch_size=self.config.training.per_device_eval_batch_size,
                              max_length=self.max_length)
        return [{"generated_text": t} for t in texts]
