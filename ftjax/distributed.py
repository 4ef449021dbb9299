"""JAX's multi-controller runtime: one process per host, started the way the cluster asks."""

from __future__ import annotations

import logging
import os
import sys
import traceback

import jax


def maybe_initialize() -> None:
    """Calls ``jax.distributed.initialize`` when the environment asks for many processes.

    - ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID``: explicit (any cluster,
      or several processes on one machine);
    - ``FTJAX_DISTRIBUTED=auto``: let JAX detect the cluster (TPU pods, SLURM, ...).
    CPU processes talk through gloo collectives.
    """
    if jax.distributed.is_initialized():
        return
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or os.environ.get("FTJAX_CPU_COLLECTIVES"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if address:
        jax.distributed.initialize(
            coordinator_address=address, num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
            local_device_ids=None)
    elif os.environ.get("FTJAX_DISTRIBUTED") == "auto":
        jax.distributed.initialize()


def sync(name: str) -> None:
    """Every process waits here until all have arrived (nothing to do with one process). Used
    after work that one process does for all (clearing a folder, writing the export), so that the
    others neither run ahead of it nor wait for it at JAX's shutdown barrier, which gives up (and
    aborts every process) after 5 minutes: longer than exporting a large model may take."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def leave_now_on_failure(code: int, print_traceback: bool = False) -> None:
    """Ends this process at once with ``code`` when it is one of several (nothing to do with one).

    A failed process that exits normally waits at JAX's shutdown barrier for the others, which
    wait for it in their next collective: every process hangs for the barrier's 5 minutes, then
    aborts. Leaving at once makes the others fail within seconds instead (their collective loses
    its peer, or the coordination service on process 0 goes). Called from an ``except`` block;
    ``print_traceback`` prints the exception being handled, which the normal exit would have."""
    if jax.distributed.is_initialized() and jax.process_count() > 1:
        if print_traceback:
            traceback.print_exc()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
