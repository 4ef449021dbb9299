"""The model card (``README.md``) written beside every export, and the config that reproduces it.

``render`` is a pure function of the run's record (the config as it ran), its results and a few
facts about the data and the machine, so a card can be rebuilt from ``config.json`` and
``results.json`` alone. The metadata block is Hugging Face's (``huggingface_hub.ModelCardData``),
so the Hub shows the base model, task and metrics.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any, Optional

import yaml

PIPELINE_TAGS = {"classification": "text-classification", "ner": "token-classification",
                 "token_classification": "token-classification", "mlm": "fill-mask", "clm": "text-generation",
                 "qa": "question-answering", "seq2seq": "text2text-generation"}
TASK_NAMES = {"classification": "text classification", "ner": "token classification (NER)",
              "token_classification": "token classification", "mlm": "masked language modelling",
              "clm": "causal language modelling", "qa": "extractive question answering",
              "seq2seq": "sequence-to-sequence generation"}
LIMITATIONS = {
    "classification": "It predicts only the labels it was trained on; texts from another domain, language or "
                      "label definition will be classified with misplaced confidence.",
    "ner": "Entity types outside its tag set are not found; tokenization splits words into sub-words and the "
           "aggregation strategy decides how their tags become entities.",
    "token_classification": "Tags outside its tag set are never predicted.",
    "mlm": "Its predictions reflect the statistics (and biases) of the training corpus.",
    "clm": "Generated text reflects the statistics (and biases) of the training corpus and is not checked for "
           "facts.",
    "qa": "Answers are spans of the given context; questions whose answer is not in the context get a span "
          "anyway unless the model was trained with unanswerable questions.",
    "seq2seq": "Generated text is not checked for faithfulness to its source.",
}
VERSIONED = ("ftjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "datasets", "tokenizers")
CONFIG_FILE = "ftjax_config.yaml"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(mesh_shape: dict, devices: list) -> dict[str, Any]:
    """Hardware and library versions of this run."""
    kinds = sorted({getattr(d, "device_kind", str(d)) for d in devices})
    return {"devices": f"{len(devices)} x {', '.join(kinds)}", "platform": devices[0].platform if devices else "?",
            "mesh": mesh_shape, "python": platform.python_version(), "host": platform.machine(),
            "versions": {p: _version(p) for p in VERSIONED}}


def _is_hub_name(name: str) -> bool:
    return bool(name) and not name.startswith(("pkg://", "/", ".", "~")) and not Path(name).exists()


def _data_lines(data: dict, sizes: dict[str, int]) -> list[str]:
    if data.get("dataset_name"):
        source = [f"- Hub dataset `{data['dataset_name']}`" +
                  (f" (config `{data['dataset_config_name']}`)" if data.get("dataset_config_name") else "")]
    else:
        source = [f"- {split}: `{data[f'{split}_file']}`" for split in ("train", "validation", "test")
                  if data.get(f"{split}_file")]
    if data.get("split_rule") == "mod10":
        source.append("- split rule `mod10`: example i is test when i % 10 == 0, validation when i % 10 == 1, "
                      "train otherwise")
    if sizes:
        source.append("- rows after preprocessing: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    for key in ("max_train_samples", "max_eval_samples"):
        if data.get(key):
            source.append(f"- `{key}`: {data[key]}")
    return source


def _table(rows: list[list[Any]], header: list[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _metrics_lines(results: dict, label_names: Optional[list[str]]) -> list[str]:
    lines = []
    for split in ("validation", "test"):
        values = results.get(split)
        if not values:
            continue
        scalars = [[k, _fmt(v)] for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        lines += [f"### {split}", ""] + _table(scalars, ["metric", "value"]) + [""]
        per_type = values.get("per_type")
        if isinstance(per_type, dict) and per_type:
            rows = [[t, _fmt(r["precision"]), _fmt(r["recall"]), _fmt(r["f1"]), r["support"]]
                    for t, r in per_type.items()]
            lines += ["Per entity type:", ""] + _table(rows, ["type", "precision", "recall", "f1", "support"]) + [""]
        matrix = values.get("confusion_matrix")
        if isinstance(matrix, list) and matrix:
            names = label_names if label_names and len(label_names) == len(matrix) else list(range(len(matrix)))
            rows = [[f"**{g}**", *row] for g, row in zip(names, matrix)]
            lines += ["Confusion matrix (rows: gold, columns: predicted):", ""] + \
                _table(rows, ["gold \\ predicted", *names]) + [""]
    return lines or ["No evaluation split was configured.", ""]


def render(record: dict, results: dict, environment: dict, sizes: dict[str, int],
           label_names: Optional[list[str]] = None) -> str:
    """The model card's markdown (metadata block first) for a finished run.

    ``record`` is the config as it ran (``config.json``), ``results`` the run's ``results.json``,
    ``sizes`` the rows per split, ``environment`` what ``environment()`` returns.
    """
    from huggingface_hub import ModelCardData

    task, model, data = record["task"], record["model"], record["data"]
    training, train = record["training"], results.get("train", {})
    base = model["name_or_path"]
    scalar_metrics = sorted({k for s in ("validation", "test") for k, v in (results.get(s) or {}).items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "num_examples"})
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag=PIPELINE_TAGS.get(task), tags=["ftjax", "jax", "flax", task],
        base_model=base if _is_hub_name(base) and not (model.get("from_scratch") or model.get("flax_module")) else None,
        datasets=[data["dataset_name"]] if data.get("dataset_name") else None, metrics=scalar_metrics or None)
    name = Path(training["output_dir"]).name
    origin = "trained from scratch (random initialisation)" if model.get("from_scratch") else f"fine-tuned from `{base}`"
    if model.get("flax_module"):  # its own Flax model: name_or_path gave the tokenizer (or an earlier export)
        origin = f"the Flax model `{model['flax_module']}`, trained"
    env = environment
    lines = [
        "---", card_data.to_yaml(), "---", "",
        f"# {name}", "",
        f"A {TASK_NAMES.get(task, task)} model, {origin} with ftjax (JAX/Flax).", "",
        "## Data", "", *_data_lines(data, sizes), "",
        "## Preprocessing", "",
        f"- max length {model['max_length']} tokens; batches padded to the buckets "
        f"{data['bucket_lengths'] or 'chosen from the length histogram of each split'}",
        *[f"- `task_options.{k}`: {v}" for k, v in sorted(record.get("task_options", {}).items())],
        *([f"- labels: {', '.join(map(str, label_names))}"] if label_names else []), "",
        "## Results", "", *_metrics_lines(results, label_names),
        "## Training", "",
        f"- steps {train.get('global_step')}, epochs {_fmt(train.get('epochs'))}, best step {train.get('best_step')} "
        f"({training.get('metric_for_best_model') or 'loss'} {_fmt(train.get('best_metric'))})",
        f"- training time {train.get('train_runtime_s', 0):.1f} s, data preparation "
        f"{train.get('data_preparation_s', 0):.1f} s, {train.get('train_examples_per_second', 0):.1f} examples/s",
        f"- hardware: {env['devices']} ({env['platform']}), mesh {env['mesh']}, host {env['host']}, "
        f"Python {env['python']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()), "",
        "Hyperparameters (`training`):", "",
        *_table([[k, f"`{v}`"] for k, v in sorted(training.items())], ["key", "value"]), "",
        "## Intended use and limitations", "",
        f"Intended for {TASK_NAMES.get(task, task)} on text like its training data; measure it on your own data "
        f"before relying on it. Inputs longer than {model['max_length']} tokens are truncated (or windowed where "
        f"the task supports a stride). {LIMITATIONS.get(task, '')}", "",
        "## Reproduce", "",
        f"The config as it ran is `{CONFIG_FILE}` in this folder:", "",
        "```bash", f"ftjax train {CONFIG_FILE}", "```", ""]
    return "\n".join(lines)


def write(directory: str | Path, record: dict, card: str) -> None:
    """``README.md`` and the reproducing config (``ftjax_config.yaml``) into an export folder."""
    directory = Path(directory)
    (directory / "README.md").write_text(card, encoding="utf-8")
    plain = json.loads(json.dumps(record, default=str))  # tuples (mesh.rules) as lists, for safe_dump
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(plain, sort_keys=False), encoding="utf-8")
