"""Hugging Face checkpoints in and out: one adapter per model family (`widemoe.hf.families`: config
mapping, key mapping, layouts), and generic pipelines that call it: strict loading (`loader`, with the
accounting in `plan`), sharded saving (`saver`), streaming conversion (`convert`) and `inspect`.
FP8/FP4 dequantisation in `fp8` / `fp4`, safetensors I/O in `safetensors_io`. See loader.py and
saver.py for the guarantees (strict accounting, bounded memory, safetensors only). Every refusal to load
is a `LoadError` (a `ValueError`); `DamagedCheckpointError`, one of them, names a missing or truncated
weight file."""

from widemoe.hf.convert import ConvertSummary, convert_checkpoint
from widemoe.hf.errors import DamagedCheckpointError, LoadError, PickleCheckpointError
from widemoe.hf.inspect import Inspection, inspect_checkpoint
from widemoe.hf.loader import load_into, load_pretrained
from widemoe.hf.plan import LoadReport
from widemoe.hf.registry import (
    adapter_for_config,
    adapter_for_hf,
    detect_family,
    family_names,
    hf_to_model_config,
    model_config_to_hf,
)
from widemoe.hf.saver import hf_tensors, save_pretrained

FAMILIES = family_names()

__all__ = [
    "FAMILIES",
    "ConvertSummary",
    "DamagedCheckpointError",
    "Inspection",
    "LoadError",
    "LoadReport",
    "PickleCheckpointError",
    "adapter_for_config",
    "adapter_for_hf",
    "convert_checkpoint",
    "detect_family",
    "hf_tensors",
    "hf_to_model_config",
    "inspect_checkpoint",
    "load_into",
    "load_pretrained",
    "model_config_to_hf",
    "save_pretrained",
]
