"""Host <-> device transfer: global arrays from per-process numpy batches, background prefetch."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding


def to_device(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """One global array per field, assembled from every process's rows of the batch."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
    """A numpy copy of a (possibly many-process) global array."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def prefetch(items: Iterable, transform: Callable, size: int = 2) -> Iterator:
    """Runs ``transform`` (batch building + transfer) on a background thread, ``size`` items ahead,
    so the accelerator never waits on the host. Exceptions reach the consumer."""
    q: queue.Queue = queue.Queue(maxsize=size)
    done = object()
    stop = threading.Event()

    def worker():
        try:
            for item in items:
                if stop.is_set():
                    return
                q.put(transform(item))
        except BaseException as e:  # noqa: BLE001  (re-raised in the consumer)
            q.put(e)
        q.put(done)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a worker waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.01)
