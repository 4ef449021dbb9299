"""Helpers shared by the side-by-side benchmarks: child processes with their peak RSS, machine info,
a printed table and a JSON record under benchmarks/results/."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def measured(argv: list[str], env: dict | None = None) -> tuple[str, float, float]:
    """Runs ``argv`` under a tiny wrapper that reports the child's own peak RSS (MB) on stderr's last
    line, so several children in one benchmark are measured independently."""
    wrapper = ("import os, resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
               "print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
               "file=sys.stderr); sys.exit(p.returncode)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               **(env or {}))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"benchmark child failed: {' '.join(argv[:4])} ...")
    peak = float(proc.stderr.strip().splitlines()[-1].split()[-1])
    return proc.stdout, peak, wall


def machine() -> dict:
    import jax
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "jax_backend": jax.default_backend(), "date": time.strftime("%Y-%m-%d")}
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] +
                     [line([_fmt(r.get(c)) for c in columns]) for r in rows])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def save(name: str, record: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2))
    return path
