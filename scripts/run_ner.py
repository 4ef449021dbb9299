"""Fine-tune a token classifier (NER): the same as ``ftjax train configs/ner-wnut16-minilm.yaml``.

    python scripts/run_ner.py                                   # WNUT-16, MiniLM-L6, offline
    python scripts/run_ner.py configs/ner-conll2003-bert.yaml    # CoNLL-2003 from the Hub
    python scripts/run_ner.py training.num_train_epochs=1 task_options.label_all_tokens=true
"""

import sys
from pathlib import Path

from ftjax.cli import train_script

CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "ner-wnut16-minilm.yaml")


def main(argv: list[str] | None = None) -> int:
    return train_script(CONFIG, argv)


if __name__ == "__main__":
    sys.exit(main())
