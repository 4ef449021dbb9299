"""Masked-LM pre-training / domain adaptation: the same as ``ftjax train configs/mlm-minilm-lee.yaml``.

    python scripts/run_mlm.py                        # MiniLM-L6 on the Lee corpus, offline
    python scripts/run_mlm.py training.num_train_epochs=1 task_options.mlm_probability=0.3
"""

import sys
from pathlib import Path

from ftjax.cli import train_script

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "mlm-minilm-lee.yaml"

if __name__ == "__main__":
    sys.exit(train_script(str(CONFIG)))
