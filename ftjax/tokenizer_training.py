"""Train a fast tokenizer on local text with the ``tokenizers`` library, saved in Hugging Face format.

    ftjax train-tokenizer pkg://gensim/test/test_data/lee_background.cor --kind wordpiece \\
        --vocab-size 8000 --output outputs/tokenizer-lee

``wordpiece``: BERT-style (lowercased, [CLS] [SEP] [MASK] [PAD] [UNK]) for MLM;
``bpe``: GPT-2-style byte-level BPE (``<|endoftext|>``) for CLM. Any file ``load_file`` reads
works (.txt / .cor one text a line, csv / json with a text column, a .xml.bz2 wiki dump).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import ByteLevelBPETokenizer, BertWordPieceTokenizer
from tokenizers.processors import TemplateProcessing

from ftjax.data.loading import load_file
from ftjax.errors import FtjaxError
from ftjax.models import flax_transformers

KINDS = ("wordpiece", "bpe")


def iter_texts(files: list[str], text_column: str = "text"):
    for path in files:
        ds = load_file(path)
        if text_column not in ds.column_names:
            raise FtjaxError(f"{path}: column '{text_column}' not found (columns: {', '.join(ds.column_names)})")
        for text in ds[text_column]:
            if text and str(text).strip():
                yield str(text)


def train_tokenizer(files: list[str], output_dir: str, kind: str = "wordpiece", vocab_size: int = 8000,
                    min_frequency: int = 2, lowercase: bool | None = None, text_column: str = "text"):
    """Trains and saves (``save_pretrained``) a fast tokenizer; returns it. ``lowercase`` defaults to
    True for wordpiece (uncased BERT) and False for bpe."""
    if lowercase is None:
        lowercase = kind == "wordpiece"
    if kind not in KINDS:
        raise FtjaxError(f"tokenizer kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not files:
        raise FtjaxError("train-tokenizer needs at least one text file")
    texts = list(iter_texts(files, text_column))
    if not texts:
        raise FtjaxError(f"{', '.join(files)}: no text to train a tokenizer on")
    transformers = flax_transformers()  # torch kept out
    if kind == "wordpiece":
        model = BertWordPieceTokenizer(lowercase=lowercase)
        model.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
        cls, sep = model.token_to_id("[CLS]"), model.token_to_id("[SEP]")
        model.post_processor = TemplateProcessing(  # [CLS] A [SEP] (B [SEP]), as BERT's own tokenizer
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        tokenizer = transformers.BertTokenizerFast(tokenizer_object=model, do_lower_case=lowercase)
    else:
        model = ByteLevelBPETokenizer(lowercase=lowercase)
        model.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=["<|endoftext|>"])
        tokenizer = transformers.GPT2TokenizerFast(tokenizer_object=model, bos_token="<|endoftext|>",
                                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(output_dir)
    return tokenizer
