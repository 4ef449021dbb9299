"""SQuAD-layout data: the original nested JSON file (``data -> paragraphs -> qas``) as flat rows, and
a small real-text QA set for offline demos and tests (cloze questions over real news sentences).

Flat rows have the hub ``squad`` / ``squad_v2`` fields: ``id, title, context, question,
answers{text, answer_start}`` (SQuAD v2 unanswerable questions have empty ``answers`` lists).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import datasets

from ftjax.errors import FtjaxError

_NESTED_HEAD = re.compile(r'^\s*\{\s*"(version|data)"\s*:')


def is_nested_squad(path: str) -> bool:
    """A ``.json`` file that starts like the original SQuAD files: ``{"version": ..., "data": [...``."""
    if Path(path).suffix.lower() != ".json":
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        return bool(_NESTED_HEAD.match(f.read(4096)))


def read_nested_squad(path: str) -> datasets.Dataset:
    """One row per question of a nested SQuAD JSON file (v1.1 or v2.0)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))["data"]
        rows = {"id": [], "title": [], "context": [], "question": [], "answers": []}
        for article in data:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                    rows["id"].append(str(qa["id"]))
                    rows["title"].append(article.get("title", ""))
                    rows["context"].append(paragraph["context"])
                    rows["question"].append(qa["question"])
                    rows["answers"].append({"text": [a["text"] for a in answers],
                                            "answer_start": [int(a["answer_start"]) for a in answers]})
    except (ValueError, KeyError, TypeError) as e:
        raise FtjaxError(f"{path}: not a SQuAD JSON file (data -> paragraphs -> qas): {type(e).__name__} {e}") from None
    features = datasets.Features({
        "id": datasets.Value("string"), "title": datasets.Value("string"), "context": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answers": {"text": datasets.Sequence(datasets.Value("string")),
                    "answer_start": datasets.Sequence(datasets.Value("int32"))}})
    return datasets.Dataset.from_dict(rows, features=features)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
# A number, or a run of capitalised words (a name), not at the start of the sentence.
_ANSWER = re.compile(r"(?<=\s)(\d[\d,.]*\d|\d|[A-Z][a-z]+(?: [A-Z][a-z]+)*)(?=[\s,.;:!?])")


def cloze_qa(documents: list[str], sentences_per_context: int = 4, unanswerable: bool = False,
             seed: int = 0, max_question_words: int = 25) -> list[dict]:
    """Extractive QA rows from real text: each context is a few consecutive sentences of a document;
    the question is one of its sentences with a name or number replaced by "what" / "how many",
    and the answer is that span of the context. With ``unanswerable`` every fifth question is asked
    about a different document's context (SQuAD v2 style, empty answers)."""
    rng = random.Random(seed)
    rows, pool = [], []
    for d, doc in enumerate(documents):
        sentences = [s.strip() for s in _SENTENCE_END.split(doc.strip()) if s.strip()]
        for k in range(0, len(sentences), sentences_per_context):
            chunk = sentences[k:k + sentences_per_context]
            context = " ".join(chunk)
            candidates = [(s, m) for s in chunk if 6 <= len(s.split()) <= max_question_words for m in _ANSWER.finditer(s)]
            if not candidates:
                continue
            sentence, m = rng.choice(candidates)
            wh = "how many" if m.group()[0].isdigit() else "what"
            question = (sentence[:m.start()] + wh + sentence[m.end():]).rstrip(" .!?") + "?"
            start = context.index(sentence) + m.start()
            rows.append({"id": f"{d}-{k}", "title": f"document {d}", "context": context, "question": question,
                         "answers": {"text": [m.group()], "answer_start": [start]}})
            pool.append(context)
    if unanswerable:
        for i in range(0, len(rows), 5):
            other = pool[(i + len(pool) // 2) % len(pool)]
            rows[i] = {**rows[i], "id": rows[i]["id"] + "-na", "context": other,
                       "answers": {"text": [], "answer_start": []}}
    return rows
