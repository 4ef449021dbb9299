"""PyTorch reference runs for side-by-side ftjax benchmarks.

Fine-tunes a Hugging Face encoder on CPU with the stock ``transformers.Trainer``
(dynamic padding, length grouping only with ``--group-by-length``, no checkpoints, no logging
integrations)
and reports throughput, memory and eval quality as one JSON line on stdout.

Two tasks share one code path:

* ``classification``: ``AutoModelForSequenceClassification`` +
  ``DataCollatorWithPadding``; eval accuracy and macro F1 (scikit-learn).
* ``ner``: ``AutoModelForTokenClassification`` +
  ``DataCollatorForTokenClassification``; labels on the first subword of each
  word (other subwords -100); eval token accuracy and entity F1 (seqeval) on
  word-level labels.

Data JSON (``--data``)::

    classification: {"train": {"text": [...], "label": [...]}, "eval": {...}}
    ner:            {"train": {"tokens": [[...]], "tags": [[...]]}, "eval": {...},
                     "label_names": ["O", "B-x", ...]}

Run each benchmark in its own process so ``peak_rss_mb`` (``ru_maxrss`` of this
process) is per run::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/torch_reference.py \\
        --model PATH --data data.json --num-labels 3 --num-train-epochs 1 \\
        --per-device-train-batch-size 16 --max-length 128

Set the environment variables before the process starts: they are read when
``transformers`` is imported. Importing this module also sets ``USE_TF=0``,
``USE_FLAX=0``, ``USE_JAX=0`` (unless already set) so transformers/datasets do not
pull JAX into the process; that only helps if transformers is not imported yet.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from typing import Any, Sequence

# Keep transformers from importing JAX/TF (installed for ftjax) into the PyTorch
# process: it would add ~115 MB to peak_rss_mb. Must precede the transformers import.
for _flag, _value in (("USE_TORCH", "1"), ("USE_TF", "0"), ("USE_FLAX", "0"), ("USE_JAX", "0")):
    os.environ.setdefault(_flag, _value)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    PrinterCallback,
    Trainer,
    TrainingArguments,
)

TASKS = ("classification", "ner")


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (Linux ``ru_maxrss`` is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def examples_processed(global_step: int, num_examples: int, batch_size: int) -> int:
    """Training examples seen after ``global_step`` optimizer steps (no drop_last,
    no gradient accumulation): full epochs plus the full batches of a partial one."""
    steps_per_epoch = -(-num_examples // batch_size)
    full_epochs, rest = divmod(global_step, steps_per_epoch)
    return full_epochs * num_examples + rest * batch_size


def _encode_texts(tokenizer, texts: Sequence[str], labels: Sequence[int], max_length: int) -> list[dict]:
    """Tokenize texts without padding (the collator pads per batch)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    return [
        {**{k: v[i] for k, v in enc.items()}, "labels": int(labels[i])}
        for i in range(len(texts))
    ]


def _encode_words(tokenizer, tokens: Sequence[Sequence[str]], tags: Sequence[Sequence[int]],
                  max_length: int) -> list[dict]:
    """Tokenize pre-split words; label the first subword of each word, -100 elsewhere."""
    enc = tokenizer([list(t) for t in tokens], is_split_into_words=True,
                    truncation=True, max_length=max_length)
    features = []
    for i, word_tags in enumerate(tags):
        labels, previous = [], None
        for word_id in enc.word_ids(batch_index=i):
            labels.append(-100 if word_id is None or word_id == previous else int(word_tags[word_id]))
            previous = word_id
        features.append({**{k: v[i] for k, v in enc.items()}, "labels": labels})
    return features


def _classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy and macro F1 over examples."""
    from sklearn.metrics import accuracy_score, f1_score

    preds = logits.argmax(-1)
    return {
        "eval_accuracy": float(accuracy_score(labels, preds)),
        "eval_macro_f1": float(f1_score(labels, preds, average="macro")),
    }


def _ner_metrics(logits: np.ndarray, labels: np.ndarray, label_names: Sequence[str]) -> dict:
    """Word-level token accuracy and seqeval entity F1 (positions with label != -100)."""
    from seqeval.metrics import accuracy_score, f1_score

    preds = logits.argmax(-1)
    y_true, y_pred = [], []
    for p_row, l_row in zip(preds, labels):
        keep = l_row != -100
        y_true.append([label_names[i] for i in l_row[keep]])
        y_pred.append([label_names[i] for i in p_row[keep]])
    return {
        "eval_accuracy": float(accuracy_score(y_true, y_pred)),
        "eval_entity_f1": float(f1_score(y_true, y_pred)),
    }


def _fit_and_evaluate(task: str, model_path: str, train_features: list[dict], eval_features: list[dict],
                      tokenizer, model, collator, metrics_fn, *, learning_rate: float,
                      num_train_epochs: float, max_steps: int, per_device_train_batch_size: int,
                      per_device_eval_batch_size: int | None, weight_decay: float,
                      warmup_ratio: float, max_length: int, seed: int, group_by_length: bool = False) -> dict:
    """Train with ``Trainer``, time ``trainer.train()`` only, then predict on eval."""
    with tempfile.TemporaryDirectory(prefix="torch_reference_") as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            learning_rate=learning_rate,
            num_train_epochs=num_train_epochs,
            max_steps=max_steps,
            per_device_train_batch_size=per_device_train_batch_size,
            per_device_eval_batch_size=per_device_eval_batch_size or per_device_train_batch_size,
            weight_decay=weight_decay,
            warmup_ratio=warmup_ratio,
            seed=seed,
            group_by_length=group_by_length,
            save_strategy="no",
            eval_strategy="no",
            logging_strategy="no",
            report_to=[],
            disable_tqdm=True,
            log_level="warning",
            use_cpu=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=train_features,
                          data_collator=collator, processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # it print()s the final train metrics to stdout

        start = time.perf_counter()
        train_output = trainer.train()
        train_seconds = time.perf_counter() - start

        start = time.perf_counter()
        prediction = trainer.predict(eval_features)
        eval_seconds = time.perf_counter() - start

    steps = trainer.state.global_step
    n_seen = examples_processed(steps, len(train_features), per_device_train_batch_size)
    return {
        "task": task,
        "framework": "torch",
        "model": model_path,
        "train_examples": len(train_features),
        "eval_examples": len(eval_features),
        "train_steps": steps,
        "train_examples_processed": n_seen,
        "train_seconds": round(train_seconds, 4),
        "train_examples_per_s": round(n_seen / train_seconds, 3),
        "train_loss": float(train_output.training_loss),
        "eval_seconds": round(eval_seconds, 4),
        **metrics_fn(prediction.predictions, prediction.label_ids),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "num_threads": torch.get_num_threads(),
        "hparams": {
            "learning_rate": learning_rate, "num_train_epochs": num_train_epochs,
            "max_steps": max_steps, "per_device_train_batch_size": per_device_train_batch_size,
            "weight_decay": weight_decay, "warmup_ratio": warmup_ratio,
            "max_length": max_length, "seed": seed, "group_by_length": group_by_length,
        },
    }


def _setup(seed: int) -> None:
    """Use every core and seed everything before the (randomly initialised) head is built."""
    torch.set_num_threads(os.cpu_count() or 1)
    transformers.set_seed(seed)


# The hyperparameters both tasks accept (``TrainingArguments`` names) and their defaults.
DEFAULT_HPARAMS: dict[str, Any] = dict(
    learning_rate=5e-5, num_train_epochs=1.0, max_steps=-1, per_device_train_batch_size=16,
    per_device_eval_batch_size=None, weight_decay=0.0, warmup_ratio=0.0, max_length=128, seed=42,
    group_by_length=False)


def _hparams(overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = set(overrides) - set(DEFAULT_HPARAMS)
    if unknown:
        raise TypeError(f"unknown hyperparameters: {sorted(unknown)}")
    return {**DEFAULT_HPARAMS, **overrides}


def train_sequence_classifier(model_path: str, train_texts: Sequence[str], train_labels: Sequence[int],
                              eval_texts: Sequence[str], eval_labels: Sequence[int], num_labels: int,
                              **hparams: Any) -> dict[str, Any]:
    """Fine-tune ``AutoModelForSequenceClassification`` and return the result dict
    (``hparams``: the keys of ``DEFAULT_HPARAMS``)."""
    hp = _hparams(hparams)
    _setup(hp["seed"])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
    return _fit_and_evaluate(
        "classification", model_path,
        _encode_texts(tokenizer, train_texts, train_labels, hp["max_length"]),
        _encode_texts(tokenizer, eval_texts, eval_labels, hp["max_length"]),
        tokenizer, model, DataCollatorWithPadding(tokenizer), _classification_metrics, **hp)


def train_token_classifier(model_path: str, train_tokens: Sequence[Sequence[str]],
                           train_tags: Sequence[Sequence[int]], eval_tokens: Sequence[Sequence[str]],
                           eval_tags: Sequence[Sequence[int]], label_names: Sequence[str],
                           **hparams: Any) -> dict[str, Any]:
    """Fine-tune ``AutoModelForTokenClassification`` (NER) and return the result dict
    (``hparams``: the keys of ``DEFAULT_HPARAMS``)."""
    hp = _hparams(hparams)
    _setup(hp["seed"])
    label_names = list(label_names)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForTokenClassification.from_pretrained(
        model_path, num_labels=len(label_names),
        id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)},
    )
    return _fit_and_evaluate(
        "ner", model_path,
        _encode_words(tokenizer, train_tokens, train_tags, hp["max_length"]),
        _encode_words(tokenizer, eval_tokens, eval_tags, hp["max_length"]),
        tokenizer, model, DataCollatorForTokenClassification(tokenizer),
        lambda logits, labels: _ner_metrics(logits, labels, label_names), **hp)


def run_from_json(task: str, model_path: str, data_path: str, num_labels: int | None = None,
                  **hparams: Any) -> dict[str, Any]:
    """Load a data JSON (see module docstring) and run ``task`` on it."""
    with open(data_path, encoding="utf-8") as f:
        data = json.load(f)
    train, evaluation = data["train"], data["eval"]
    if task == "ner":
        label_names = data.get("label_names") or train["label_names"]
        return train_token_classifier(model_path, train["tokens"], train["tags"],
                                      evaluation["tokens"], evaluation["tags"], label_names, **hparams)
    if num_labels is None:
        num_labels = int(max(train["label"] + evaluation["label"])) + 1
    return train_sequence_classifier(model_path, train["text"], train["label"],
                                     evaluation["text"], evaluation["label"], num_labels, **hparams)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (hyperparameter names follow ``TrainingArguments``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = DEFAULT_HPARAMS
    p.add_argument("--task", choices=TASKS, default="classification")
    p.add_argument("--model", required=True, help="local model folder")
    p.add_argument("--data", required=True, help="data JSON (see module docstring)")
    p.add_argument("--num-labels", type=int, default=None,
                   help="classification only; default max(label)+1")
    p.add_argument("--learning-rate", "--lr", type=float, default=d["learning_rate"])
    p.add_argument("--num-train-epochs", "--epochs", type=float, default=d["num_train_epochs"])
    p.add_argument("--max-steps", type=int, default=d["max_steps"], help="> 0 overrides epochs")
    p.add_argument("--per-device-train-batch-size", "--batch-size", type=int,
                   default=d["per_device_train_batch_size"])
    p.add_argument("--per-device-eval-batch-size", "--eval-batch-size", type=int,
                   default=d["per_device_eval_batch_size"])
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--warmup-ratio", type=float, default=d["warmup_ratio"])
    p.add_argument("--max-length", type=int, default=d["max_length"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--group-by-length", action="store_true",
                   help="the Trainer's length-grouped sampler (like ftjax's data.group_by_length)")
    p.add_argument("--output", default=None, help="also write the JSON result to this file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI entry point: run one benchmark and print its result as one JSON line."""
    args = vars(parse_args(argv))
    task, model, data, output = args.pop("task"), args.pop("model"), args.pop("data"), args.pop("output")
    # Keep stdout for the result line only; library chatter goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        result = run_from_json(task, model, data, **args)
    line = json.dumps(result)
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(line + "\n")
    print(line, flush=True)
    return result


if __name__ == "__main__":
    main()
