"""Helpers shared by the side-by-side benchmarks: child processes with their peak RSS, machine info
(with the load average: this machine is shared), runs alternated between the two sides, medians
with their spread, a printed table and a JSON record under benchmarks/results/.

Every side-by-side benchmark writes a ``summary`` list into its JSON (``side_by_side``);
``benchmarks/summary.py`` gathers them into one table (benchmarks/results/summary.json)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def measured(argv: list[str], env: dict | None = None) -> tuple[str, float, float]:
    """Runs ``argv`` under a tiny wrapper that reports the child's own peak RSS (MB) on stderr's last
    line, so several children in one benchmark are measured independently. JAX's persistent
    compilation cache is off unless ``env`` names a ``JAX_COMPILATION_CACHE_DIR``: every run
    compiles, as the first run of a new config does."""
    wrapper = ("import os, resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
               "print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
               "file=sys.stderr); sys.exit(p.returncode)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               JAX_COMPILATION_CACHE_DIR="", **(env or {}))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"benchmark child failed: {' '.join(argv[:4])} ...")
    peak = float(proc.stderr.strip().splitlines()[-1].split()[-1])
    return proc.stdout, peak, wall


def timed(fn, iters: int) -> float:
    """Median seconds of ``fn()`` over ``iters`` calls after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> dict:
    import jax
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "jax_backend": jax.default_backend(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
            time.gmtime()), "loadavg_1_5_15": os.getloadavg(),
            "note": os.environ.get("FTJAX_BENCH_NOTE", "")}  # e.g. what else ran on the machine
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


# ---------------------------------------------------------------- repeated, alternating runs


def alternate(sides: dict[str, Callable[[int], dict]], repeats: int) -> dict[str, list[dict]]:
    """Runs every side ``repeats`` times, interleaved (A B, B A, A B, ...: the side that goes first
    alternates too), so a change in the machine's load touches both sides alike. ``sides[name](i)``
    runs repeat ``i`` and returns its measurements; each result gets ``repeat`` and the load average."""
    names = list(sides)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for i in range(repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            load = os.getloadavg()[0]
            result = sides[name](i)
            runs[name].append({**result, "repeat": i, "loadavg_1min": load})
            print(f"[{name} #{i}] {json.dumps(result)}", file=sys.stderr, flush=True)
    return runs


def spread(values: list[float]) -> dict:
    """Median, minimum and maximum of repeated measurements (and the values themselves)."""
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def side_by_side(task: str, runs: dict[str, list[dict]], throughput: str, unit: str, quality: list[str],
                 reference: str = "PyTorch Trainer", candidate: str = "ftjax") -> dict:
    """One summary record: median and spread of ``throughput``, each ``quality`` key and peak RSS per
    side, and the ratios candidate / reference paired by repeat (median and range)."""
    ref, cand = runs[reference], runs[candidate]
    record = {"task": task, "unit": unit, "throughput_key": throughput, "repeats": min(len(ref), len(cand))}
    for key in [throughput, *quality, "peak_rss_mb"]:
        if all(key in r for r in ref + cand):
            record[key] = {reference: spread([r[key] for r in ref]), candidate: spread([r[key] for r in cand])}
    pairs = list(zip(ref, cand))
    record["throughput_ratio"] = spread([c[throughput] / r[throughput] for r, c in pairs])
    record["peak_rss_ratio"] = spread([c["peak_rss_mb"] / r["peak_rss_mb"] for r, c in pairs])
    for key in quality:
        if all(key in r for r in ref + cand):
            record[f"{key}_points_diff"] = spread([100 * (c[key] - r[key]) for r, c in pairs])
    record["loadavg_1min"] = spread([r["loadavg_1min"] for r in ref + cand])
    return record


def spread_text(s: dict | None, digits: int = 3) -> str:
    """``median [min-max]`` for a table cell."""
    if not s:
        return ""
    f = lambda v: f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"  # noqa: E731
    return f"{f(s['median'])} [{f(s['min'])}-{f(s['max'])}]" if s["n"] > 1 else f(s["median"])


def summary_table(records: list[dict], reference: str = "PyTorch Trainer", candidate: str = "ftjax") -> str:
    """The README table: one line per side-by-side record."""
    rows = []
    for r in records:
        t = r[r["throughput_key"]]
        quality = [k for k in r if k.endswith("_points_diff")]
        rows.append({"task": r["task"], "unit": r["unit"], "n": r["repeats"],
                     reference: spread_text(t[reference]), candidate: spread_text(t[candidate]),
                     "ratio": spread_text(r["throughput_ratio"]),
                     "quality (points, ftjax - ref)": "; ".join(
                         f"{k[:-len('_points_diff')]} {spread_text(r[k], 2)}" for k in quality),
                     "peak RSS ratio": spread_text(r["peak_rss_ratio"]),
                     "load (1 min)": spread_text(r["loadavg_1min"], 2)})
    return table(rows, list(rows[0])) if rows else "(no records)"


def overrides(text: str) -> list[str]:
    """``--ftjax-args "data.packing=true training.x=1"`` as a list of ``key=value`` overrides."""
    return shlex.split(text or "")
