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
    for name in SOURCES:  # <name>.json and the variants written with --output <name>_*.json
        for path in [results / f"{name}.json", *sorted(results.glob(f"{name}_*.json"))]:
            if not path.exists():
                continue
            data = json.loads(path.read_text())
            for record in data.get("summary", []):  # files from before the repeated runs have none
                if isinstance(record, dict) and "task" in record:
                    records.append({**record, "benchmark": name, "source": path.name,
                                    "command": data.get("command"), "machine": data.get("machine")})
    return records


def main() -> None:
    records = collect()
    print(summary_table([{**r, "task": f"{r['task']} ({r['source']})"} for r in records]))
    missing = [n for n in SOURCES if not any(r["benchmark"] == n for r in records)]
    if missing:
        print(f"no repeated side-by-side record yet in: {', '.join(missing)}")
    out = RESULTS / "summary.json"
    out.write_text(json.dumps({"records": records, "missing": missing}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
