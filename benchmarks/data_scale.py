"""Corpora larger than memory: peak RSS and preparation time of MLM training against corpus size.

    python benchmarks/data_scale.py                         # 4, 40, 200 MB (and --sizes-mb 1000)
    python benchmarks/data_scale.py --before PATH           # also a checkout of the old code
    python benchmarks/data_scale.py --streaming --repeats 3 # + data.streaming runs, tokens/s medians

Each corpus is built from the offline assets (the gensim Wikipedia sample and Lee news texts,
repeated with varied document ids) as one document a line. For each size, `ftjax train
configs/mlm-minilm-lee.yaml` runs a few steps (evaluation bounded) in a child process, twice: with
an empty cache (first run: loading, tokenization and packing) and again with the cache of the first
(the tokenized / packed Arrow files are reused). Printed and written to
benchmarks/results/data_scale.json: peak RSS, data preparation time, tokenization tokens/s and
training tokens/s. ``--before`` runs the first-run measurement with another checkout of ftjax on
PYTHONPATH (e.g. the commit before Arrow-backed batching) for the side-by-side. ``--streaming`` adds a
``data.streaming: true`` run per size (peak RSS, time to first step, training tokens/s).
``--repeats N`` repeats the training runs (cached Arrow / before / streaming, alternating) N times on
corpora up to ``--repeat-max-mb`` and reports the median training tokens/s with its spread.
Training tokens/s are counted after the first step (which holds the compilation), from the run's
log (one line a step). ``--num-proc`` sets ``data.preprocessing_num_workers`` for tokenization and
packing.
``--timeout-s`` gives up a run that takes longer (the row says so). The load average of the machine
is recorded with every row: on a shared machine the tokens/s columns move with the other jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, save, table  # noqa: E402

CONFIG = str(ROOT / "configs" / "mlm-minilm-lee.yaml")
WIKI = "pkg://gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE = "pkg://gensim/test/test_data/lee_background.cor"
STEPS, BATCH, BLOCK = 12, 16, 128


def documents() -> list[str]:
    from ftjax.data.corpora import read_wiki_dump
    from ftjax.paths import resolve_path
    docs = [" ".join(t.split()) for t in read_wiki_dump(resolve_path(WIKI))["text"]]
    docs += open(resolve_path(LEE), encoding="latin-1").read().splitlines()
    return [d for d in docs if d.strip()]


def write_corpus(path: Path, megabytes: float, docs: list[str]) -> int:
    """One document a line, ``megabytes`` of text; copies differ by a leading document number."""
    target, written, n = int(megabytes * 2**20), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            line = f"document {n}: {docs[n % len(docs)]}\n"
            f.write(line)
            written += len(line.encode())
            n += 1
    return n


class TimedOut(Exception):
    pass


def measured_run(argv: list[str], env: dict, first_step_file: Path,
                 timeout_s: float | None) -> tuple[float, float, float]:
    """Runs ``argv`` in its own process group under a wrapper that reports the child's peak RSS (MB);
    returns (peak RSS, wall seconds, seconds until ``first_step_file`` (the run's log) has a line,
    i.e. the end of the first train step). Kills the group after ``timeout_s``."""
    wrapper = ("import os, resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
               "print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
               "file=sys.stderr); sys.exit(p.returncode)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **env)
    first = {}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", wrapper, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT, start_new_session=True)

    def watch():
        while proc.poll() is None and "t" not in first:
            if first_step_file.is_file() and first_step_file.stat().st_size > 0:
                first["t"] = time.perf_counter() - start
            time.sleep(0.1)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the wrapper and its child: this benchmark's own group
        proc.communicate()
        raise TimedOut(f"gave up after {timeout_s:.0f} s") from None
    wall = time.perf_counter() - start
    watcher.join()
    if proc.returncode != 0:
        sys.stderr.write(err[-4000:])
        raise SystemExit(f"benchmark child failed: {' '.join(argv[:4])} ...")
    return float(err.strip().splitlines()[-1].split()[-1]), wall, first.get("t")


def run(corpus: Path, out: Path, cache: Path, pythonpath: str | None = None, streaming: bool = False,
        timeout_s: float | None = None, steps: int = STEPS, num_proc: int | None = None) -> dict:
    overrides = [f"data.train_file={corpus}", f"training.output_dir={out}", "training.overwrite_output_dir=true",
                 f"training.max_steps={steps}", f"training.per_device_train_batch_size={BATCH}",
                 f"task_options.block_size={BLOCK}", "training.eval_strategy=no", "training.save_strategy=no",
                 "data.max_eval_samples=50", "training.export_pytorch=false", "training.disable_tqdm=true",
                 "training.report_to=[jsonl]", "training.logging_steps=1", f"data.cache_dir={cache}", "mesh.data=1"]
    if streaming:
        overrides.append("data.streaming=true")
    elif num_proc:
        overrides.append(f"data.preprocessing_num_workers={num_proc}")
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "HF_DATASETS_CACHE": str(cache / "hf")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
        overrides = [o for o in overrides if not o.startswith("data.cache_dir")]
        if "task_options" not in (Path(pythonpath) / "ftjax" / "config.py").read_text():  # older than that section
            overrides = [o.replace("task_options.block_size", "data.block_size") for o in overrides]
    config = str(Path(pythonpath) / "configs" / "mlm-minilm-lee.yaml") if pythonpath else CONFIG
    # The other checkout's ftjax, not the editable install's (whose finder would win over PYTHONPATH).
    launcher = ("import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
                f"repr(f).lower()]; sys.path.insert(0, {str(pythonpath or ROOT)!r}); "
                "runpy.run_module('ftjax.cli', run_name='__main__')")
    if out.exists():
        for old in out.glob("log.jsonl"):
            old.unlink()
    peak, wall, first_step = measured_run([sys.executable, "-c", launcher, "train", config, *overrides], env,
                                          out / "log.jsonl", timeout_s)
    results = json.loads((out / "results.json").read_text())["train"]
    return {"peak_rss_mb": peak, "wall_s": wall, "first_step_s": first_step,
            "data_preparation_s": results.get("data_preparation_s"),
            "train_tokens_per_s": steady_tokens_per_s(out / "log.jsonl")}


def steady_tokens_per_s(log: Path) -> float:
    """Training tokens/s after the first step (which holds the compilation): the log's cumulative
    examples/s at every step gives each step's end time."""
    ends = {}
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if "train/examples_per_second" in record:
            ends[record["step"]] = record["step"] * BATCH / record["train/examples_per_second"]
    first, last = min(ends), max(ends)
    return (last - first) * BATCH * BLOCK / (ends[last] - ends[first])


def spread(values: list[float]) -> dict:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[4, 40, 200])
    p.add_argument("--num-proc", type=int, default=None, help="data.preprocessing_num_workers (Arrow runs)")
    p.add_argument("--before", help="another ftjax checkout to measure the same first run with")
    p.add_argument("--before-max-mb", type=float, default=200, help="largest corpus for --before (memory)")
    p.add_argument("--streaming", action="store_true", help="also a data.streaming: true run per size")
    p.add_argument("--repeats", type=int, default=1, help="alternating training runs for the tokens/s medians")
    p.add_argument("--repeat-max-mb", type=float, default=4, help="largest corpus for --repeats")
    p.add_argument("--timeout-s", type=float, default=None, help="give up a run after this many seconds")
    p.add_argument("--streaming-only-above-mb", type=float, default=None,
                   help="larger corpora get only the streaming run (the Arrow first run takes too long)")
    p.add_argument("--out", default="data_scale", help="results file name under benchmarks/results")
    p.add_argument("--steps", type=int, default=STEPS, help="training steps per run (tokens/s after the first)")
    args = p.parse_args()
    docs = documents()
    limits = {"timeout_s": args.timeout_s, "steps": args.steps}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for mb in args.sizes_mb:
            corpus = tmp / f"corpus-{mb:g}mb.txt"
            n_docs = write_corpus(corpus, mb, docs)
            cache = tmp / f"cache-{mb:g}"
            row = {"corpus_mb": mb, "documents": n_docs, "loadavg_start": os.getloadavg()}
            arrow = args.streaming_only_above_mb is None or mb <= args.streaming_only_above_mb
            try:
                if not arrow:
                    raise TimedOut("not run (--streaming-only-above-mb)")
                first = run(corpus, tmp / "out", cache, num_proc=args.num_proc, **limits)
                again = run(corpus, tmp / "out", cache, num_proc=args.num_proc, **limits)
                row.update(peak_rss_mb=first["peak_rss_mb"], cached_peak_rss_mb=again["peak_rss_mb"],
                           prep_s=first["data_preparation_s"], cached_prep_s=again["data_preparation_s"],
                           first_step_s=first["first_step_s"], cached_first_step_s=again["first_step_s"],
                           tokenize_mb_per_s=mb / first["data_preparation_s"],
                           train_tokens_per_s=again["train_tokens_per_s"])
            except TimedOut as e:
                row["arrow"] = str(e)
                again = None
            kinds = {}
            if again is not None:
                kinds["arrow"] = lambda: run(corpus, tmp / "out", cache, num_proc=args.num_proc, **limits)
            if args.before and mb <= args.before_max_mb:
                kinds["before"] = lambda: run(corpus, tmp / "out-before", tmp / f"cache-before-{mb:g}",
                                              pythonpath=args.before, **limits)
            if args.streaming:
                kinds["streaming"] = lambda: run(corpus, tmp / "out-stream", tmp / f"cache-stream-{mb:g}",
                                                 streaming=True, **limits)
            tokens = {k: [] for k in kinds}
            cached_prep = []  # every cached Arrow run's data preparation
            if again is not None:
                tokens["arrow"].append(again["train_tokens_per_s"])
                cached_prep.append(again["data_preparation_s"])
            repeats = args.repeats if mb <= args.repeat_max_mb else 1
            for i in range(repeats):  # alternating, so a change of load hits every kind alike
                for kind, fn in kinds.items():
                    if kind == "arrow" and i == 0:
                        continue  # the cached run above is the first
                    try:
                        r = fn()
                    except TimedOut as e:
                        row[kind] = str(e)
                        continue
                    tokens[kind].append(r["train_tokens_per_s"])
                    if kind == "arrow":
                        cached_prep.append(r["data_preparation_s"])
                    if i == 0 and kind == "before":
                        row.update(before_peak_rss_mb=r["peak_rss_mb"], before_prep_s=r["data_preparation_s"],
                                   before_first_step_s=r["first_step_s"])
                    if i == 0 and kind == "streaming":
                        row.update(stream_peak_rss_mb=r["peak_rss_mb"], stream_first_step_s=r["first_step_s"])
            for kind, values in tokens.items():
                if values:
                    prefix = "" if kind == "arrow" else f"{kind}_"
                    row[f"{prefix}train_tokens_per_s"] = statistics.median(values)
                    if len(values) > 1:
                        row[f"{prefix}train_tokens_per_s_spread"] = spread(values)
            if len(cached_prep) > 1:  # the median cached start against the first run's preparation
                row.update(cached_prep_s=statistics.median(cached_prep), cached_prep_s_spread=spread(cached_prep))
            if cached_prep:
                row["cached_over_first_prep"] = row["cached_prep_s"] / row["prep_s"]
            if "train_tokens_per_s_spread" in row and "before_train_tokens_per_s_spread" in row:
                pairs = [a / b for a, b in zip(tokens["arrow"], tokens["before"])]
                row["after_over_before_tokens_per_s"] = spread(pairs)
            row["loadavg_end"] = os.getloadavg()
            rows.append(row)
            print(json.dumps(row), flush=True)
            record = {"machine": {**machine(), "shared": "2-core CPU VM shared with other jobs (see loadavg)"},
                      "steps": args.steps, "num_proc": args.num_proc, "batch": BATCH, "block": BLOCK, "rows": rows, "command": " ".join(sys.argv)}
            save(args.out, record)  # after every size: a long run cut short keeps its rows
            for path in cache.glob("**/*"):  # keep the disk small between sizes
                if path.is_file():
                    path.unlink()
            os.remove(corpus)
    columns = ["corpus_mb", "documents", "peak_rss_mb", "before_peak_rss_mb", "stream_peak_rss_mb", "prep_s",
               "cached_prep_s", "before_prep_s", "first_step_s", "cached_first_step_s", "stream_first_step_s",
               "tokenize_mb_per_s", "train_tokens_per_s", "before_train_tokens_per_s", "streaming_train_tokens_per_s"]
    print(table(rows, columns))
    print(f"written {save(args.out, record)}")


if __name__ == "__main__":
    main()
