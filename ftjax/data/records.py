"""Input files of ``ftjax predict`` read as records, one record per input line (or CSV row / JSON
object), and the precise diagnosis of a data file that ``datasets`` failed to read.

Rules, so that output row i always answers input record i:

* ``.txt``: one text per ``\\n``-terminated line (a trailing ``\\r`` is dropped). Unicode line
  separators (U+2028, form feed, ...) stay inside their line: ``str.splitlines`` would split there.
* ``.jsonl``: one JSON object per ``\\n`` line (blank lines skipped); raw U+2028 inside a string is
  valid JSON and stays. A broken line fails naming its line number.
* ``.json``: a JSON array of objects, or JSON lines (what ``datasets`` accepts under that suffix).
* ``.csv`` / ``.tsv``: parsed by the ``csv`` module over the whole text, so a quoted field that
  spans lines stays one field with its newline; a UTF-8 byte-order mark is dropped from the header;
  a row with more or fewer fields than the header fails naming its line.

Bytes that are not UTF-8 are replaced by U+FFFD with one warning giving their count.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
from pathlib import Path

from ftjax.errors import FtjaxError

log = logging.getLogger("ftjax")

REPLACEMENT = "\ufffd"
_CHUNK = 1 << 20


def replaced_bytes(path: str | Path) -> int:
    """How many invalid UTF-8 sequences decoding ``path`` with ``errors="replace"`` turns into U+FFFD
    (U+FFFD characters written in the file itself are not counted). Streams the file."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    strict = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    count = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            count += decoder.decode(chunk).count(REPLACEMENT) - strict.decode(chunk).count(REPLACEMENT)
    return count + decoder.decode(b"", final=True).count(REPLACEMENT)


def warn_replaced(path: str | Path, count: int) -> None:
    """One warning line for a file with invalid UTF-8 bytes (typically Latin-1 / cp1252 text)."""
    if count:
        log.warning("warning: %s: %d byte sequence%s not valid UTF-8 (Latin-1?), replaced by U+FFFD; "
                    "re-encode the file as UTF-8 to keep those characters", path, count, "" if count == 1 else "s")


def read_text(path: str | Path, warn: bool = True) -> str:
    """The file as text: UTF-8 (a byte-order mark dropped), invalid bytes replaced with one warning."""
    raw = Path(path).read_bytes()
    text = raw.decode("utf-8-sig", errors="replace")
    if warn:
        warn_replaced(path, text.count(REPLACEMENT) - raw.decode("utf-8", errors="ignore").count(REPLACEMENT))
    return text


def lines(text: str) -> list[str]:
    """Lines split on ``\\n`` only (``\\r\\n`` too); no empty last line for a final newline."""
    parts = text.split("\n")
    if parts and parts[-1] == "":
        parts.pop()
    return [p[:-1] if p.endswith("\r") else p for p in parts]


def json_lines(text: str, path: str | Path) -> list[dict]:
    """Objects of a JSON-lines text; a line that is not a JSON object fails naming it."""
    records = []
    for lineno, line in enumerate(lines(text), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise FtjaxError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno}); "
                             "each line must be one JSON object") from None
        if not isinstance(value, dict):
            raise FtjaxError(f"{path}:{lineno}: a JSON {type(value).__name__}, not an object "
                             "(expected one {\"column\": value, ...} per line)")
        records.append(value)
    return records


def json_document(text: str, path: str | Path) -> list[dict]:
    """Objects of a ``.json`` file: a JSON array of objects, or JSON lines (as ``datasets`` reads
    that suffix); a single pretty-printed object or a scalar is refused with what to give instead."""
    if not text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return json_lines(text, path)
        if isinstance(value, dict) and len([line for line in lines(text) if line.strip()]) == 1:
            return [value]
        raise FtjaxError(f"{path}: holds one JSON {type(value).__name__}; give a JSON array of objects "
                         "([{\"column\": value}, ...]) or one object per line (.jsonl)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise FtjaxError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    bad = next((i for i, v in enumerate(value) if not isinstance(v, dict)), None)
    if bad is not None:
        raise FtjaxError(f"{path}: item {bad} of the JSON array is a {type(value[bad]).__name__}, not an "
                         "object (expected [{\"column\": value, ...}, ...])")
    return value


def csv_rows(text: str, path: str | Path, delimiter: str = ",") -> list[dict]:
    """Rows of a CSV / TSV text as dicts keyed by the header; quoted multi-line fields kept whole;
    a row with a different number of fields than the header fails naming its line."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return []
        records = []
        start = reader.line_num + 1
        for row in reader:
            if row and len(row) < len(header) and any("\n" in f for f in row):
                raise FtjaxError(f"{path}:{start}: a quoted field opened here runs to line {reader.line_num}; "
                                 "is a closing '\"' missing?")
            if row and len(row) != len(header):
                raise FtjaxError(f"{path}:{start}: {len(row)} fields but the header has {len(header)} "
                                 f"({', '.join(header)}); quote fields that contain '{delimiter}'")
            if row:
                records.append(dict(zip(header, row)))
            start = reader.line_num + 1
    except csv.Error as e:
        raise FtjaxError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    return records


def read_records(path: str | Path, columns: list[str]) -> list[dict]:
    """The records of a predict input file (see the module docstring); each must hold ``columns``."""
    p = Path(path)
    if not p.is_file():
        raise FtjaxError(f"input file not found: {path}")
    suffix = p.suffix.lower()
    text = read_text(p)
    if suffix in (".csv", ".tsv"):
        records = csv_rows(text, path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".json":
        records = json_document(text, path)
    elif suffix == ".jsonl":
        records = json_lines(text, path)
    else:
        records = [{columns[0]: line} for line in lines(text)]
    if not records:
        raise FtjaxError(f"{path}: the file holds no inputs" + (" (0 bytes)" if p.stat().st_size == 0 else ""))
    for i, record in enumerate(records):
        missing = [c for c in columns if c not in record]
        if missing:
            where = f"record {i + 1}" if suffix not in (".csv", ".tsv") else "the header"
            raise FtjaxError(f"{path}: {where} has no column '{missing[0]}' (it has: {', '.join(record) or 'none'}); "
                             "set data.text_column")
    return records


def diagnose(path: str | Path, builder: str, sep: str = ",") -> None:
    """Raises the precise FtjaxError (with the line) for a data file ``datasets`` could not read,
    by reading it the way ``read_records`` does; returns when no problem is found that way."""
    if builder == "csv":
        csv_rows(read_text(path, warn=False), path, sep)
    elif builder == "json":
        json_document(read_text(path, warn=False), path)
