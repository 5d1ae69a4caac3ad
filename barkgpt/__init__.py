"""barkgpt: train small GPT language models fast.

    import barkgpt
    result = barkgpt.train(preset="bark", steps=600)      # trains on the built-in bark corpus
    model = barkgpt.load(result.out_dir)                   # weights + config = the model
    gpt2 = barkgpt.load_hf("path/to/gpt2")                 # a local Hugging Face GPT-2 directory
"""

from . import ops
from .checkpoint import CheckpointError, load
from .config import PRESETS, ConfigError, GPTConfig
from .data import DataError
from .hf import HFFormatError, load_hf, save_hf
from .model import BarkGPT
from .ops import BackendUnavailable
from .train import TrainConfig, TrainingError, TrainResult, train
from .sweep import SweepError, SweepResult, sweep

__version__ = "0.1.0"

__all__ = ["GPTConfig", "ConfigError", "PRESETS", "BarkGPT", "ops", "BackendUnavailable", "train",
           "TrainConfig", "TrainResult", "TrainingError", "load", "CheckpointError", "DataError",
           "load_hf", "save_hf", "HFFormatError", "sweep", "SweepResult", "SweepError", "__version__"]
