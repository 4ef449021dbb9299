"""Where a run starts: resume by default from the newest intact checkpoint of the same run.

Re-running the command of a preempted or killed run continues where it stopped. What decides:

- ``overwrite_output_dir``: everything an earlier run wrote is removed; step 0.
- ``resume_from_checkpoint: <folder>/checkpoints/<step>``: that checkpoint, which must be intact.
- otherwise (``latest`` or unset): the newest finished checkpoint in ``OUTPUT_DIR/checkpoints``
  that reads back bit for bit (``Checkpointer.restore(verify=True)``); unreadable ones are skipped
  with one warning each. None: step 0, with one info line.

A checkpoint whose run had other shapes or labels (``signature``) is refused with one line naming
the difference, before its state is read. Checkpoints newer than the step resumed from are deleted,
so that the next ``latest`` cannot land on a corrupt or stale one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Optional

import jax

from ftjax.checkpoint import Checkpointer, CorruptCheckpoint, finalized_steps
from ftjax.errors import FtjaxError
from ftjax.run_dir import clear_previous_run, only_early_files, previous_run_files

log = logging.getLogger("ftjax")


@dataclasses.dataclass
class ResumePlan:
    """Checkpoints to try, newest first, in ``directory``; ``explicit`` when the user named one."""

    directory: Optional[Path] = None
    steps: list[int] = dataclasses.field(default_factory=list)
    explicit: bool = False


def plan_resume(args, output_dir: Path, is_main: bool) -> ResumePlan:
    """The checkpoints a run may start from (see the module doc). Process 0 clears what an
    overwrite (or a run stopped before its first checkpoint) left; the caller syncs afterwards."""
    ckpt_dir = output_dir / "checkpoints"
    if args.overwrite_output_dir:
        if is_main:
            removed = clear_previous_run(output_dir)
            if removed:
                log.info("overwrite_output_dir: removed %s from %s", ", ".join(sorted(removed)), output_dir)
        return ResumePlan()
    resume = args.resume_from_checkpoint
    if resume and resume != "latest":
        path = Path(resume).absolute()
        if not path.is_dir() or not path.name.isdigit():
            raise FtjaxError(f"resume_from_checkpoint: {resume} is not a checkpoint folder (.../checkpoints/<step>)")
        return ResumePlan(path.parent, [int(path.name)], explicit=True)
    steps = finalized_steps(ckpt_dir)
    if steps:
        return ResumePlan(ckpt_dir, sorted(steps, reverse=True))
    if not only_early_files(output_dir):
        names = ", ".join(p.name for p in previous_run_files(output_dir)) or "files of its own"
        raise FtjaxError(f"output_dir {output_dir} holds an earlier run ({names}) and no checkpoint to resume "
                         "from; set training.overwrite_output_dir=true to start over, or choose another "
                         "training.output_dir")
    if is_main:
        clear_previous_run(output_dir)  # config.json / log.jsonl of a run stopped before its first save
    log.info("no checkpoint in %s to resume from: starting from step 0", ckpt_dir)
    return ResumePlan()


def signature(config, model_config, global_batch: int) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint: everything that
    decides the shapes of the state and batches, the labels and the data order."""
    id2label = getattr(model_config, "id2label", None) or {}
    options = config.to_dict().get("task_options") or {}
    sig = {"task": config.task, "model.name_or_path": config.model.name_or_path,
           "model.config_overrides": config.model.config_overrides, "model.max_length": config.model.max_length,
           "training.per_device_train_batch_size": config.training.per_device_train_batch_size,
           "training.gradient_accumulation_steps": config.training.gradient_accumulation_steps,
           "global batch size": global_batch,
           "labels": [id2label[k] for k in sorted(id2label, key=int)]}
    for key in ("block_size", "max_target_length"):
        if key in options:
            sig[f"task_options.{key}"] = options[key]
    return json.loads(json.dumps(sig, default=str))  # as it reads back from the checkpoint's JSON


def differences(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for every entry that changed (keys missing on one side are skipped:
    checkpoints of older versions)."""
    out = []
    for key, now in current.items():
        if key in saved and saved[key] != now:
            was = saved[key]
            if key == "labels":
                was, now = f"{len(was)} {was}", f"{len(now)} {now}"
            out.append(f"{key} {was} -> {now}")
    return out


def restore_newest_intact(plan: ResumePlan, ckpt: Checkpointer, abstract_state, current_signature: dict):
    """(state, meta, step) of the newest intact checkpoint of the plan, or None when there is none.
    Unreadable checkpoints are skipped with a warning (an explicitly named one is an error); a
    checkpoint of a run with other shapes or labels is refused."""
    source = ckpt if plan.directory == ckpt.directory else Checkpointer(plan.directory)
    for step in plan.steps:
        where = plan.directory / str(step)
        try:
            meta = source.restore_meta(step)
            changed = differences(meta.get("signature") or {}, current_signature)
            if changed:
                raise FtjaxError(f"cannot resume from {where}: the config changed ({'; '.join(changed)}); set "
                                 "training.overwrite_output_dir=true to start over, or choose another output_dir")
            state, meta = source.restore(step, abstract_state, verify=True)
            return state, meta, step
        except CorruptCheckpoint as e:
            if plan.explicit:
                raise FtjaxError(f"resume_from_checkpoint: {where} is corrupt: {e}") from None
            rest = [s for s in plan.steps if s < step]
            if jax.process_index() == 0:
                log.warning("checkpoint %s is corrupt (%s): %s", where, e,
                            f"trying step {rest[0]}" if rest else "no intact checkpoint left, starting from step 0")
    return None
