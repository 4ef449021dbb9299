"""Fine-tune an extractive QA model: the same as ``ftjax train configs/qa-local-minilm.yaml``.

    python scripts/run_qa.py --make-lee-data data/lee_qa.jsonl   # offline real-text QA data (once)
    python scripts/run_qa.py                                     # MiniLM-L6 on it, offline
    python scripts/run_qa.py configs/qa-squad-bert.yaml          # SQuAD from the Hub
    python scripts/run_qa.py training.num_train_epochs=1 task_options.stride=32
"""

import json
import sys
from pathlib import Path

from ftjax.cli import train_script

DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "qa-local-minilm.yaml")
LEE = "pkg://gensim/test/test_data/lee_background.cor"


def make_lee_data(path: str) -> None:
    """SQuAD-v2-layout JSON lines: cloze questions over the Lee news corpus (pip install --no-deps gensim)."""
    from ftjax.paths import resolve_path
    from ftjax.data.squad import cloze_qa
    docs = Path(resolve_path(LEE)).read_text(encoding="latin-1").splitlines()
    rows = cloze_qa(docs, unanswerable=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} questions to {path}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--make-lee-data"]:
        make_lee_data(argv[1] if len(argv) > 1 else "data/lee_qa.jsonl")
        return 0
    return train_script(DEFAULT_CONFIG, argv)


if __name__ == "__main__":
    sys.exit(main())
