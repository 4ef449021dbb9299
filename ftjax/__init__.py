"""ftjax: sharded JAX/Flax fine-tuning and pre-training of Hugging Face transformer models."""

from ftjax import compat
from ftjax.config import Config, load_config
from ftjax.errors import FtjaxError
from ftjax.step import TrainState, make_eval_step, make_train_step

__all__ = ["Config", "FtjaxError", "TrainState", "load_config", "make_eval_step", "make_train_step"]
__version__ = "0.1.0"

compat.install()  # transformers 4.57 Flax T5 on jax >= 0.10 (see ftjax/compat.py)
