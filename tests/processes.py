"""``ftjax`` run as child processes, the way users start it on a cluster: one process per host.

Each child writes stdout and stderr to files, never to pipes: a pipe that nobody reads fills up and
stalls its writer, and with it every other process at the next collective (or at JAX's shutdown
barrier, which then aborts all of them after 5 minutes). ``PYTHONFAULTHANDLER`` makes a fatal abort
print every Python thread's stack, so a hang that ends in one says where each process was."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Child:
    proc: subprocess.Popen
    stdout_path: Path
    stderr_path: Path

    @property
    def returncode(self):
        return self.proc.returncode

    @property
    def out(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def poll(self):
        return self.proc.poll()

    def send_signal(self, sig) -> None:
        self.proc.send_signal(sig)


def cli_env(devices: int = 1, **extra) -> dict:
    """The test's environment for a CPU child with ``devices`` simulated devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONFAULTHANDLER="1", PYTHONUNBUFFERED="1")
    env.pop("FTJAX_FAULT", None)
    return dict(env, **extra)


def start(args: list[str], env: dict, logs: Path, name: str, module: str = "ftjax.cli") -> Child:
    """``python -m <module> *args`` with its outputs in ``logs/<name>.out`` and ``.err``."""
    logs.mkdir(parents=True, exist_ok=True)
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], env=env, stdout=o, stderr=e)
    return Child(proc, out, err)


def start_processes(n: int, args: list[str], env: dict, logs: Path, module: str = "ftjax.cli") -> list[Child]:
    """``n`` processes of one multi-controller run (a fresh coordinator port); one process alone
    runs without the distributed runtime."""
    if n > 1:
        env = dict(env, JAX_COORDINATOR_ADDRESS=f"localhost:{free_port()}", JAX_NUM_PROCESSES=str(n))
    return [start(args, dict(env, JAX_PROCESS_ID=str(i)), logs, f"process{i}", module) for i in range(n)]


def wait_all(children: list[Child], timeout: float) -> list[Child]:
    """Waits for every child; past ``timeout`` seconds kills those left and fails with their logs."""
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            for c in children:
                if c.poll() is None:
                    c.proc.kill()
                    c.proc.wait()
            raise AssertionError(f"still running after {timeout:.0f}s:\n{tails(children)}") from None
    return children


_FATAL = re.compile(r"^([EF]\d{4} |Fatal Python error|\w*(Error|Exception): )")


def report(err: str, chars: int = 2500) -> str:
    """One child's stderr for a failure message: its error lines (absl ``E``/``F`` lines, Python's
    fatal error and exceptions) wherever they are, then its end without the faulthandler's list of
    extension modules, a line long enough to push everything else out of the tail."""
    lines = [line for line in err.splitlines() if not line.startswith("Extension modules:")]
    errors = [line[:500] for line in lines if _FATAL.match(line)]
    return "\n".join(["errors:", *errors[-20:], "end:", "\n".join(lines)[-chars:]])


def tails(children: list[Child], chars: int = 2500) -> str:
    """The report of every child's stderr, one after the other (a collective failure shows on one
    process, its cause often on another)."""
    return "\n".join(f"--- {c.stderr_path.stem} (exit {c.returncode}):\n{report(c.err, chars)}" for c in children)


def run_processes(n: int, args: list[str], env: dict, logs: Path, timeout: float = 600) -> list[Child]:
    """Starts ``n`` processes, waits for all and asserts that each exited 0."""
    children = wait_all(start_processes(n, args, env, logs), timeout)
    assert all(c.returncode == 0 for c in children), tails(children)
    return children
