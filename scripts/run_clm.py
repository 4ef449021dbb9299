"""Causal-LM pre-training or fine-tuning: the same as ``ftjax train configs/clm-smollm2-lee.yaml``.

    python scripts/run_clm.py                        # SmolLM2-135M (GGUF) on the Lee corpus, offline
    python scripts/run_clm.py configs/clm-gpt2-scratch.yaml
"""

import sys
from pathlib import Path

from ftjax.cli import train_script

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "clm-smollm2-lee.yaml"

if __name__ == "__main__":
    sys.exit(train_script(str(CONFIG)))
