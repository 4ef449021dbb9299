"""``ftjax compare RUN_DIR ...``: metrics of finished runs side by side, labelled by what differs.

Reads each run's ``results.json`` and ``config.json`` (any ftjax run: ``ftjax train``, a sweep's
``runs/*``), labels every run by the config values that differ between the runs (or by ``--by``
keys), and writes a table (stdout and ``compare.csv``) and a grouped bar chart (``compare.png``):
one group per metric, one bar per run. NER runs also get the F1 (or the chosen metric) per entity
type (``compare_per_type.csv`` and a second panel). Typical uses: the same recipe on several
datasets or languages (``--by data.train_file``), MLM vs CLM pre-training, the runs of a sweep.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Optional

from ftjax.errors import FtjaxError

# Metrics shown when none are asked for: the family with the most of its metrics in the results.
DEFAULT_METRICS = (("accuracy", "precision_macro", "recall_macro", "f1_macro"),  # classification
                   ("precision", "recall", "f1", "accuracy"),  # NER (seqeval, micro)
                   ("exact_match", "f1"), ("rouge1", "rouge2", "rougeL"),  # QA, seq2seq
                   ("loss", "perplexity", "accuracy"))  # language modelling
# Keys that differ between any two runs without saying anything about them.
NOT_LABELS = ("training.output_dir", "training.overwrite_output_dir", "training.resume_from_checkpoint",
              "training.disable_tqdm", "training.report_to", "training.export_pytorch", "data.cache_dir",
              "data.preprocessing_num_workers")


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"training": {"seed": 1}}`` -> ``{"training.seed": 1}``."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def load_run(run_dir: str | Path) -> dict:
    """A finished run: its folder, results and flat config; FtjaxError when it is not finished."""
    run_dir = Path(run_dir)
    results, config = run_dir / "results.json", run_dir / "config.json"
    if not results.is_file():
        raise FtjaxError(f"{run_dir}: no results.json (not a finished ftjax run)")
    return {"dir": str(run_dir), "results": json.loads(results.read_text()),
            "config": flatten(json.loads(config.read_text())) if config.is_file() else {}}


# When many keys differ, the label shows the first MAX_LABEL_KEYS in this order of prefixes.
LABEL_ORDER = ("task", "model.name_or_path", "data.train_file", "data.dataset_name", "data.dataset_config_name",
               "training.", "data.", "model.", "task_options.", "mesh.")
MAX_LABEL_KEYS = 3


def differing_keys(runs: list[dict]) -> list[str]:
    """Config keys whose values differ between the runs, the most telling first (``LABEL_ORDER``;
    inference settings left out)."""
    keys = sorted({k for r in runs for k in r["config"]})
    keys = [k for k in keys if k not in NOT_LABELS and not k.startswith("inference.")
            and len({json.dumps(r["config"].get(k), sort_keys=True) for r in runs}) > 1]

    def rank(key: str) -> int:
        return next((i for i, p in enumerate(LABEL_ORDER) if key == p or (p.endswith(".") and key.startswith(p))),
                    len(LABEL_ORDER))
    return sorted(keys, key=lambda k: (rank(k), keys.index(k)))


def _show(value: Any) -> str:
    """A label value: file paths by their name, numbers short."""
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return Path(value).name
    if isinstance(value, float):
        return f"{value:.3g}"
    return json.dumps(value) if not isinstance(value, str) else value


def labels(runs: list[dict], by: Optional[list[str]] = None) -> list[str]:
    """One label per run from the ``by`` keys, else from the config values that differ (else the folder)."""
    keys = by or differing_keys(runs)[:MAX_LABEL_KEYS]
    for k in by or []:
        if not any(k in r["config"] for r in runs):
            raise FtjaxError(f"--by '{k}' is not a config key of these runs")
    out = [", ".join(f"{k.split('.')[-1]}={_show(r['config'].get(k))}" for k in keys) for r in runs]
    if not keys or len(set(out)) < len(out):
        out = [f"{Path(r['dir']).name}" + (f" ({o})" if o else "") for r, o in zip(runs, out)]
    return out


def pick_split(runs: list[dict], split: Optional[str]) -> str:
    if split:
        return split
    return "test" if all(isinstance(r["results"].get("test"), dict) for r in runs) else "validation"


def pick_metrics(runs: list[dict], split: str, metrics: Optional[list[str]]) -> list[str]:
    present = {k for r in runs for k, v in (r["results"].get(split) or {}).items() if isinstance(v, (int, float))}
    if metrics:
        missing = [m for m in metrics if m not in present]
        if missing:
            raise FtjaxError(f"metric '{missing[0]}' is in no run's {split} results "
                             f"(have: {', '.join(sorted(present))})")
        return metrics
    family = max(DEFAULT_METRICS, key=lambda f: sum(m in present for m in f))  # the first of the fullest
    chosen = [m for m in family if m in present]
    return chosen or sorted(present - {"num_examples"})[:4]


def compare(run_dirs: list[str], metrics: Optional[list[str]] = None, by: Optional[list[str]] = None,
            output: Optional[str] = None, split: Optional[str] = None) -> dict:
    """The comparison: rows (one per run), per-entity rows (NER), a printable table; writes
    ``compare.csv``, ``compare_per_type.csv`` (NER) and ``compare.png`` into ``output``."""
    if not run_dirs:
        raise FtjaxError("compare needs at least one run folder")
    runs = [load_run(d) for d in run_dirs]
    split = pick_split(runs, split)
    metrics = pick_metrics(runs, split, metrics)
    names = labels(runs, by)
    rows = [{"run": n, "dir": r["dir"], **{m: (r["results"].get(split) or {}).get(m) for m in metrics}}
            for n, r in zip(names, runs)]
    type_metric = "f1" if "f1" in metrics else next((m for m in metrics if m in ("precision", "recall")), "f1")
    per_type = [{"run": n, "type": t, type_metric: v.get(type_metric), "support": v.get("support")}
                for n, r in zip(names, runs)
                for t, v in sorted(((r["results"].get(split) or {}).get("per_type") or {}).items())]
    out = Path(output or ".")
    out.mkdir(parents=True, exist_ok=True)
    files = {"csv": str(out / "compare.csv"), "chart": str(out / "compare.png")}
    _write_csv(out / "compare.csv", rows, ["run", *metrics, "dir"])
    if per_type:
        files["per_type_csv"] = str(out / "compare_per_type.csv")
        _write_csv(out / "compare_per_type.csv", per_type, ["run", "type", type_metric, "support"])
    bar_chart(rows, metrics, per_type, type_metric, split, out / "compare.png")
    return {"split": split, "metrics": metrics, "rows": rows, "per_type": per_type, "files": files,
            "table": table(rows, ["run", *metrics])}


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[c for c in columns]] + [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _cell(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def bar_chart(rows, metrics, per_type, type_metric, split, path: Path) -> None:
    """Grouped bars: a group per metric (and per entity type, second panel), a bar per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [("metric", metrics, lambda run, m: run.get(m))]
    if per_type:
        types = sorted({p["type"] for p in per_type})
        lookup = {(p["run"], p["type"]): p[type_metric] for p in per_type}
        panels.append((f"entity type ({type_metric})", types, lambda run, t: lookup.get((run["run"], t))))
    width_in = max(6, 0.65 * max(len(p[1]) for p in panels) * max(len(rows), 2))
    fig, axes = plt.subplots(len(panels), 1, figsize=(width_in, 3.6 * len(panels)), squeeze=False)
    width = 0.8 / max(len(rows), 1)
    for ax, (title, groups, value) in zip(axes[:, 0], panels):
        x = np.arange(len(groups))
        for i, run in enumerate(rows):
            heights = [value(run, g) for g in groups]
            bars = ax.bar(x + (i - (len(rows) - 1) / 2) * width, [h if h is not None else 0 for h in heights],
                          width, label=run["run"])
            ax.bar_label(bars, [f"{h:.3f}" if h is not None else "" for h in heights], fontsize=6, rotation=90)
        ax.set_xticks(x, groups, rotation=20 if len(groups) > 5 else 0)
        ax.set_title(f"{split}: by {title}")
        ax.margins(y=0.2)
    axes[0, 0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
