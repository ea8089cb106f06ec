"""The CLIP stage: text and image encoders in one embedding space (Radford et al. 2021).

``CLIP``/``CLIPConfig`` are the model, ``clip_loss`` its contrastive loss and ``load_clip``
reads unclip, transformers and original OpenAI weights; ``TextEncoder`` turns captions
into the prior's and decoder's text condition.
"""

from __future__ import annotations

from unclip.clip.convert import load_clip, to_openai_state_dict
from unclip.clip.loss import clip_loss, clip_training_loss, gather_features
from unclip.clip.model import CLIP, CLIPConfig
from unclip.clip.text import TextEncoder, clip_tokenizer_dir

__all__ = [
    "CLIP",
    "CLIPConfig",
    "TextEncoder",
    "clip_loss",
    "clip_tokenizer_dir",
    "clip_training_loss",
    "gather_features",
    "load_clip",
    "to_openai_state_dict",
]
