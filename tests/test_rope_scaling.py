"""rope_scaling in a Llama config: the same logits as PyTorch transformers, or one clear refusal."""

import numpy as np
import pytest
import torch
import transformers

from ftjax import models
from ftjax.config import ModelConfig
from ftjax.errors import FtjaxError

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def _tiny_llama(folder, rope_scaling, rope_theta=10000.0):
    """A 2-layer, hidden-64 (head_dim 16) random Llama saved by PyTorch transformers; its wavelengths
    (6 to ~20000 positions) span all three llama3 regions for an original context of 64."""
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      rope_theta=rope_theta, rope_scaling=rope_scaling, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    return model


def _logits_both(folder, torch_model, ids):
    with torch.no_grad():
        expected = torch_model(torch.tensor(ids)).logits.numpy()
    flax_model, weights = models.load_model("FlaxAutoModelForCausalLM", ModelConfig(name_or_path=str(folder)))
    got = np.asarray(flax_model(np.asarray(ids), params=weights).logits)
    return got, expected


@pytest.mark.parametrize("scaling", [LLAMA3, {"rope_type": "linear", "factor": 4.0}], ids=["llama3", "linear"])
def test_scaled_rope_logits_equal_pytorch(tmp_path, scaling):
    torch_model = _tiny_llama(tmp_path, scaling, rope_theta=50000.0)
    ids = np.random.default_rng(0).integers(0, 256, size=(2, 200))
    got, expected = _logits_both(tmp_path, torch_model, ids)
    assert np.abs(got - expected).max() < 1e-4
    # The scaling matters at these positions: unscaled RoPE (what ftjax ran before) is far off.
    unscaled = tmp_path / "unscaled"
    _tiny_llama(unscaled, None, rope_theta=50000.0)
    got_unscaled, _ = _logits_both(unscaled, torch_model, ids)  # same weights (same seed), no scaling
    assert np.abs(got_unscaled - expected).max() > 1e-3


@pytest.mark.parametrize("scaling", [{"rope_type": "dynamic", "factor": 2.0},
                                     {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}])
def test_unimplemented_rope_scaling_is_refused_in_one_line(tmp_path, scaling):
    _tiny_llama(tmp_path, scaling)
    with pytest.raises(FtjaxError, match=f"rope_scaling type '{scaling['rope_type']}'.*not implemented") as err:
        models.load_model("FlaxAutoModelForCausalLM", ModelConfig(name_or_path=str(tmp_path)))
    assert "\n" not in str(err.value)
