"""Orbax checkpoints of the full train state (params, optimizer, step, RNG) plus a JSON of the
data position and config; export of the final model in Hugging Face format. Never pickle."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from ftjax import fault_points
from ftjax.distributed import sync
from ftjax.errors import FtjaxError

log = logging.getLogger("ftjax")


STEP_KEY = "ftjax_step"  # in a checkpoint's metrics: breaks ties between equal best metrics


class CorruptCheckpoint(Exception):
    """A checkpoint that cannot be read back as it was written."""


def _leaf_bits(x) -> jax.Array:
    """The leaf's bit patterns as uint32 (keys as their key data)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = jnp.ravel(x)
    width = x.dtype.itemsize
    if x.dtype == jnp.bool_ or width == 1:
        return x.astype(jnp.uint32)
    if width == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if width == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()  # 8 bytes -> 2 words


@jax.jit
def _state_check(state):
    """Per-leaf position-weighted sums of the bit patterns (a flipped bit always changes its leaf's
    sum: 2**k times an odd weight is never 0 mod 2**32), and whether every float is finite."""
    sums, finite = [], jnp.array(True)
    for x in jax.tree.leaves(state):
        bits = _leaf_bits(x)
        sums.append(jnp.sum(bits * (jnp.arange(bits.size, dtype=jnp.uint32) * 2 + 1)))
        if jnp.issubdtype(x.dtype, jnp.floating):
            finite &= jnp.all(jnp.isfinite(x))
    return jnp.stack(sums) if sums else jnp.zeros((0,), jnp.uint32), finite


def state_check(state) -> tuple[str, bool]:
    """(digest of the state's bits, all floats finite), computed where the state lives (a collective
    with many processes: every process calls it)."""
    sums, finite = jax.device_get(_state_check(state))
    return hashlib.sha256(np.asarray(sums, np.uint32).tobytes()).hexdigest()[:32], bool(finite)


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
        fault_points.install_orbax_delete_point()
        self.metric = metric_key(metric)
        keep = []
        if save_total_limit:
            keep.append(policies.LatestN(n=save_total_limit))
            # Ties go to the earlier step, as the trainer's best tracking (strict improvement) does:
            # orbax keeps the last of the sorted list, and a stable sort leaves the later step last.
            sign = -1 if greater_is_better else 1
            keep.append(policies.BestN(get_metric_fn=lambda m: (m[self.metric], sign * m.get(STEP_KEY, 0)),
                                       reverse=not greater_is_better, n=1, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep) if keep else None,
            best_fn=lambda m: m[self.metric], best_mode="max" if greater_is_better else "min",
            keep_checkpoints_without_metrics=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, step: int, state, meta: dict, metrics: Optional[dict] = None,
             digest: Optional[str] = None) -> None:
        """Starts writing (asynchronously) the state and meta; ``digest`` (``state_check``) is kept
        in the meta and verified on restore."""
        meta = dict(meta, digest=digest) if digest else meta
        metrics = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))} or None
        if metrics is not None and self.metric not in metrics:
            metrics = None
        if metrics is not None:
            metrics[STEP_KEY] = step
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)),
                          metrics=metrics, force=True)
        fault_points.reached("save")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def best_step(self) -> Optional[int]:
        return self.manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore_meta(self, step: int) -> dict:
        """The JSON meta of a checkpoint alone (cheap; read before the state to compare configs)."""
        self.wait()
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - orbax, tensorstore, JSON and OS errors alike
            raise CorruptCheckpoint(f"meta unreadable ({_first_line(e)})") from e
        if not isinstance(meta, dict) or "progress" not in meta:
            raise CorruptCheckpoint("meta incomplete")
        return meta

    def restore(self, step: int, abstract_state, verify: bool = False) -> tuple[Any, dict]:
        """The state laid out as ``abstract_state`` (ShapeDtypeStructs with shardings) and the meta.
        ``verify``: raise ``CorruptCheckpoint`` when anything cannot be read or the state's bits
        differ from the digest saved with it."""
        self.wait()
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001
            if not verify:
                raise
            raise CorruptCheckpoint(f"unreadable ({_first_line(e)})") from e
        if verify:
            saved = (out["meta"] or {}).get("digest")
            digest, _ = state_check(out["state"])
            if saved is not None and saved != digest:
                raise CorruptCheckpoint("its contents differ from what was written (digest mismatch)")
        return out["state"], out["meta"]

    def delete_after(self, step: Optional[int]) -> list[int]:
        """Removes every checkpoint (finished, partial or corrupt) newer than ``step`` (all when
        None), so that a later ``latest`` never lands on one; returns the steps removed."""
        self.wait()
        removed = []
        if jax.process_index() == 0 and self.directory.is_dir():
            for path in self.directory.iterdir():
                number = path.name.split(".", 1)[0]
                if number.isdigit() and (step is None or int(number) > step):
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(int(number))
        sync("ftjax: newer checkpoints removed")
        self.manager.reload()
        return sorted(set(removed))

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def finalized_steps(checkpoint_dir: Path) -> list[int]:
    """Steps whose write finished (Orbax renames a step folder into place only when complete)."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted(ocp.path.step.checkpoint_steps(checkpoint_dir))


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings, for restoring straight onto the mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def export_pretrained(model, params, tokenizer, directory: str | Path, max_length: Optional[int] = None) -> Path:
    """``save_pretrained`` (Flax msgpack weights + config) and the tokenizer, loadable by
    ``FlaxAutoModel*.from_pretrained`` and, with torch installed, by ``pipeline(...)``."""
    from ftjax.models import save_model
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.dtype = "float32"  # the weights' dtype; a jnp type here would be written as "numpy"
    save_model(model, params, directory)
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
