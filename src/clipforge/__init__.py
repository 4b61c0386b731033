"""clipforge: CLIP (Radford et al. 2021) — the paper's models, tokenizer, training and evaluation.

Start with `model, preprocess, tokenizer = clipforge.load("ViT-B-32")` (a release name, a file or a
directory), then `model.encode_image(preprocess(image)[None])` and `model.encode_text(tokenizer(texts))`:
the tokenizer gives the model's context length and only ids the model embeds.
"""

from clipforge.checkpoints import load, save
from clipforge.models import CLIP, CLIPConfig, available_models, create_model, for_inference, quantize_int8
from clipforge.tokenizer import get_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CLIP",
    "CLIPConfig",
    "available_models",
    "create_model",
    "for_inference",
    "get_tokenizer",
    "load",
    "quantize_int8",
    "save",
]
