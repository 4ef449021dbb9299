"""LoRA adapters and frozen parameters as pure functions over Hugging Face Flax parameter trees.

The train state holds only what trains (``Adaptation.split``): with ``model.freeze`` the leaves no
freeze regex matches; with ``model.lora`` a low-rank pair ``lora_a`` [in, r] / ``lora_b`` [r, out]
next to every target kernel (``.../query/lora_a``), plus the leaves the checkpoint did not have (a
new task head, trained whole like PEFT's ``modules_to_save``). Frozen leaves stay outside the
optimizer: no gradients, no Adam moments. The loss sees the effective parameters
``W + (alpha / r) · A·B`` (``Adaptation.effective``), formed inside the jitted step, so nothing in
the model changes and every task and mesh works as before.

    adapt = Adaptation.build(config.model, "bert", abstract_params, checkpoint_weights)
    trainable, frozen = adapt.split(params, rng)
    params = adapt.effective(trainable, frozen)   # what the model runs with (and what is exported)

``B`` starts at zero, so training starts exactly at the base model. ``export_peft`` writes the
adapter as PEFT does (``adapter_config.json`` + ``adapter_model.safetensors``) for the PyTorch class
of the same model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from pathlib import Path
from typing import Optional

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from ftjax.config import ModelConfig
from ftjax.errors import FtjaxError

# Per model family (transformers model_type): regexes over the kernel paths LoRA adapts by default,
# the attention query and value projections as in the LoRA paper and PEFT's defaults.
FAMILY_TARGETS = {
    **{t: [r"attention/self/(query|value)/kernel$"]
       for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert", "albert", "big_bird")},
    "distilbert": [r"attention/(q_lin|v_lin)/kernel$"],
    "gpt2": [r"attn/c_attn/kernel$"],
    "gpt_neo": [r"attention/(q_proj|v_proj)/kernel$"],
    **{t: [r"(q_proj|v_proj)/kernel$"] for t in ("llama", "mistral", "gemma", "bart", "mbart", "pegasus",
                                                  "marian", "blenderbot", "opt", "whisper")},
    **{t: [r"(SelfAttention|EncDecAttention)/(q|v)/kernel$"] for t in ("t5", "mt5", "longt5")},
}
# Families whose Flax kernels are stored [out, in] (GPT-2's Conv1D); PEFT calls this fan_in_fan_out.
TRANSPOSED = ("gpt2",)
ADAPTER_LEAVES = ("lora_a", "lora_b")
# transformers Flax auto class -> PEFT task_type (None: the plain PeftModel).
PEFT_TASK_TYPES = {"FlaxAutoModelForSequenceClassification": "SEQ_CLS",
                   "FlaxAutoModelForTokenClassification": "TOKEN_CLS",
                   "FlaxAutoModelForCausalLM": "CAUSAL_LM", "FlaxAutoModelForSeq2SeqLM": "SEQ_2_SEQ_LM",
                   "FlaxAutoModelForQuestionAnswering": "QUESTION_ANS"}


def path_of(key: tuple) -> str:
    return "/".join(map(str, key))


def _kernels(flat: dict) -> list[str]:
    """Paths of every 2-d weight matrix (``.../kernel``), the leaves LoRA can adapt."""
    return [path_of(k) for k, v in flat.items() if k[-1] == "kernel" and len(v.shape) == 2]


def _names(paths: list[str]) -> str:
    """The module names of kernel paths, for error lines: ``query, key, value, dense...``."""
    seen = dict.fromkeys(p.split("/")[-2] for p in paths)
    return ", ".join(seen)


@dataclasses.dataclass(frozen=True)
class Adaptation:
    """What trains in a model and how; built once from the config and the model's parameter shapes.

    frozen: paths of base leaves left out of training.
    targets: kernel paths that get a LoRA pair (empty without ``model.lora``).
    """

    frozen: frozenset
    targets: tuple = ()
    rank: int = 0
    scale: float = 0.0  # alpha / rank
    transposed: bool = False  # kernels stored [out, in]
    model_type: str = ""
    dropout: float = 0.0  # on the adapter's input, in training (``branches``)

    @classmethod
    def build(cls, cfg: ModelConfig, model_type: str, shapes: dict, weights: Optional[dict]) -> Optional["Adaptation"]:
        """From ``model.lora`` / ``model.freeze``, the model's parameter shapes and the checkpoint's
        weights (nested dicts; the leaves ``weights`` lacks, a new task head, train whole under
        LoRA). None when the config asks for neither. One FtjaxError line for a regex that matches
        nothing, naming the model's parameters."""
        if cfg.lora is None and not cfg.freeze:
            return None
        flat = flatten_dict(shapes)
        paths = [path_of(k) for k in flat]
        new_leaves = set(paths) - {path_of(k) for k in flatten_dict(weights or {})}
        frozen = set()
        for pattern in cfg.freeze:
            hit = {p for p in paths if re.search(pattern, p)}
            if not hit:
                raise FtjaxError(f"model.freeze: {pattern!r} matches no parameter of this {model_type} model "
                                 f"(paths look like {paths[0]})")
            frozen |= hit
        if cfg.lora is None:
            if frozen == set(paths):
                raise FtjaxError("model.freeze freezes every parameter: nothing would train")
            return cls(frozen=frozenset(frozen), model_type=model_type)
        lora = cfg.lora
        if cfg.from_scratch:
            raise FtjaxError("model.lora adapts pretrained weights; it cannot be used with model.from_scratch")
        kernels = _kernels(flat)
        patterns = lora.targets if lora.targets is not None else FAMILY_TARGETS.get(model_type)
        if patterns is None:
            raise FtjaxError(f"model.lora.targets: no default for model type '{model_type}'; give regexes over "
                             f"its weight matrices, named {_names(kernels)}")
        targets = []
        for pattern in patterns:
            hit = [p for p in kernels if re.search(pattern, p)]
            if not hit:
                raise FtjaxError(f"model.lora.targets: {pattern!r} matches no weight matrix of this {model_type} "
                                 f"model; its weight matrices are named {_names(kernels)}")
            targets += [p for p in hit if p not in targets]
        frozen |= set(paths) - set(new_leaves)  # the base model is frozen; a new head trains
        return cls(frozen=frozenset(frozen), targets=tuple(targets), rank=lora.rank, scale=lora.alpha / lora.rank,
                   transposed=model_type in TRANSPOSED, model_type=model_type, dropout=lora.dropout)

    # ---- pure functions over parameter trees ------------------------------------------------
    def _in_out(self, shape) -> tuple[int, int]:
        return (shape[1], shape[0]) if self.transposed else (shape[0], shape[1])

    def adapter_shapes(self, shapes: dict) -> dict:
        """``{module/lora_a: (in, r), module/lora_b: (r, out)}`` for every target kernel."""
        flat = {path_of(k): v for k, v in flatten_dict(shapes).items()}
        out = {}
        for target in self.targets:
            module = target.rsplit("/", 1)[0]
            d_in, d_out = self._in_out(flat[target].shape)
            out[f"{module}/lora_a"] = (d_in, self.rank)
            out[f"{module}/lora_b"] = (self.rank, d_out)
        return out

    def init_adapters(self, shapes: dict, rng: jax.Array) -> dict:
        """Flat ``{path: array}``: A uniform in ±1/sqrt(in) (PEFT's Kaiming-uniform bound), B zeros."""
        out = {}
        for i, (path, shape) in enumerate(sorted(self.adapter_shapes(shapes).items())):
            if path.endswith("lora_a"):
                bound = 1.0 / np.sqrt(shape[0])
                out[path] = jax.random.uniform(jax.random.fold_in(rng, i), shape, jnp.float32, -bound, bound)
            else:
                out[path] = jnp.zeros(shape, jnp.float32)
        return out

    def split(self, params: dict, rng: Optional[jax.Array] = None) -> tuple[dict, dict]:
        """``(trainable, frozen)`` nested dicts from the full parameters; the adapters are created
        from ``rng`` (pass ShapeDtypeStructs under ``jax.eval_shape`` for shapes only)."""
        flat = flatten_dict(params)
        trainable = {k: v for k, v in flat.items() if path_of(k) not in self.frozen}
        frozen = {k: v for k, v in flat.items() if path_of(k) in self.frozen}
        if self.targets:
            adapters = self.init_adapters(params, rng if rng is not None else jax.random.PRNGKey(0))
            trainable.update({tuple(p.split("/")): v for p, v in adapters.items()})
        return unflatten_dict(trainable), unflatten_dict(frozen)

    def effective(self, trainable: dict, frozen: dict, merge: bool = True) -> dict:
        """The full parameters the model runs with: frozen and trained leaves together, every
        target kernel plus its scaled low-rank update (``merge=False``: the base kernels, for
        ``branches``). Pure; jit it or call it inside the loss."""
        flat = flatten_dict(frozen)
        adapters = {}
        for k, v in flatten_dict(trainable).items():
            if k[-1] in ADAPTER_LEAVES:
                adapters[k] = v
            else:
                flat[k] = v
        for target in self.targets if merge else ():
            key = tuple(target.split("/"))
            w = flat[key]
            delta = adapters[key[:-1] + ("lora_a",)] @ adapters[key[:-1] + ("lora_b",)]
            flat[key] = w + (self.scale * (delta.T if self.transposed else delta)).astype(w.dtype)
        return unflatten_dict(flat)

    @contextlib.contextmanager
    def branches(self, trainable: dict, rng: jax.Array):
        """LoRA with dropout, as PEFT computes it: while active, every target module's output gets
        ``scale · dropout(x)·A·B`` added (a flax method interceptor, matching modules by their
        parameter path), so the model must run with the unmerged ``effective(..., merge=False)``.
        Dropout on the input has no merged-weight form; without dropout the two are equal."""
        flat = flatten_dict(trainable)
        pairs = {tuple(t.split("/")[:-1]): i for i, t in enumerate(self.targets)}

        def add_branch(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            scope = getattr(context.module, "scope", None)
            i = pairs.get(tuple(scope.path)) if context.method_name == "__call__" and scope is not None else None
            if i is None:
                return out
            module, x = tuple(self.targets[i].split("/")[:-1]), args[0]
            if self.dropout > 0:
                keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - self.dropout, x.shape)
                x = jnp.where(keep, x / (1.0 - self.dropout), 0.0)
            update = (x.astype(jnp.float32) @ flat[module + ("lora_a",)]) @ flat[module + ("lora_b",)]
            return out + (self.scale * update).astype(out.dtype)

        with nn.intercept_methods(add_branch):
            yield

    def sharding_rules(self, rules: list) -> list:
        """Partition rules for the adapter pairs, derived from the kernels' own rules and put first:
        A [in, r] keeps the kernel's input-dimension axis, B [r, out] its output-dimension axis
        (a tensor-parallel column kernel gives B [None, tensor]; a row kernel A [tensor, None])."""
        extra = []
        for pattern, axes in rules:
            if len(axes) != 2 or not pattern.endswith("kernel$"):
                continue
            stem = pattern[:-len("kernel$")]
            ax_in, ax_out = (axes[1], axes[0]) if self.transposed else (axes[0], axes[1])
            extra += [[stem + "lora_a$", [ax_in, None]], [stem + "lora_b$", [None, ax_out]]]
        return extra + list(rules)

    def describe(self, trainable: dict, frozen: dict) -> dict:
        """Counts for logs and results: trainable and frozen parameters."""
        count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))  # noqa: E731
        return {"trainable_parameters": count(trainable), "frozen_parameters": count(frozen),
                "lora_targets": len(self.targets)}


# ---- PEFT export ---------------------------------------------------------------------------------

def _torch_leaf(module: str, name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """A Flax leaf under its PyTorch name: kernels transposed (Dense [in, out] -> Linear [out, in];
    GPT-2's Flax Conv1D [out, in] -> torch Conv1D [in, out]), LayerNorm scale and embeddings -> weight."""
    if name == "kernel" and value.ndim == 2:
        return f"{module}.weight", value.T
    return f"{module}.{'weight' if name in ('scale', 'embedding', 'kernel') else name}", value


def export_peft(adapt: Adaptation, trainable: dict, directory: str | Path, auto_class: str,
                base_model: str = "", lora_alpha: float = 0.0, dropout: float = 0.0) -> Path:
    """Writes the adapter (and the new head, as PEFT's ``modules_to_save``) in PEFT's format:
    ``adapter_model.safetensors`` with PEFT's key names for the model's PyTorch class and an
    ``adapter_config.json`` that ``PeftModel.from_pretrained(base, directory)`` reads."""
    from safetensors.numpy import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, to_save = {}, []
    for key, value in flatten_dict(trainable).items():
        value = np.asarray(jax.device_get(value), np.float32)
        module = ".".join(map(str, key[:-1]))
        if key[-1] in ADAPTER_LEAVES:  # PEFT: lora_A.weight [r, in], lora_B.weight [out, r]
            name = "lora_A" if key[-1] == "lora_a" else "lora_B"
            tensors[f"base_model.model.{module}.{name}.weight"] = np.ascontiguousarray(value.T)
        else:
            name, value = _torch_leaf(module, key[-1], value)
            tensors[f"base_model.model.{name}"] = np.ascontiguousarray(value)
            to_save.append(module)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": PEFT_TASK_TYPES.get(auto_class), "base_model_name_or_path": base_model,
        "r": adapt.rank, "lora_alpha": lora_alpha or adapt.scale * adapt.rank, "lora_dropout": dropout,
        "target_modules": sorted({t.rsplit("/", 1)[0].replace("/", ".") for t in adapt.targets}),
        "modules_to_save": sorted(set(to_save)) or None, "fan_in_fan_out": adapt.transposed, "bias": "none",
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "rank_pattern": {}, "alpha_pattern": {}}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory
