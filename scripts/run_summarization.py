"""Fine-tune a seq2seq model: the same as ``ftjax train configs/summarization-bart.yaml``.

    python scripts/run_summarization.py                                  # BART on CNN/DailyMail (Hub)
    python scripts/run_summarization.py configs/summarization-t5.yaml    # T5-small on XSum (Hub)
    python scripts/run_summarization.py --offline                        # BERT2BERT MiniLM-L6, Wikipedia titles
"""

import sys
from pathlib import Path

from ftjax.cli import train_script

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = str(CONFIGS / "summarization-bart.yaml")
OFFLINE_CONFIG = str(CONFIGS / "seq2seq-wiki-titles-minilm.yaml")  # real data, MiniLM BERT2BERT


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--offline"]:
        return train_script(OFFLINE_CONFIG, argv[1:])
    return train_script(DEFAULT_CONFIG, argv)


if __name__ == "__main__":
    sys.exit(main())
