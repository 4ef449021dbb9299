"""CoNLL-style files -> ``datasets.Dataset`` with ``tokens`` and tags as ``Sequence(ClassLabel)``.

One ``token ... TAG`` line per word (tab or space separated), sentences separated by empty or
whitespace-only lines (WNUT-16 uses a line holding one tab), ``-DOCSTART-`` lines skipped. In
multi-column files (CoNLL-2003: ``token POS CHUNK NER``) ``data.tag_column_index`` picks the tag.

The label set comes from the training file (or ``data.label_names``); a tag in another file that is
not in it fails with the file and line, before any training starts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import datasets

from ftjax.errors import FtjaxError
from ftjax.paths import resolve_path

CONLL_SUFFIXES = (".conll", ".conllu", ".iob", ".bio", ".iob2")
BIO_PREFIXES = ("B-", "I-", "E-", "S-", "L-", "U-")


@dataclasses.dataclass
class Sentence:
    tokens: list[str]
    tags: list[str]
    line: int  # 1-based line of the first token
    tag_lines: list[int]  # line of each tag, for error messages


def is_conll(path: Optional[str], fmt: str) -> bool:
    """Whether ``data.format`` (or, for ``auto``, the file suffix) says CoNLL."""
    return fmt == "conll" or (fmt == "auto" and bool(path) and Path(path).suffix.lower() in CONLL_SUFFIXES)


def _fields(line: str) -> list[str]:
    stripped = line.strip()
    if "\t" in stripped:  # tab separated: a token may hold spaces
        return [f.strip() for f in stripped.split("\t")]
    return stripped.split()


def read_conll(path: str, tag_column: int = -1) -> list[Sentence]:
    """Sentences of a CoNLL file; one FtjaxError naming file and line for a malformed line."""
    p = Path(path)
    if not p.is_file():
        raise FtjaxError(f"data file not found: {path}")
    from ftjax.data.records import replaced_bytes, warn_replaced
    warn_replaced(path, replaced_bytes(p))
    sentences: list[Sentence] = []
    current = Sentence([], [], 0, [])
    with open(p, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                if current.tokens:
                    sentences.append(current)
                current = Sentence([], [], 0, [])
                continue
            fields = _fields(line)
            if fields[0] == "-DOCSTART-":
                continue
            if len(fields) < 2:
                raise FtjaxError(f"{path}:{lineno}: line has no tag (expected 'token TAG'): {line.rstrip()!r}")
            try:
                tag = fields[tag_column]
            except IndexError:
                raise FtjaxError(f"{path}:{lineno}: {len(fields)} columns, but data.tag_column_index is "
                                 f"{tag_column}") from None
            if tag_column in (0, -len(fields)):
                raise FtjaxError(f"{path}:{lineno}: data.tag_column_index={tag_column} points at the token column")
            if not current.tokens:
                current.line = lineno
            current.tokens.append(fields[0])
            current.tags.append(tag)
            current.tag_lines.append(lineno)
    if current.tokens:
        sentences.append(current)
    if not sentences:
        raise FtjaxError(f"{path}: no sentences found (empty file?)")
    return sentences


def sort_tags(tags) -> list[str]:
    """A stable label order: ``O`` first, then by entity type with B- before I- (as hub datasets do)."""
    def key(tag: str):
        if tag.startswith(BIO_PREFIXES):
            return (1, tag[2:], BIO_PREFIXES.index(tag[:2]))
        return (0 if tag == "O" else 1, tag, -1)
    return sorted(set(tags), key=key)


def to_dataset(sentences: list[Sentence], label_names: list[str], path: str,
               tokens_column: str = "tokens", tags_column: str = "ner_tags") -> datasets.Dataset:
    """The sentences as a Dataset (plus a ``line`` column for error messages); a tag outside
    ``label_names`` fails naming its file and line."""
    index = {n: i for i, n in enumerate(label_names)}
    ids = []
    for s in sentences:
        for tag, lineno in zip(s.tags, s.tag_lines):
            if tag not in index:
                raise FtjaxError(f"{path}:{lineno}: tag '{tag}' is not in the training label set "
                                 f"{label_names[:25]}")
        ids.append([index[t] for t in s.tags])
    features = datasets.Features({
        tokens_column: datasets.Sequence(datasets.Value("string")),
        tags_column: datasets.Sequence(datasets.ClassLabel(names=list(label_names))),
        "line": datasets.Value("int32")})
    return datasets.Dataset.from_dict({tokens_column: [s.tokens for s in sentences], tags_column: ids,
                                       "line": [s.line for s in sentences]}, features=features)


def load_conll_splits(files: dict[str, str], cfg) -> datasets.DatasetDict:
    """Reads ``{split: path}`` CoNLL files; the label set is ``cfg.label_names`` or the train file's."""
    read = {split: (resolve_path(path), read_conll(resolve_path(path), cfg.tag_column_index))
            for split, path in files.items()}
    train_path, train = read["train"]
    names = [str(n) for n in cfg.label_names] if cfg.label_names else sort_tags(
        t for s in train for t in s.tags)
    return datasets.DatasetDict({split: to_dataset(sents, names, path, cfg.tokens_column, cfg.tags_column)
                                 for split, (path, sents) in read.items()})
