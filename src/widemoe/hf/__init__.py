"""Hugging Face checkpoints in and out: config mapping, key mapping, FP8 dequantisation, strict loading,
sharded saving. See loader.py and saver.py for the guarantees (strict accounting, bounded memory,
safetensors only)."""

from widemoe.hf.config_map import FAMILIES, detect_family, hf_to_model_config, model_config_to_hf
from widemoe.hf.loader import LoadError, LoadReport, PickleCheckpointError, load_into, load_pretrained
from widemoe.hf.saver import save_pretrained

__all__ = [
    "FAMILIES",
    "LoadError",
    "LoadReport",
    "PickleCheckpointError",
    "detect_family",
    "hf_to_model_config",
    "load_into",
    "load_pretrained",
    "model_config_to_hf",
    "save_pretrained",
]
