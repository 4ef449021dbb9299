"""Corpora larger than memory: peak RSS and preparation time of MLM training against corpus size.

    python benchmarks/data_scale.py                         # 4, 40, 200 MB (and --sizes-mb 1000)
    python benchmarks/data_scale.py --before PATH           # also a checkout of the old code

Each corpus is built from the offline assets (the gensim Wikipedia sample and Lee news texts,
repeated with varied document ids) as one document a line. For each size, `ftjax train
configs/mlm-minilm-lee.yaml` runs a few steps (evaluation bounded) in a child process, twice: with
an empty cache (first run: loading, tokenization and packing) and again with the cache of the first
(the tokenized / packed Arrow files are reused). Printed and written to
benchmarks/results/data_scale.json: peak RSS, data preparation time, tokenization tokens/s and
training tokens/s. ``--before`` runs the first-run measurement with another checkout of ftjax on
PYTHONPATH (e.g. the commit before Arrow-backed batching) for the side-by-side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, measured, save, table  # noqa: E402

CONFIG = str(ROOT / "configs" / "mlm-minilm-lee.yaml")
WIKI = "pkg://gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE = "pkg://gensim/test/test_data/lee_background.cor"
STEPS, BATCH, BLOCK = 4, 16, 128


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


def run(corpus: Path, out: Path, cache: Path, pythonpath: str | None = None) -> dict:
    overrides = [f"data.train_file={corpus}", f"training.output_dir={out}", "training.overwrite_output_dir=true",
                 f"training.max_steps={STEPS}", f"training.per_device_train_batch_size={BATCH}",
                 f"task_options.block_size={BLOCK}", "training.eval_strategy=no", "training.save_strategy=no",
                 "data.max_eval_samples=50", "training.export_pytorch=false", "training.disable_tqdm=true",
                 "training.report_to=[jsonl]", f"data.cache_dir={cache}", "mesh.data=1"]
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "HF_DATASETS_CACHE": str(cache / "hf")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
        overrides = [o.replace("task_options.block_size", "data.block_size") for o in overrides
                     if not o.startswith("data.cache_dir")]
    config = str(Path(pythonpath) / "configs" / "mlm-minilm-lee.yaml") if pythonpath else CONFIG
    # The other checkout's ftjax, not the editable install's (whose finder would win over PYTHONPATH).
    launcher = ("import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
                f"repr(f).lower()]; sys.path.insert(0, {str(pythonpath or ROOT)!r}); "
                "runpy.run_module('ftjax.cli', run_name='__main__')")
    _, peak, wall = measured([sys.executable, "-c", launcher, "train", config, *overrides], env=env)
    results = json.loads((out / "results.json").read_text())["train"]
    return {"peak_rss_mb": peak, "wall_s": wall, "data_preparation_s": results.get("data_preparation_s"),
            "train_tokens_per_s": results["train_examples_per_second"] * BLOCK}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[4, 40, 200])
    p.add_argument("--before", help="another ftjax checkout to measure the same first run with")
    p.add_argument("--before-max-mb", type=float, default=200, help="largest corpus for --before (memory)")
    args = p.parse_args()
    docs = documents()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for mb in args.sizes_mb:
            corpus = tmp / f"corpus-{mb:g}mb.txt"
            n_docs = write_corpus(corpus, mb, docs)
            cache = tmp / f"cache-{mb:g}"
            first = run(corpus, tmp / "out", cache)
            again = run(corpus, tmp / "out", cache)
            row = {"corpus_mb": mb, "documents": n_docs, "peak_rss_mb": first["peak_rss_mb"],
                   "cached_peak_rss_mb": again["peak_rss_mb"], "prep_s": first["data_preparation_s"],
                   "cached_prep_s": again["data_preparation_s"],
                   "tokenize_mb_per_s": mb / first["data_preparation_s"],
                   "train_tokens_per_s": first["train_tokens_per_s"]}
            if args.before and mb <= args.before_max_mb:
                before = run(corpus, tmp / "out-before", tmp / f"cache-before-{mb:g}", pythonpath=args.before)
                row.update(before_peak_rss_mb=before["peak_rss_mb"], before_prep_s=before["data_preparation_s"],
                           before_train_tokens_per_s=before["train_tokens_per_s"])
            rows.append(row)
            print(json.dumps(row), flush=True)
            for path in cache.glob("**/*"):  # keep the disk small between sizes
                if path.is_file():
                    path.unlink()
            os.remove(corpus)
    columns = ["corpus_mb", "documents", "peak_rss_mb", "before_peak_rss_mb", "prep_s", "cached_prep_s",
               "before_prep_s", "tokenize_mb_per_s", "train_tokens_per_s", "before_train_tokens_per_s"]
    print(table(rows, columns))
    path = save("data_scale", {"machine": machine(), "steps": STEPS, "batch": BATCH, "block": BLOCK,
                               "rows": rows, "command": " ".join(sys.argv)})
    print(f"written {path}")


if __name__ == "__main__":
    main()
