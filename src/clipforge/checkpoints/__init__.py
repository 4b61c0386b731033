"""Loading and saving weights: OpenAI's release files, torch.save state dicts, safetensors, and
clipforge's own directories. Nothing from a weights file is ever executed (see `safe_unpickle`).
"""

from clipforge.checkpoints.load import load, load_into, load_model, read_weights, resolve, save
from clipforge.checkpoints.openai import KNOWN_EXTRAS, infer_config
from clipforge.checkpoints.registry import PRETRAINED, available_pretrained, cache_dir, fetch
from clipforge.checkpoints.safe_unpickle import CheckpointError, UnsafeCheckpointError

__all__ = [
    "KNOWN_EXTRAS",
    "PRETRAINED",
    "CheckpointError",
    "UnsafeCheckpointError",
    "available_pretrained",
    "cache_dir",
    "fetch",
    "infer_config",
    "load",
    "load_into",
    "load_model",
    "read_weights",
    "resolve",
    "save",
]
