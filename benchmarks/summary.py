"""One table over every side-by-side benchmark: reads the ``summary`` records that
classification.py, ner.py, lm.py and qa_seq2seq.py write into benchmarks/results/*.json, prints the
README table (medians [min-max] of alternating runs, ratios paired by repeat) and writes
benchmarks/results/summary.json.

    .venv/bin/python benchmarks/summary.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, summary_table  # noqa: E402

SOURCES = ("classification", "ner", "lm", "qa_seq2seq")


def collect(results: Path = RESULTS) -> list[dict]:
    """Every summary record, with the file, command and machine it came from."""
    records = []
    for name in SOURCES:
        path = results / f"{name}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        for record in data.get("summary", []):  # files from before the repeated runs have none
            records.append({**record, "source": path.name, "command": data.get("command"),
                            "machine": data.get("machine")})
    return records


def main() -> None:
    records = collect()
    print(summary_table(records))
    missing = [n for n in SOURCES if not any(r["source"] == f"{n}.json" for r in records)]
    if missing:
        print(f"no repeated side-by-side record yet in: {', '.join(missing)}")
    out = RESULTS / "summary.json"
    out.write_text(json.dumps({"records": records, "missing": missing}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
