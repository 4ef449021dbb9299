"""Device mesh and partition rules for Hugging Face Flax parameters (which carry no axis names).

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with sharded parameters and
optimizer state) and ``tensor`` (Megatron-style tensor parallelism). The batch is split over
``("data", "fsdp")``. Parameters are placed by rules over their path strings
(``bert/encoder/layer/0/attention/self/query/kernel``): tensor rules first, then FSDP shards the
largest remaining dimension of every big array.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ftjax.config import MeshConfig
from ftjax.errors import FtjaxError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Column-parallel kernels [in, out] split their output features; row-parallel ones their inputs.
# Covers BERT/RoBERTa/ELECTRA/ALBERT, DistilBERT, GPT-2/Neo, Llama/Gemma/Mistral, BART/Pegasus, T5.
COLUMN_PARALLEL = (r"(attention/self/(query|key|value)|q_lin|k_lin|v_lin|q_proj|k_proj|v_proj|"
                   r"gate_proj|up_proj|intermediate/dense|lin1|c_fc|c_attn|fc1|/wi(_0|_1)?|/(q|k|v))/kernel$")
ROW_PARALLEL = (r"(attention/output/dense|out_lin|o_proj|down_proj|out_proj|(?<!attention/)output/dense|"
                r"lin2|c_proj|fc2|/wo|/o)/kernel$")
COLUMN_BIAS = COLUMN_PARALLEL.replace("/kernel$", "/bias$")


def make_mesh(cfg: MeshConfig, devices: Optional[list] = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise FtjaxError("mesh: at most one of data / fsdp / tensor may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise FtjaxError(f"mesh: {len(devices)} devices do not divide into {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if -1 not in sizes and int(np.prod(sizes)) < len(devices):
        logging.getLogger(__name__).warning("mesh %s uses %d of %d devices", sizes, int(np.prod(sizes)),
                                            len(devices))
        devices = devices[:int(np.prod(sizes))]
    if int(np.prod(sizes)) != len(devices):
        raise FtjaxError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"{len(devices)} are available")
    return Mesh(np.array(devices).reshape(sizes), AXES)


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_spec(path: str, shape: tuple, mesh: Mesh, fsdp_min_size: int = 2**14) -> P:
    """PartitionSpec for one array by its path; unshardable dimensions stay replicated."""
    spec: list[Any] = [None] * len(shape)
    tp, fs = mesh.shape["tensor"], mesh.shape["fsdp"]
    if tp > 1 and len(shape) >= 1:
        if len(shape) == 2 and re.search(COLUMN_PARALLEL, path) and shape[1] % tp == 0:
            spec[1] = "tensor"
        elif len(shape) == 2 and re.search(ROW_PARALLEL, path) and shape[0] % tp == 0:
            spec[0] = "tensor"
        elif len(shape) == 1 and re.search(COLUMN_BIAS, path) and shape[0] % tp == 0:
            spec[0] = "tensor"
    if fs > 1 and int(np.prod(shape)) >= fsdp_min_size:
        free = [i for i in np.argsort(shape)[::-1] if spec[i] is None and shape[i] % fs == 0]
        if free:
            spec[free[0]] = "fsdp"
    return P(*spec)


def tree_shardings(tree, mesh: Mesh, fsdp_min_size: int = 2**14):
    """NamedShardings for a pytree of arrays or ShapeDtypeStructs (params or optimizer state)."""

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, param_spec(path_str(path), shape, mesh, fsdp_min_size))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
    """Batch rows split over the data axes; ``leading_axes`` unsplit axes first (microbatches)."""
    return NamedSharding(mesh, P(*([None] * leading_axes), BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]
