"""The benchmark harness's statistics: alternation order, medians with spread, paired ratios."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from common import alternate, side_by_side, spread, summary_table  # noqa: E402


def test_alternate_interleaves_and_swaps_the_first_side():
    order = []
    sides = {name: (lambda i, name=name: order.append((name, i)) or {"x": i}) for name in ("ref", "new")}
    runs = alternate(sides, 3)
    assert order == [("ref", 0), ("new", 0), ("new", 1), ("ref", 1), ("ref", 2), ("new", 2)]
    assert [r["repeat"] for r in runs["new"]] == [0, 1, 2] and "loadavg_1min" in runs["ref"][0]


def test_spread_and_paired_ratios():
    assert spread([3, 1, 2]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3, "values": [3.0, 1.0, 2.0]}
    runs = {"PyTorch Trainer": [{"tput": t, "acc": 0.5, "peak_rss_mb": 100.0, "loadavg_1min": 1.0} for t in (10, 20, 40)],
            "ftjax": [{"tput": t, "acc": 0.52, "peak_rss_mb": 150.0, "loadavg_1min": 2.0} for t in (12, 20, 20)]}
    r = side_by_side("demo", runs, "tput", "ex/s", ["acc"])
    # paired by repeat (1.2, 1.0, 0.5), not the ratio of medians (20 / 20)
    assert r["throughput_ratio"]["median"] == 1.0 and r["throughput_ratio"]["min"] == 0.5
    assert r["peak_rss_ratio"]["median"] == 1.5
    assert abs(r["acc_points_diff"]["median"] - 2.0) < 1e-9
    text = summary_table([r])
    assert "demo" in text and "1 [0.5-1.2]" in text
