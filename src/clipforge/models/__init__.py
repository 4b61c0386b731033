"""CLIP architectures: configs as data, and the modules they build."""

from clipforge.models.clip import CLIP, create_model
from clipforge.models.config import CLIPConfig, TextConfig, VisionConfig, available_models, get_config

__all__ = [
    "CLIP",
    "CLIPConfig",
    "TextConfig",
    "VisionConfig",
    "available_models",
    "create_model",
    "get_config",
]
