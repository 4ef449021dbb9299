"""``ftjax.cli`` with process 0 slow to lock its output_dir, and every other process checking that
the lock is there when it first reads the folder (tests/test_multihost.py). Run as a module with
``tests/`` on ``PYTHONPATH``."""

import sys
import time

from ftjax import run_dir, trainer
from ftjax.cli import main

_acquire, _plan_resume = run_dir.RunLock.acquire, trainer.plan_resume


def slow_acquire(self):
    time.sleep(3)  # process 0's check_writable and lock, slowed: the others must wait for them
    return _acquire(self)


def checked_plan_resume(args, output_dir, is_main):
    if not is_main and not (output_dir / run_dir.LOCK_NAME).is_file():
        raise AssertionError("this process read output_dir before process 0 had locked it")
    return _plan_resume(args, output_dir, is_main)


run_dir.RunLock.acquire = slow_acquire
trainer.plan_resume = checked_plan_resume

if __name__ == "__main__":
    sys.exit(main())
