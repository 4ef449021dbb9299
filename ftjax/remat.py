"""Gradient checkpointing (rematerialisation) per transformer layer, for any transformers Flax model.

The backward pass needs the forward pass's intermediate values; keeping them all costs memory that
grows with layers x batch x sequence. Under ``jax.checkpoint`` a layer keeps only what its policy
allows (``jax.checkpoint_policies``) and recomputes the rest in the backward pass: less memory, about
one more forward pass of compute.

transformers has its own switch, ``model.enable_gradient_checkpointing()``, for some Flax families
(BERT, RoBERTa, XLM-R, ELECTRA, BigBird, T5 / mT5 / LongT5, Whisper): ``flax.linen.remat`` around each
layer, with JAX's default policy (nothing saved). ``remat_layers`` does the same from outside the
model, with any policy, for every family: a flax method interceptor runs each call of a *layer* (a
module named by its index, ``"0"``, ``"1"``..., as every transformers Flax layer collection names its
layers: GPT-2, GPT-Neo, Llama / Mistral / Gemma, BART / Pegasus / mBART, DistilBERT, ALBERT, BERT...)
under the lifted ``nn.remat``. Parameter paths, random numbers (dropout) and results are unchanged.

The saving shows on GPU and TPU only: see ``KEEP_REMAT_ON_CPU``.
"""

from __future__ import annotations

import contextlib
import typing
from typing import Callable, Iterator, Optional

import flax.linen as nn
import jax
import numpy as np

from ftjax.config import RematPolicy

# XLA's CPU pipeline removes jax.checkpoint's optimisation barriers (pass "cse_barrier_expander")
# before its CSE, which then merges the recomputation back into the forward pass: on CPU gradient
# checkpointing saves nothing. GPU and TPU remove them only after every CSE and keep the saving.
# The memory-optimized scheduler, which the CLI sets for the process (runtime.configure_process),
# undoes much of it too (MiniLM 32 x 128: 444 -> 1110 MiB of temporaries), so a remat step keeps
# the default one. Compiling for CPU with these options shows what an accelerator saves.
KEEP_REMAT_ON_CPU = {"xla_disable_hlo_passes": "cse_barrier_expander",
                     "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_DEFAULT"}


def step_compiler_options(gradient_checkpointing: bool) -> Optional[dict]:
    """The ``compiler_options`` of a train step: ``KEEP_REMAT_ON_CPU`` for a checkpointed step on
    the CPU backend, else none (the process's own XLA flags). The trainer and ``ftjax plan`` both
    use it, so a plan compiles what training runs."""
    return KEEP_REMAT_ON_CPU if gradient_checkpointing and jax.default_backend() == "cpu" else None


def policy(name: Optional[str]) -> Optional[Callable]:
    """``jax.checkpoint_policies.<name>``; None is JAX's default (save nothing, like transformers)."""
    if name is None:
        return None
    if name not in typing.get_args(RematPolicy):
        raise ValueError(f"unknown remat policy {name!r}")
    return getattr(jax.checkpoint_policies, name)


def is_layer(module: nn.Module) -> bool:
    """A transformer layer: transformers' Flax layer collections name their layers by index."""
    return isinstance(module.name, str) and module.name.isdigit()


@contextlib.contextmanager
def remat_layers(checkpoint_policy: Optional[Callable] = None) -> Iterator[None]:
    """While active (around the loss's forward pass, inside ``jit``), every layer call is traced
    under ``nn.remat(policy=checkpoint_policy)``; modules nested in a layer are not wrapped again.

    Array arguments (hidden states, masks) go through the lifted transform; the others (flags such
    as ``deterministic``) are static, closed over.
    """
    inside: list[bool] = []  # a rematerialised layer is being traced

    def interceptor(next_fun, args, kwargs, context):
        if inside or context.method_name != "__call__" or not is_layer(context.module):
            return next_fun(*args, **kwargs)
        leaves, tree = jax.tree.flatten((args, kwargs))
        dynamic = [i for i, x in enumerate(leaves) if isinstance(x, (jax.Array, np.ndarray))]

        def layer(module, *arrays):
            full = list(leaves)
            for i, x in zip(dynamic, arrays):
                full[i] = x
            call_args, call_kwargs = jax.tree.unflatten(tree, full)
            inside.append(True)
            try:
                return module(*call_args, **call_kwargs)
            finally:
                inside.pop()

        return nn.remat(layer, policy=checkpoint_policy)(context.module, *[leaves[i] for i in dynamic])

    with nn.intercept_methods(interceptor):
        yield
