"""widemoe: fine-grained sparse Mixture-of-Experts language models, from a laptop CPU to a GPU cluster."""

from widemoe.config import ConfigError, ModelConfig
from widemoe.presets import PRESET_NAMES, get_preset

__version__ = "0.1.0"

__all__ = ["ConfigError", "ModelConfig", "PRESET_NAMES", "get_preset", "__version__"]
