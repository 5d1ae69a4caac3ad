"""barkgpt: train small GPT language models fast."""

from .config import GPTConfig, ConfigError, PRESETS
from . import ops
from .ops import BackendUnavailable

__version__ = "0.1.0"

__all__ = ["GPTConfig", "ConfigError", "PRESETS", "ops", "BackendUnavailable", "__version__"]
