"""Kakao Brain's Karlo v1 alpha as a diffusers folder lays it out, configs only (no weights).

Each constant is the ``config.json`` (``scheduler_config.json``, ``preprocessor_config.json``,
``model_index.json``) of one component of ``kakaobrain/karlo-v1-alpha`` and its
image-variation sibling, as diffusers 0.42.1 and transformers' ``save_pretrained`` write them
for the sizes diffusers' Karlo conversion script builds (prior: ``PriorTransformer`` with its
default arguments; decoder: ``UNet2DConditionModel`` with ``SimpleCrossAttn`` blocks at
320/640/960/1280 channels; two ``UNet2DModel`` 64→256 super-resolution UNets; CLIP ViT-L/14's
text and image towers). They let unclip's converters be checked at Karlo's real sizes, and
its costs counted, without the weights (:func:`write_config_folder`; the tests build every
stage from them on the meta device, ``benchmarks/karlo_cost.py`` counts its FLOPs). The
files on the hub were written by older versions and may omit keys that hold defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unclip.interop.diffusers_prior import PRIOR_WRITTEN
from unclip.interop.diffusers_unet_configs import COND_FIXED, PLAIN_FIXED

DIFFUSERS_VERSION = "0.42.1"

#: prior/config.json: diffusers' PriorTransformer defaults (2048 wide, 20 layers, 32 heads)
PRIOR: dict[str, Any] = {
    "_class_name": "PriorTransformer",
    "_diffusers_version": DIFFUSERS_VERSION,
    "num_attention_heads": 32,
    "attention_head_dim": 64,
    "num_layers": 20,
    "embedding_dim": 768,
    "num_embeddings": 77,
    "additional_embeddings": 4,
    "dropout": 0.0,
    **PRIOR_WRITTEN,
}

#: decoder/config.json: the 64 px decoder
DECODER: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": DIFFUSERS_VERSION,
    **COND_FIXED,  # the options every converted decoder has (Karlo's among them)
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 6,  # epsilon and the learned variance interpolation
    "down_block_types": ["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3,
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "up_block_types": ["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"],
    "block_out_channels": [320, 640, 960, 1280],
    "layers_per_block": 3,
    "downsample_padding": 1,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "cross_attention_dim": 1536,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "attention_head_dim": 64,
    "use_linear_projection": False,
    "addition_time_embed_dim": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "scale_shift",
    "time_embedding_dim": None,
    "attention_type": "default",
    "addition_embed_type_num_heads": 64,
}

#: text_proj/config.json: z_i -> 4 extra context tokens and the time-embedding offset
TEXT_PROJ: dict[str, Any] = {
    "_class_name": "UnCLIPTextProjModel",
    "_diffusers_version": DIFFUSERS_VERSION,
    "clip_extra_context_tokens": 4,
    "clip_embeddings_dim": 768,
    "time_embed_dim": 4 * 320,
    "cross_attention_dim": 1536,
}

#: super_res_first/config.json and super_res_last/config.json (the same architecture)
SUPER_RES: dict[str, Any] = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": DIFFUSERS_VERSION,
    **PLAIN_FIXED,  # the options every converted super-res UNet has (Karlo's among them)
    "sample_size": 256,
    "in_channels": 6,  # the noisy 256 px image and the upsampled 64 px one
    "out_channels": 3,
    "time_embedding_dim": None,
    "down_block_types": ["ResnetDownsampleBlock2D"] * 4,
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["ResnetUpsampleBlock2D"] * 4,
    "block_out_channels": [320, 640, 960, 1280],
    "layers_per_block": 3,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "resnet_time_scale_shift": "default",
    "add_attention": False,
    "num_train_timesteps": None,
}

#: what CLIP ViT-L/14's text and image towers share in their config.json
_CLIP_TOWER: dict[str, Any] = {
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "attention_dropout": 0.0,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
}

#: text_encoder/config.json: CLIP ViT-L/14's text tower (``openai/clip-vit-large-patch14``,
#: whose legacy token ids bos 0 / eos 2 make transformers pool at the largest id, the end token)
TEXT_ENCODER: dict[str, Any] = {
    "architectures": ["CLIPTextModelWithProjection"],
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    **_CLIP_TOWER,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

#: image_encoder/config.json (image-variation layout): CLIP ViT-L/14's image tower
IMAGE_ENCODER: dict[str, Any] = {
    "architectures": ["CLIPVisionModelWithProjection"],
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 768,
    **_CLIP_TOWER,
}

#: feature_extractor/preprocessor_config.json (image-variation layout)
FEATURE_EXTRACTOR: dict[str, Any] = {
    "image_processor_type": "CLIPImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 224},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 224, "width": 224},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_convert_rgb": True,
}


def _scheduler(variance_type: str, prediction_type: str, clip_sample_range: float) -> dict:
    return {
        "_class_name": "UnCLIPScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": 1000,
        "variance_type": variance_type,
        "clip_sample": True,
        "clip_sample_range": clip_sample_range,
        "prediction_type": prediction_type,
        "beta_schedule": "squaredcos_cap_v2",
    }


#: the three scheduler_config.json files
PRIOR_SCHEDULER = _scheduler("fixed_small_log", "sample", 5.0)
DECODER_SCHEDULER = _scheduler("learned_range", "epsilon", 1.0)
SUPER_RES_SCHEDULER = _scheduler("fixed_small_log", "epsilon", 1.0)

_COMMON_INDEX: dict[str, list[str]] = {
    "decoder": ["diffusers", "UNet2DConditionModel"],
    "decoder_scheduler": ["diffusers", "UnCLIPScheduler"],
    "super_res_first": ["diffusers", "UNet2DModel"],
    "super_res_last": ["diffusers", "UNet2DModel"],
    "super_res_scheduler": ["diffusers", "UnCLIPScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_proj": ["diffusers", "UnCLIPTextProjModel"],  # the hub's older file: "unclip"
    "tokenizer": ["transformers", "CLIPTokenizer"],
}
#: model_index.json of the text-to-image folder (``UnCLIPPipeline``); also what unclip writes
#: (:func:`unclip.pipeline.diffusers_folder.write_diffusers_folder`) and reads it against
MODEL_INDEX: dict[str, Any] = {
    "_class_name": "UnCLIPPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    **_COMMON_INDEX,
    "prior": ["diffusers", "PriorTransformer"],
    "prior_scheduler": ["diffusers", "UnCLIPScheduler"],
}
#: model_index.json of the image-variation folder (``UnCLIPImageVariationPipeline``), as above
VARIATION_MODEL_INDEX: dict[str, Any] = {
    "_class_name": "UnCLIPImageVariationPipeline",
    "_diffusers_version": DIFFUSERS_VERSION,
    **_COMMON_INDEX,
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
    # transformers names CLIPImageProcessorPil where torchvision is missing; both are read
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
}


def config_files(variation: bool = False) -> dict[str, dict[str, Any]]:
    """Every config file of the folder, by its path in the folder (``"decoder/config.json"``
    ...); ``variation``: the image-variation layout (no prior; an image encoder)."""
    files: dict[str, dict[str, Any]] = {
        "model_index.json": VARIATION_MODEL_INDEX if variation else MODEL_INDEX,
        "text_encoder/config.json": TEXT_ENCODER,
        "decoder/config.json": DECODER,
        "text_proj/config.json": TEXT_PROJ,
        "super_res_first/config.json": SUPER_RES,
        "super_res_last/config.json": SUPER_RES,
        "decoder_scheduler/scheduler_config.json": DECODER_SCHEDULER,
        "super_res_scheduler/scheduler_config.json": SUPER_RES_SCHEDULER,
    }
    if variation:
        files["image_encoder/config.json"] = IMAGE_ENCODER
        files["feature_extractor/preprocessor_config.json"] = FEATURE_EXTRACTOR
    else:
        files["prior/config.json"] = PRIOR
        files["prior_scheduler/scheduler_config.json"] = PRIOR_SCHEDULER
    return files


def write_config_folder(folder: Path, variation: bool = False) -> Path:
    """Write Karlo's folder without weights or tokenizer files into ``folder`` (created):
    the config files of :func:`config_files` and an empty ``tokenizer/``. Returns ``folder``."""
    for name, doc in config_files(variation).items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    return folder
