"""Plain-text corpora for language modelling: MediaWiki XML dumps (``*.xml.bz2``) as title + text.

``load_file`` (ftjax.data.loading) reads ``.txt`` / ``.cor`` files one document a line with the
``datasets`` text builder; a Wikipedia dump needs its markup stripped first, which this module does
with a few regular expressions (enough for language-model text; not a full wikitext parser).
"""

from __future__ import annotations

import bz2
import re
import xml.etree.ElementTree as ET

import datasets

from ftjax.errors import FtjaxError

_MARKUP = [  # applied in order
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"\{\|.*?\|\}", re.S), ""),  # tables
    (re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I), ""),
    (re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]"), r"\1"),  # [[target|label]] -> label
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1."),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r"\n{2,}"), "\n"),
]
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")


def strip_wiki_markup(text: str) -> str:
    """Readable text from wikitext: templates, references, tables, links and formatting removed."""
    previous = None
    while previous != text:  # templates nest: remove innermost first
        previous, text = text, _TEMPLATE.sub("", text)
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    return text.strip()


def read_wiki_dump(path: str, min_chars: int = 200) -> datasets.Dataset:
    """Articles (namespace 0, no redirects) of a ``.xml.bz2`` MediaWiki dump: ``title``, ``text``
    (one article a row, newlines kept as paragraph breaks)."""
    titles, texts = [], []
    try:
        with bz2.open(path, "rb") as f:
            for _, elem in ET.iterparse(f):
                if not elem.tag.endswith("}page"):
                    continue
                ns = elem.findtext("{*}ns")
                title = elem.findtext("{*}title") or ""
                text = elem.findtext("{*}revision/{*}text") or ""
                elem.clear()
                if ns != "0" or text.lstrip().lower().startswith("#redirect"):
                    continue
                text = strip_wiki_markup(text)
                if len(text) >= min_chars:
                    titles.append(title)
                    texts.append(text)
    except (OSError, ET.ParseError, EOFError) as e:
        raise FtjaxError(f"{path}: cannot read as a bz2 MediaWiki XML dump: {e}") from None
    return datasets.Dataset.from_dict({"title": titles, "text": texts})
