"""ftjax sweep: grids run with the one Trainer (resumable), vectorized grids equal to single runs."""

import csv
import json

import numpy as np
import pytest

from conftest import tiny_overrides
from ftjax import cli, sweep
from ftjax.config import load_config
from ftjax.errors import FtjaxError
from ftjax.trainer import Trainer

SHORT = {"training.max_steps": 6, "training.eval_strategy": "no", "training.save_strategy": "no",
         "training.num_train_epochs": 1}


def test_parse_grid_and_names():
    grid = sweep.parse_grid(["training.learning_rate=[1e-5, 3e-5]", "training.warmup_ratio=0.1"], "42,43")
    assert grid == {"training.learning_rate": [1e-5, 3e-5], "training.warmup_ratio": [0.1], "training.seed": [42, 43]}
    combos = sweep.combinations(grid)
    assert len(combos) == 4
    assert sweep.run_name(combos[0], sweep.short_names(list(grid))) == "learning_rate=1e-05_warmup_ratio=0.1_seed=42"
    with pytest.raises(FtjaxError, match="--seeds"):
        sweep.parse_grid([], "42,x")


def test_best_is_the_mean_over_seeds():
    runs = [{"values": {"a": a, "training.seed": s}, "metrics": {"m": m}}
            for a, s, m in [(1, 0, 0.9), (1, 1, 0.1), (2, 0, 0.6), (2, 1, 0.6)]]
    best = sweep.best_configuration(runs, ["a", "training.seed"], "m")
    assert best["values"] == {"a": 2} and best["mean"] == pytest.approx(0.6) and best["n"] == 2
    assert sweep.best_configuration(runs, ["a", "training.seed"], "validation.loss") is None  # not recorded
    assert sweep.aggregate(runs, ["a"], "m")[(1,)]["std"] == pytest.approx(0.4)


def test_sweep_cli_writes_table_heatmap_best_and_skips_finished_runs(tiny_model, sentiment_csv, tmp_path, capsys):
    base = tiny_overrides(tiny_model, sentiment_csv, tmp_path / "base", **SHORT)
    out = tmp_path / "sweep"
    argv = ["sweep", str(_config_file(tmp_path, base)), "--grid", "training.learning_rate=[1e-3,3e-3]",
            "--seeds", "1,2", "--metric", "accuracy", "--output-dir", str(out)]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "[4/4 done, 0 left]" in err and "best so far" in err
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert len(rows) == 4 and {r["training.learning_rate"] for r in rows} == {"0.001", "0.003"}
    assert all(0 <= float(r["validation.accuracy"]) <= 1 for r in rows)
    summary = json.loads((out / "sweep.json").read_text())
    means = {lr: np.mean([r["metrics"]["validation.accuracy"] for r in summary["runs"]
                          if r["values"]["training.learning_rate"] == lr]) for lr in (1e-3, 3e-3)}
    assert summary["best"]["mean"] == pytest.approx(max(means.values()))
    assert summary["best"]["values"]["training.learning_rate"] == max(means, key=means.get)
    assert (out / "heatmap.png").stat().st_size > 5000
    assert (out / "runs" / "learning_rate=0.001_seed=1" / "results.json").is_file()
    # a re-run trains nothing: every run is finished
    assert cli.main(argv) == 0
    again = json.loads((out / "sweep.json").read_text())
    assert {r["status"] for r in again["runs"]} == {"finished earlier"}
    assert [r["metrics"] for r in again["runs"]] == [r["metrics"] for r in summary["runs"]]
    # ftjax compare on the sweep's runs: labelled by what differs, numbers from each results.json
    dirs = sorted(str(p) for p in (out / "runs").iterdir())
    assert cli.main(["compare", *dirs, "--output", str(tmp_path / "cmp")]) == 0
    table = capsys.readouterr().out
    assert "learning_rate=0.001, seed=1" in table and "f1_macro" in table
    rows = list(csv.DictReader(open(tmp_path / "cmp" / "compare.csv")))
    for row in rows:
        test = json.loads((open(f"{row['dir']}/results.json")).read())["test"]
        assert float(row["accuracy"]) == pytest.approx(test["accuracy"])
        assert float(row["recall_macro"]) == pytest.approx(test["recall_macro"])
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 5000


def test_vectorized_runs_equal_single_runs(tiny_model, sentiment_csv, tmp_path):
    """Two learning rates x two seeds (a fresh classifier head per seed, dropout on) in one compile;
    each run's metrics and parameters equal its config trained alone by the Trainer."""
    base = tiny_overrides(tiny_model, sentiment_csv, tmp_path / "base", **SHORT, **{"training.weight_decay": 0.01})
    grid = {"training.learning_rate": [1e-3, 5e-3], "training.seed": [3, 4]}
    summary = sweep.run_sweep(None, grid, base, str(tmp_path / "vec"), "validation.loss", vectorize=True)
    assert [r["status"] for r in summary["runs"]] == ["trained (vectorized)"] * 4
    results = [json.loads((tmp_path / "vec" / "runs" / r["run"] / "results.json").read_text())
               for r in summary["runs"]]
    assert all(r["train"]["compiles"]["train_step"] <= 2 for r in results)  # one per bucket length, all runs
    losses = {r["run"]: r["metrics"]["validation.loss"] for r in summary["runs"]}
    assert len({round(v, 6) for v in losses.values()}) == 4  # the runs really differ
    for pick in (3,):  # lr 5e-3, seed 4: neither is the base run's
        run = summary["runs"][pick]
        cfg = json.loads((tmp_path / "vec" / "runs" / run["run"] / "config.json").read_text())
        assert cfg["data"]["seed"] == 3  # the shared data order is recorded
        alone = Trainer(load_config(None, [*base, *sweep.overrides(run["values"]), "data.seed=3",
                                           f"training.output_dir={tmp_path / ('alone' + str(pick))}"]))
        res = alone.train()
        assert res["validation"]["loss"] == pytest.approx(run["metrics"]["validation.loss"], rel=1e-5)
        assert res["validation"]["accuracy"] == run["metrics"]["validation.accuracy"]
        assert res["train"]["train_loss"] == pytest.approx(results[pick]["train"]["train_loss"], rel=1e-5)


def test_vectorize_refuses_a_shape_changing_key(tiny_model, sentiment_csv, tmp_path, capsys):
    argv = ["sweep", str(_config_file(tmp_path, tiny_overrides(tiny_model, sentiment_csv, tmp_path / "b", **SHORT))),
            "--grid", "training.per_device_train_batch_size=[4,8]", "--vectorize", "--output-dir", str(tmp_path / "s")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "per_device_train_batch_size' changes array shapes" in err[0]
    assert not (tmp_path / "s").exists()


def _config_file(tmp_path, overrides):
    """The overrides as a YAML config file (the CLI takes a file)."""
    import yaml
    from ftjax.config import apply_overrides
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(apply_overrides({}, overrides)))
    return path


def test_dropout_rates_split_a_vectorized_grid_into_compile_groups():
    """A model dropout rate is a Python constant of the Flax modules: one group (compile) per value."""
    from ftjax.vectorized import check_vectorizable, groups
    grid = {"model.config_overrides.hidden_dropout_prob": [0.0, 0.1], "training.learning_rate": [1e-3, 2e-3]}
    combos = sweep.combinations(grid)
    configs = [load_config(None, sweep.overrides(v)) for v in combos]
    check_vectorizable(grid)
    assert groups(configs, grid) == [[0, 1], [2, 3]]
    assert groups(configs, {"training.learning_rate": None}) == [[0, 1, 2, 3]]
    with pytest.raises(FtjaxError, match="'model.max_length' changes array shapes"):
        check_vectorizable(["training.seed", "model.max_length"])
