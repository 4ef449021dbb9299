"""Masked-LM pre-training / domain adaptation: the same as ``ftjax train configs/mlm-minilm-lee.yaml``.

    python scripts/run_mlm.py                        # configs/mlm-minilm-lee.yaml, offline
    python scripts/run_mlm.py training.num_train_epochs=1 data.mlm_probability=0.3
"""

import sys
from pathlib import Path

from ftjax.cli import main as cli_main

DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "mlm-minilm-lee.yaml")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or "=" in argv[0]:  # only overrides: use the default config
        argv = [DEFAULT_CONFIG, *argv]
    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
