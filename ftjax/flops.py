"""Achieved TFLOP/s and MFU (model FLOPs utilisation) of the train step, for the logs.

The FLOPs of one step are XLA's own count (``compiled.cost_analysis()["flops"]``) of the train
step the trainer runs, read once per batch shape: ``jax.jit`` keeps its compiled executables, so
``step.lower(...).compile()`` after the first call of a shape is a cache hit, not a second compile.
On a mesh the count is of one device's partitioned program, so it is already per device.

MFU = achieved FLOP/s per device / the device's peak. Peaks of common accelerators are in
``PEAK_TFLOPS`` (dense, no sparsity, from the vendors' data sheets); ``training.device_peak_tflops``
sets it for any other device (a CPU: ``benchmarks/scale.py`` measures one). Two caveats, both said
in the README: the count is of the compiled program, so rematerialised layers (gradient
checkpointing) count twice (that is "hardware" FLOPs utilisation); and XLA counts a loop body once,
so with gradient accumulation (a ``lax.scan`` over microbatches) the step's count less the
optimizer update's (``optimizer_flops``) is multiplied by the number of microbatches.
"""

from __future__ import annotations

from typing import Callable, Optional

# device_kind (lower case, as jax.devices()[0].device_kind reports it) -> {compute dtype: TFLOP/s}.
# Matched by the longest entry contained in the device kind. GPUs' float32 is the non-tensor-core
# rate: XLA's float32 dots use TF32 tensor cores only if jax_default_matmul_precision allows it.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "tpu v4": {"bfloat16": 275.0},
    "tpu v5 lite": {"bfloat16": 197.0},  # v5e
    "tpu v5e": {"bfloat16": 197.0},
    "tpu v5p": {"bfloat16": 459.0},
    "tpu v5": {"bfloat16": 459.0},  # v5p reports "TPU v5"
    "tpu v6 lite": {"bfloat16": 918.0},  # v6e (Trillium)
    "tpu v6e": {"bfloat16": 918.0},
    "a100": {"bfloat16": 312.0, "float32": 19.5},
    "h100 pcie": {"bfloat16": 756.0, "float32": 51.0},
    "h100": {"bfloat16": 989.0, "float32": 67.0},  # SXM
    "h200": {"bfloat16": 989.0, "float32": 67.0},
}


def peak_tflops(device_kind: str, dtype: str, override: Optional[float] = None) -> Optional[float]:
    """The peak TFLOP/s of one device for ``dtype`` ("bfloat16" / "float32"): ``override`` when
    given, else the table's entry for ``device_kind``; None when unknown (no MFU is then reported)."""
    if override is not None:
        return float(override)
    kind = device_kind.lower()
    matches = [k for k in PEAK_TFLOPS if k in kind]
    if not matches:
        return None
    return PEAK_TFLOPS[max(matches, key=len)].get(dtype)


def compiled_flops(compiled) -> float:
    """FLOPs of one call of a compiled JAX function (per device on a mesh), from XLA's cost analysis."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def optimizer_flops(tx, state) -> float:
    """FLOPs of one optimizer update of ``state`` (per device), from its own small compile."""
    import jax
    return compiled_flops(jax.jit(tx.update).lower(state.params, state.opt_state, state.params).compile())


def batch_key(batch: dict) -> tuple:
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))


class FlopCounter:
    """Sums the FLOPs of the train steps run so far.

    ``count(step, state, batch)`` after each ``step(state, batch)`` call: the FLOPs of a new batch
    shape are read from the (cached) compiled step; with ``microbatches`` > 1 all but the optimizer
    update (``update_flops``) counts that many times (see the module doc).
    """

    def __init__(self, microbatches: int = 1, update_flops: float = 0.0):
        self.microbatches = max(int(microbatches), 1)
        self.update_flops = update_flops
        self.per_shape: dict[tuple, float] = {}
        self.total = 0.0

    def count(self, step: Callable, state, batch: dict, *extra) -> float:
        key = batch_key(batch)
        if key not in self.per_shape:
            step_flops = compiled_flops(step.lower(state, batch, *extra).compile())
            self.per_shape[key] = (step_flops - self.update_flops) * self.microbatches + self.update_flops
        self.total += self.per_shape[key]
        return self.per_shape[key]

    def report(self, seconds: float, peak: Optional[float]) -> dict[str, float]:
        """``tflops_per_device`` (achieved, over ``seconds`` of training) and ``mfu`` when the peak is known."""
        achieved = self.total / max(seconds, 1e-9) / 1e12
        out = {"tflops_per_device": achieved}
        if peak:
            out["mfu"] = achieved / peak
        return out
