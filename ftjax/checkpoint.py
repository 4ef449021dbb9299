"""Orbax checkpoints of the full train state (params, optimizer, step, RNG) plus a JSON of the
data position and config; export of the final model in Hugging Face format. Never pickle."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from ftjax.errors import FtjaxError


def metric_key(name: Optional[str]) -> str:
    """``eval_loss`` (TrainingArguments style) and ``loss`` name the same metric."""
    name = name or "loss"
    return name[len("eval_"):] if name.startswith("eval_") else name


class Checkpointer:
    """Saves / restores ``{"state": TrainState, "meta": dict}``; keeps the newest
    ``save_total_limit`` checkpoints and always the best one by ``metric``."""

    def __init__(self, directory: str | Path, save_total_limit: Optional[int] = None,
                 metric: str = "loss", greater_is_better: bool = False):
        self.directory = Path(directory).absolute()
        self.metric = metric_key(metric)
        keep = []
        if save_total_limit:
            keep.append(policies.LatestN(n=save_total_limit))
            keep.append(policies.BestN(get_metric_fn=lambda m: m[self.metric], reverse=not greater_is_better,
                                       n=1, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep) if keep else None,
            best_fn=lambda m: m[self.metric], best_mode="max" if greater_is_better else "min",
            keep_checkpoints_without_metrics=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, step: int, state, meta: dict, metrics: Optional[dict] = None) -> None:
        metrics = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))} or None
        if metrics is not None and self.metric not in metrics:
            metrics = None
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)),
                          metrics=metrics, force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def best_step(self) -> Optional[int]:
        return self.manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
        """The state laid out as ``abstract_state`` (ShapeDtypeStructs with shardings) and the meta."""
        self.wait()
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def resolve_resume(resume: Optional[str], checkpoint_dir: Path) -> tuple[Optional[Path], Optional[int]]:
    """``"latest"`` or a checkpoint folder ``.../checkpoints/<step>`` -> (manager dir, step)."""
    if not resume:
        return None, None
    if resume == "latest":  # Orbax's finalized steps (a write cut short is never resumed from)
        steps = ocp.path.step.checkpoint_steps(checkpoint_dir) if checkpoint_dir.is_dir() else []
        if not steps:
            return None, None  # nothing to resume: start fresh
        return checkpoint_dir, max(steps)
    path = Path(resume)
    if not path.is_dir() or not path.name.isdigit():
        raise FtjaxError(f"resume_from_checkpoint: {resume} is not a checkpoint folder (.../checkpoints/<step>)")
    return path.parent, int(path.name)


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings, for restoring straight onto the mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def export_pretrained(model, params, tokenizer, directory: str | Path, max_length: Optional[int] = None) -> Path:
    """``save_pretrained`` (Flax msgpack weights + config) and the tokenizer, loadable by
    ``FlaxAutoModel*.from_pretrained`` and, with torch installed, by ``pipeline(...)``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.dtype = "float32"  # the weights' dtype; a jnp type here would be written as "numpy"
    model.save_pretrained(directory, params=jax.device_get(params))
    if max_length is not None:  # the length the model was trained at, not the base checkpoint's
        tokenizer.model_max_length = tokenizer.init_kwargs["model_max_length"] = max_length
    tokenizer.save_pretrained(directory)
    return directory


def export_pytorch(directory: str | Path, flax_auto_class: str) -> bool:
    """Adds PyTorch safetensors weights to an export (so ``transformers.pipeline`` loads it), using
    transformers' own Flax->PyTorch conversion in a child process so the trainer never imports torch.
    Returns False when torch is not installed."""
    if importlib.util.find_spec("torch") is None:
        return False
    pt_class = flax_auto_class.replace("FlaxAutoModel", "AutoModel")
    # from_pretrained(from_flax=True) leaves meta tensors in transformers 4.57 + torch 2.13, so build the
    # model from its config and load the msgpack with transformers' converter.
    code = ("import sys, transformers as t; "
            "from transformers.modeling_flax_pytorch_utils import load_flax_checkpoint_in_pytorch_model as load; "
            f"d = sys.argv[1]; m = t.{pt_class}.from_config(t.AutoConfig.from_pretrained(d)); "
            "load(m, d + '/flax_model.msgpack').save_pretrained(d, safe_serialization=True)")
    env = dict(os.environ, USE_TORCH="1")
    proc = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise FtjaxError(f"PyTorch export failed: {proc.stderr.strip().splitlines()[-1]}")
    # safetensors writes its file 0600; give it the mode of the export's other files (umask's 0644)
    directory = Path(directory)
    mode = (directory / "config.json").stat().st_mode & 0o777
    for weights in directory.glob("model*.safetensors*"):
        weights.chmod(mode)
    return True
