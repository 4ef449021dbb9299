"""Dense layers applied to [rows, features]: a workaround for XLA:CPU's 3-D weight gradient.

flax's ``nn.Dense`` contracts the last axis of a ``[batch, length, features]`` input as it is.
XLA:CPU (jax 0.10.2) compiles the kernel gradient of that 3-D contraction as a transposed copy of the
output gradient followed by a library-less Eigen matmul with both operands transposed. On MiniLM's FFN
shape (2048 rows x 384 -> 1536) that backward pass took 50 ms against 16 ms when the input is first
reshaped to ``[batch * length, features]`` (free: a row-major bitcast); a whole BERT layer forward +
backward went from 128 to 110 ms (``benchmarks/kernels.py``). The math is unchanged: the same
products summed in the same order, equal to float rounding (tested).

``flat_dense()`` is a flax method interceptor that does that reshape around every ``nn.Dense`` call,
so it reaches the Dense layers inside transformers' Flax classes (BERT family, Llama, Mistral, Gemma,
BART, T5...), GPT-2's ``FlaxConv1D`` and a ``model.flax_module`` linen model without touching their
code. The trainer turns it on for the train and evaluation steps (``training.flat_dense``; null: on
where the backend is CPU). ``nn.DenseGeneral`` is not rewritten.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Optional

import flax.linen as nn
import jax


def _row_wise_types() -> tuple[type, ...]:
    """``nn.Dense``, and GPT-2's ``FlaxConv1D`` (the same contraction with a transposed kernel) once
    transformers' GPT-2 module is imported: no GPT-2 layer can exist before that."""
    gpt2 = sys.modules.get("transformers.models.gpt2.modeling_flax_gpt2")
    return (nn.Dense, gpt2.FlaxConv1D) if gpt2 is not None else (nn.Dense,)


def _flatten_dense_input(next_fun, args, kwargs, context):
    if isinstance(context.module, _row_wise_types()) and context.method_name == "__call__" and args \
            and getattr(args[0], "ndim", 0) > 2:
        x = args[0]
        y = next_fun(x.reshape(-1, x.shape[-1]), *args[1:], **kwargs)
        return y.reshape(*x.shape[:-1], y.shape[-1])
    return next_fun(*args, **kwargs)


def flat_dense() -> contextlib.AbstractContextManager:
    """While tracing inside it, every ``nn.Dense`` sees its input as ``[rows, features]``."""
    return nn.intercept_methods(_flatten_dense_input)


def use_flat_dense(setting: Optional[bool]) -> bool:
    """``training.flat_dense``: True / False as set; None (auto) on the CPU backend only, the one
    where it was measured to help."""
    return jax.default_backend() == "cpu" if setting is None else setting


def maybe_flat_dense(setting: Optional[bool]) -> contextlib.AbstractContextManager:
    return flat_dense() if use_flat_dense(setting) else contextlib.nullcontext()
