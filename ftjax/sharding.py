"""Device mesh and partition rules for Hugging Face Flax parameters (which carry no axis names).

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with sharded parameters and
optimizer state) and ``tensor`` (Megatron-style tensor parallelism). The batch is split over
``("data", "fsdp")``. Parameters are placed by their path strings
(``bert/encoder/layer/0/attention/self/query/kernel``): the first partition rule
``[regex, spec]`` that matches gives the tensor-parallel spec, then FSDP shards the largest
remaining dimension of every big array. Rules are data (``mesh.rules`` in the config, default
``DEFAULT_TP_RULES``), so a new architecture needs no code.
"""

from __future__ import annotations

import logging
import re
import typing
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ftjax.config import MeshAxis, MeshConfig
from ftjax.errors import FtjaxError

AXES = typing.get_args(MeshAxis)  # ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# [regex over the path, mesh axis or None per dimension]; the first rule that matches (and has one
# entry per dimension of the array) wins. Column-parallel kernels [in, out] split their output
# features, and their biases with them; row-parallel kernels split their input features.
# Covers BERT/RoBERTa/ELECTRA/ALBERT, DistilBERT, GPT-2/Neo, Llama/Gemma/Mistral, BART/Pegasus, T5.
_COLUMN = (r"(attention/self/(query|key|value)|q_lin|k_lin|v_lin|q_proj|k_proj|v_proj|"
           r"gate_proj|up_proj|intermediate/dense|lin1|c_fc|c_attn|fc1|/wi(_0|_1)?|/(q|k|v))")
_ROW = (r"(attention/output/dense|out_lin|o_proj|down_proj|out_proj|(?<!attention/)output/dense|"
        r"lin2|c_proj|fc2|/wo|/o)")
# Vocabulary-parallel: the token embedding [vocab, hidden] split over its rows, a separate output
# layer [hidden, vocab] over its columns (XLA adds the collectives of the lookup and of the loss).
_EMBEDDING = r"(word_embeddings|embed_tokens|wte|shared)/embedding$"
DEFAULT_TP_RULES: list = [
    [_COLUMN + "/kernel$", [None, "tensor"]],
    [_ROW + "/kernel$", ["tensor", None]],
    [_COLUMN + "/bias$", ["tensor"]],
    [_EMBEDDING, ["tensor", None]],
    [r"lm_head/kernel$", [None, "tensor"]],
]


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


def param_spec(path: str, shape: tuple, mesh: Mesh, fsdp_min_size: int = 2**14,
               rules: Optional[Sequence] = None) -> P:
    """PartitionSpec for one array by its path and the first matching rule (None or []:
    ``DEFAULT_TP_RULES``); an axis of size 1 or one that does not divide its dimension is dropped."""
    spec: list[Any] = [None] * len(shape)
    for pattern, axes in rules or DEFAULT_TP_RULES:
        if len(axes) == len(shape) and re.search(pattern, path):
            spec = [a if a and mesh.shape[a] > 1 and n % mesh.shape[a] == 0 else None for a, n in zip(axes, shape)]
            break
    fs = mesh.shape["fsdp"]
    if fs > 1 and "fsdp" not in spec and int(np.prod(shape)) >= fsdp_min_size:
        free = [i for i in np.argsort(shape)[::-1] if spec[i] is None and shape[i] % fs == 0]
        if free:
            spec[free[0]] = "fsdp"
    return P(*spec)


def tree_shardings(tree, mesh: Mesh, fsdp_min_size: int = 2**14, rules: Optional[Sequence] = None):
    """NamedShardings for a pytree of arrays or ShapeDtypeStructs (params or optimizer state)."""

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, param_spec(path_str(path), shape, mesh, fsdp_min_size, rules))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
    """Batch rows split over the data axes; ``leading_axes`` unsplit axes first (microbatches)."""
    return NamedSharding(mesh, P(*([None] * leading_axes), BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def bytes_per_device(tree, shardings=None) -> int:
    """Bytes one device holds of a pytree of arrays or ShapeDtypeStructs laid out as ``shardings``
    (default: each leaf's own ``.sharding``): the largest device's sum of shard sizes."""
    shardings = shardings if shardings is not None else jax.tree.map(lambda x: x.sharding, tree)
    total: dict = {}
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        shard = int(np.prod(sharding.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
        for device in sharding.device_set:
            total[device] = total.get(device, 0) + shard
    return max(total.values(), default=0)
