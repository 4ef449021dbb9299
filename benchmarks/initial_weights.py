"""The one set of initial weights both sides of a benchmark start from.

transformers' PyTorch heads are initialised with ``normal(0, initializer_range)`` (0.02), its Flax
heads with Flax's ``nn.Dense`` default (std about 1/sqrt(hidden)): started separately, the two sides
of a benchmark differ by their head before the first step (issue 12 measured an 11-point NER F1 gap
that was only this). So a benchmark builds the PyTorch model once here, seeded, with its freshly
initialised head, and saves it (safetensors + tokenizer) to a folder; the PyTorch Trainer and ftjax
(``model.name_or_path=FOLDER``; ftjax converts PyTorch safetensors on load) both start from that
folder, so their initial parameters are equal.

    python benchmarks/initial_weights.py --auto-class AutoModelForSequenceClassification \\
        --model PATH --out FOLDER --seed 42 --kwargs '{"num_labels": 3}'

Run as its own process: it imports torch (and keeps JAX out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def save_initial_model(auto_class: str, model: str, out: str, seed: int, kwargs: dict) -> str:
    """``transformers.<auto_class>.from_pretrained(model, **kwargs)`` after ``set_seed(seed)``, saved
    with its tokenizer to ``out``; returns ``out``."""
    for flag, value in (("USE_TORCH", "1"), ("USE_TF", "0"), ("USE_FLAX", "0"), ("USE_JAX", "0")):
        os.environ.setdefault(flag, value)
    import transformers
    transformers.set_seed(seed)
    loaded = getattr(transformers, auto_class).from_pretrained(model, **kwargs)
    loaded.save_pretrained(out, safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return out


def initial_model(auto_class: str, model: str, out: Path, seed: int, **kwargs) -> str:
    """Runs ``save_initial_model`` in a child process (the caller may hold JAX); returns the folder."""
    import subprocess
    env = dict(os.environ, USE_TORCH="1", USE_FLAX="0", USE_JAX="0", USE_TF="0")
    subprocess.run([sys.executable, __file__, "--auto-class", auto_class, "--model", str(model), "--out", str(out),
                    "--seed", str(seed), "--kwargs", json.dumps(kwargs)], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    return str(out)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--auto-class", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--kwargs", default="{}")
    a = p.parse_args()
    print(save_initial_model(a.auto_class, a.model, a.out, a.seed, json.loads(a.kwargs)))
