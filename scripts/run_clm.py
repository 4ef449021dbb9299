"""Causal-LM pre-training or fine-tuning: the same as ``ftjax train configs/clm-smollm2-lee.yaml``.

    python scripts/run_clm.py                        # configs/clm-smollm2-lee.yaml, offline
    python scripts/run_clm.py configs/clm-gpt2-scratch.yaml
"""

import sys
from pathlib import Path

from ftjax.cli import main as cli_main

DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "clm-smollm2-lee.yaml")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or "=" in argv[0]:  # only overrides: use the default config
        argv = [DEFAULT_CONFIG, *argv]
    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
