"""barkgpt: train small GPT language models fast.

    import barkgpt
    result = barkgpt.train(preset="bark", steps=600)      # trains on the built-in bark corpus
    model = barkgpt.load(result.out_dir)                   # weights + config = the model
"""

from . import ops
from .checkpoint import CheckpointError, load
from .config import PRESETS, ConfigError, GPTConfig
from .data import DataError
from .model import BarkGPT
from .ops import BackendUnavailable
from .train import TrainConfig, TrainingError, TrainResult, train
from .sweep import SweepError, SweepResult, sweep

__version__ = "0.1.0"

__all__ = ["GPTConfig", "ConfigError", "PRESETS", "BarkGPT", "ops", "BackendUnavailable", "train",
           "TrainConfig", "TrainResult", "TrainingError", "load", "CheckpointError", "DataError",
           "sweep", "SweepResult", "SweepError", "__version__"]
