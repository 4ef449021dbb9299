"""How ``task_options.aggregation_strategy`` shapes ``ftjax predict`` NER entities, on real tweets.

A model trained with first-subword labels (the NER config) predicts the 240 WNUT-16 test tweets
(ASSETS.md split rule; tokens joined with spaces as raw text). For each strategy: entities found,
entities whose span starts or ends between two letters or digits (a cut word: "Ekeus" -> "ek"), and
exact-span-and-type precision / recall / F1 against the gold entities. A quality measurement, not
a timing: the numbers do not depend on the machine's load (recorded anyway).

    .venv/bin/ftjax train configs/ner-wnut16-minilm.yaml training.output_dir=/tmp/ner
    .venv/bin/python benchmarks/ner_aggregation.py --model /tmp/ner/export
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, machine, table  # noqa: E402

CONFIG = "configs/ner-wnut16-minilm.yaml"
STRATEGIES = ("simple", "first", "max", "average")


def gold_entities(tokens: list[str], tags: list[str]) -> tuple[str, set]:
    """The tweet as text and its gold ``(type, start, end)`` spans."""
    text, spans, current, pos = " ".join(tokens), set(), None, 0
    for token, tag in zip(tokens, tags):
        start, end = pos, pos + len(token)
        if tag.startswith("B-") or (tag.startswith("I-") and (current is None or current[0] != tag[2:])):
            if current:
                spans.add(tuple(current))
            current = [tag[2:], start, end]
        elif tag.startswith("I-"):
            current[2] = end
        else:
            if current:
                spans.add(tuple(current))
            current = None
        pos = end + 1
    if current:
        spans.add(tuple(current))
    return text, spans


def cuts_word(text: str, start: int, end: int) -> bool:
    """Whether a span starts or ends between two letters / digits ("Ekeus" -> "ek")."""
    inside = lambda i: 0 < i < len(text) and text[i - 1].isalnum() and text[i].isalnum()  # noqa: E731
    return inside(start) or inside(end)


def score(predicted: list[list[dict]], golds: list[set], texts: list[str]) -> dict:
    pred = [{(e["entity_group"], e["start"], e["end"]) for e in p} for p in predicted]
    tp = sum(len(p & g) for p, g in zip(pred, golds))
    n_pred, n_gold = sum(map(len, pred)), sum(map(len, golds))
    cut = sum(cuts_word(t, s, e) for p, t in zip(pred, texts) for _, s, e in p)
    precision, recall = tp / max(n_pred, 1), tp / max(n_gold, 1)
    return {"entities": n_pred, "cut_mid_word": cut, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / max(precision + recall, 1e-9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained NER export folder")
    parser.add_argument("--output", default=str(RESULTS / "ner_aggregation.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from ftjax.config import load_config
    from ftjax.data.loading import load_splits
    from ftjax.trainer import Trainer

    cfg = load_config(ROOT / CONFIG, ["mesh.data=1"])
    test = load_splits(cfg.data)["test"]
    names = test.features[cfg.data.tags_column].feature.names
    texts, golds = zip(*(gold_entities(t, [names[i] for i in tags])
                                 for t, tags in zip(test[cfg.data.tokens_column], test[cfg.data.tags_column])))
    trainer = Trainer(cfg, model_path=args.model, with_data=False)
    rows, examples = [], {}
    for strategy in STRATEGIES:
        trainer.task.options.aggregation_strategy = strategy  # read at each predict
        predicted = trainer.predict([{cfg.data.text_column: t} for t in texts])
        rows.append({"strategy": strategy, **score(predicted, list(golds), list(texts))})
        examples[strategy] = [[e["word"] for e in p] for p in predicted[:40]]
    print(table(rows, ["strategy", "entities", "cut_mid_word", "precision", "recall", "f1"]))
    record = {"model": args.model, "tweets": len(texts), "gold_entities": sum(map(len, golds)), "results": rows,
              "first_40_tweets_entity_words": examples, "machine": machine(), "loadavg": os.getloadavg(),
              "note": "exact span+type match against WNUT-16 test gold; cut_mid_word: a span edge between two "
                      "letters/digits"}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
