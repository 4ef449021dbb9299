"""Language modelling on packed text: masked LM (``task: mlm``) and causal LM (``task: clm``).

Documents are tokenized whole, joined with the separator / EOS token and cut into ``block_size``
blocks (ftjax.data.packing). MLM masks on the host (ftjax.data.masking, via ``host_transform``) as
a pure function of (seed, epoch, example), so resumed runs mask identically; CLM shifts labels by
one inside the loss. Metrics: loss, perplexity and top-1 accuracy on the predicted tokens (masked
tokens for MLM, next tokens for CLM). ``ftjax predict`` runs fill-mask (mlm) or generation (clm).
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import datasets
import jax.numpy as jnp
import numpy as np
import optax

from ftjax.data.masking import mask_batch
from ftjax.data.packing import pack_dataset
from ftjax.errors import FtjaxError
from ftjax.tasks.base import Task, register, require_columns

log = logging.getLogger(__name__)


class LanguageModeling(Task):
    """Shared by MLM and CLM: packing, per-token loss bookkeeping, metrics, prediction."""

    causal: ClassVar[bool]

    def __init__(self, config):
        super().__init__(config)
        self.pack_stats: dict[str, dict] = {}
        self._eval_split = "validation"

    @property
    def block_size(self) -> int:
        return self.config.data.block_size or self.config.model.max_length

    def separator_id(self, tokenizer) -> int:
        first, second = ("eos_token_id", "sep_token_id") if self.causal else ("sep_token_id", "eos_token_id")
        sep = getattr(tokenizer, first)
        sep = getattr(tokenizer, second) if sep is None else sep
        if sep is None:
            raise FtjaxError(f"task {self.name}: the tokenizer has neither a separator nor an EOS token "
                             "to join documents with")
        return sep

    # ---- data ------------------------------------------------------------------------------
    def setup(self, splits: datasets.DatasetDict) -> None:
        for split, ds in splits.items():
            require_columns(ds, split, [self.config.data.text_column])

    def check_model(self, tokenizer) -> None:
        """block_size within the model's positions; token ids within its vocabulary."""
        from ftjax.models import model_config
        conf = model_config(self.config.model)
        positions = getattr(conf, "max_position_embeddings", None)
        if positions and self.block_size > positions:
            raise FtjaxError(f"data.block_size {self.block_size} is above the model's maximum of {positions} "
                             "positions (max_position_embeddings)")
        if not self.config.model.from_scratch and len(tokenizer) > conf.vocab_size:
            raise FtjaxError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
                             f"{conf.vocab_size}; use the model's own tokenizer")

    def prepare(self, splits: datasets.DatasetDict, tokenizer) -> datasets.DatasetDict:
        self.check_model(tokenizer)
        self.config.model.max_length = self.block_size  # the batcher pads / cuts to one block
        self.set_vocabulary(tokenizer)
        d = self.config.data
        out = {}
        for split, ds in splits.items():
            out[split], stats = pack_dataset(
                ds, tokenizer, self.block_size, self.separator_id(tokenizer), split, d.text_column, d.remainder,
                with_word_ids=not self.causal and d.whole_word_masking, num_proc=d.preprocessing_num_workers)
            self.pack_stats[split] = stats.as_dict()
            log.info("%s: %d documents -> %d blocks of %d tokens, packing efficiency %.4f", split,
                     stats.documents, stats.blocks, stats.block_size, stats.efficiency)
        return datasets.DatasetDict(out)

    def set_vocabulary(self, tokenizer) -> None:
        self.vocab_size = len(tokenizer)
        self.special_ids = np.asarray(sorted(set(tokenizer.all_special_ids)), np.int32)
        self.mask_id = tokenizer.mask_token_id

    def load_model(self, model_config, bf16: bool, tokenizer, **kwargs):
        if model_config.from_scratch:  # size the embeddings to the tokenizer; its special ids
            first = lambda *ids: next((i for i in ids if i is not None), None)  # noqa: E731
            kwargs.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=first(tokenizer.bos_token_id, tokenizer.cls_token_id),
                          eos_token_id=first(tokenizer.eos_token_id, tokenizer.sep_token_id))
        return super().load_model(model_config, bf16, tokenizer, **kwargs)

    def begin_eval(self, split: str) -> None:
        self._eval_split = split

    # ---- device side -----------------------------------------------------------------------
    def token_terms(self, logits, batch):
        """Per-token cross-entropy, weights (1 where a token is predicted) and targets, ``[B, T]``."""
        raise NotImplementedError

    def loss(self, logits, batch):
        ce, w, _, _ = self.token_terms(logits, batch)
        return (ce * w).sum(), w.sum()

    def outputs(self, logits, batch):
        ce, w, targets, logits = self.token_terms(logits, batch)
        correct = (logits.argmax(-1) == targets) * w
        return {"index": batch["index"], "weight": batch["weight"], "loss_sum": (ce * w).sum(-1),
                "tokens": w.sum(-1), "correct": correct.sum(-1)}

    def eval_outputs(self, model, params, batch):
        logits = self.forward(model, params, batch, None, train=False)
        out = self.outputs(logits, batch)
        out["_loss_sum"], out["_weight"] = out["loss_sum"].sum(), out["tokens"].sum()
        return out

    # ---- host side -------------------------------------------------------------------------
    def metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, Any]:
        tokens = float(outputs["tokens"].sum())
        loss = float(outputs["loss_sum"].sum()) / max(tokens, 1.0)
        out = {"perplexity": math.exp(min(loss, 700.0)), "accuracy": float(outputs["correct"].sum()) / max(tokens, 1.0),
               "predicted_tokens": int(tokens)}
        if self._eval_split in self.pack_stats:
            out["packing_efficiency"] = self.pack_stats[self._eval_split]["packing_efficiency"]
        return out

    def predictions(self, outputs):
        return [{"loss": float(s / max(t, 1.0))} for s, t in zip(outputs["loss_sum"], outputs["tokens"])]


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
        if tokenizer.mask_token is None:
            raise FtjaxError(f"task mlm needs a tokenizer with a mask token; {type(tokenizer).__name__} from "
                             f"'{self.config.model.tokenizer_name_or_path or self.config.model.name_or_path}' "
                             "has none (train one with `ftjax train-tokenizer --kind wordpiece`)")
        return tokenizer

    def host_transform(self, batch, epoch, train):
        d = self.config.data
        return mask_batch(batch, seed=self.config.training.seed, epoch=epoch, train=train,
                          probability=d.mlm_probability, mask_id=self.mask_id, vocab_size=self.vocab_size,
                          special_ids=self.special_ids, whole_word=d.whole_word_masking)

    def token_terms(self, logits, batch):
        labels = batch["labels"]
        weights = (labels >= 0) * batch["weight"][:, None]
        return _shifted_ce(logits, labels, weights)

    def predict_records(self, model, params, tokenizer, records):
        from ftjax.lm_inference import fill_mask
        import jax
        inf = self.config.inference
        texts = [r[self.config.data.text_column] for r in records]
        return fill_mask(model, tokenizer, texts, top_k=inf.top_k or 5, targets=inf.targets,
                         params=jax.device_put(params), batch_size=self.config.training.per_device_eval_batch_size,
                         max_length=self.config.model.max_length)


@register
class CausalLM(LanguageModeling):
    name = "clm"
    auto_class = "FlaxAutoModelForCausalLM"
    causal = True

    def adapt_tokenizer(self, tokenizer):
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has none; padding is masked anyway
        return tokenizer

    def host_transform(self, batch, epoch, train):
        batch = dict(batch)
        batch.pop("word_ids", None)
        return batch

    def token_terms(self, logits, batch):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask", jnp.ones_like(ids))
        weights = mask[:, 1:] * batch["weight"][:, None]  # the label of position t is token t + 1
        return _shifted_ce(logits[:, :-1], ids[:, 1:], weights)

    def predict_records(self, model, params, tokenizer, records):
        from ftjax.lm_inference import generate_text
        import jax
        inf = self.config.inference
        prompts = [r[self.config.data.text_column] for r in records]
        texts = generate_text(model, tokenizer, prompts, max_new_tokens=inf.max_new_tokens, do_sample=inf.do_sample,
                              temperature=inf.temperature, top_k=50 if inf.top_k is None else inf.top_k,
                              top_p=inf.top_p, seed=self.config.training.seed if inf.seed is None else inf.seed,
                              params=jax.device_put(params),
                              batch_size=self.config.training.per_device_eval_batch_size,
                              max_length=self.config.model.max_length)
        return [{"generated_text": t} for t in texts]
