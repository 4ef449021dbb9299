"""``ftjax.cli`` with faults for multi-process tests (tests/test_multihost.py), chosen by environment:

- ``FTJAX_TEST_SLOW_LOCK=1``: process 0 is slow to lock its output_dir, and every other process
  checks that the lock is there when it first reads the folder;
- ``FTJAX_TEST_FAIL_PROCESS=N``: process N raises a RuntimeError where the run plans its resume.

Run as a module with ``tests/`` on ``PYTHONPATH``."""

import os
import sys
import time

import jax

from ftjax import run_dir, trainer
from ftjax.cli import main

_acquire, _plan_resume = run_dir.RunLock.acquire, trainer.plan_resume


def slow_acquire(self):
    time.sleep(3)  # process 0's check_writable and lock, slowed: the others must wait for them
    return _acquire(self)


def checked_plan_resume(args, output_dir, is_main):
    if os.environ.get("FTJAX_TEST_SLOW_LOCK") and not is_main and not (output_dir / run_dir.LOCK_NAME).is_file():
        raise AssertionError("this process read output_dir before process 0 had locked it")
    if os.environ.get("FTJAX_TEST_FAIL_PROCESS") == str(jax.process_index()):
        raise RuntimeError(f"a fault injected into process {jax.process_index()}")
    return _plan_resume(args, output_dir, is_main)


if os.environ.get("FTJAX_TEST_SLOW_LOCK"):
    run_dir.RunLock.acquire = slow_acquire
trainer.plan_resume = checked_plan_resume

if __name__ == "__main__":
    sys.exit(main())
