"""clipforge: CLIP (Radford et al. 2021) — the paper's models, tokenizer, training and evaluation."""

from clipforge.models import CLIP, CLIPConfig, available_models, create_model

__version__ = "0.1.0"

__all__ = ["CLIP", "CLIPConfig", "available_models", "create_model"]
