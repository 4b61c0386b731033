"""CLIP architectures: configs as data, and the modules they build."""

from clipforge.models.clip import CLIP, create_model
from clipforge.models.config import CLIPConfig, TextConfig, VisionConfig, available_models, get_config
from clipforge.models.inference import for_inference
from clipforge.models.int8 import quantize_int8

__all__ = [
    "CLIP",
    "CLIPConfig",
    "TextConfig",
    "VisionConfig",
    "available_models",
    "create_model",
    "for_inference",
    "get_config",
    "quantize_int8",
]
