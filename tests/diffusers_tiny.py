"""Tiny random diffusers unCLIP folders (Karlo's layout), written with ``save_pretrained``.

Nothing comes from the hub: the tokenizer is unclip's tiny learnt one written as a
``CLIPTokenizer`` (vocab.json + merges.txt), every model is built from a small config of our
own, and the parameters diffusers initialises to zero (positional embeddings, the prd token,
``clip_std``, the learned guidance embedding, output convolutions) get random values, so
every output depends on every input.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from unclip.tokenizer import train_tokenizer

CAPTIONS = [
    "a red square", "a green circle", "a blue square", "a black circle", "a red apple",
    "a yellow star", "a smiling face", "a horse in the snow",
]  # fmt: skip
WIDTH = 32  # text width = CLIP embedding width = the prior's embedding_dim (as Karlo: 768)
CONTEXT = 77  # the prior's num_embeddings; Karlo's tokenizer length
BASE, SUPER = 16, 32  # decoder and super-resolution sizes (Karlo: 64 and 256)
CHANNELS = 16  # decoder / super-res block_out_channels[0]
CROSS = 24  # decoder cross_attention_dim
CLIP_IMAGE = 32  # the image encoder's input size


def randomize(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Give every all-zero parameter random values (``clip_std`` positive)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if torch.all(p == 0):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            if name.endswith("clip_std"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def write_tokenizer(folder: Path) -> None:
    """unclip's tiny CLIP-layout BPE, saved as a transformers ``CLIPTokenizer``."""
    from transformers import CLIPTokenizer

    tok = train_tokenizer(CAPTIONS * 4, 600, context_length=CONTEXT)
    vocab = tok.get_vocab()
    merges = json.loads(tok._tok.to_str())["model"]["merges"]
    raw = folder.parent / f".{folder.name}-raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = [" ".join(m) if isinstance(m, list) else m for m in merges]
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", encoding="utf-8")
    hf = CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), model_max_length=CONTEXT)
    hf.save_pretrained(folder)


def text_encoder(seed: int = 1):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=600, hidden_size=WIDTH, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CONTEXT, projection_dim=WIDTH,
        hidden_act="quick_gelu", bos_token_id=561, eos_token_id=562, pad_token_id=562,
    )  # fmt: skip
    return CLIPTextModelWithProjection(cfg).eval()


def image_encoder(seed: int = 2):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(
        hidden_size=WIDTH, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=CLIP_IMAGE, patch_size=8, projection_dim=WIDTH, hidden_act="quick_gelu",
    )  # fmt: skip
    return CLIPVisionModelWithProjection(cfg).eval()


def feature_extractor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        crop_size={"height": CLIP_IMAGE, "width": CLIP_IMAGE},
        size={"shortest_edge": CLIP_IMAGE},
    )


def prior(seed: int = 3):
    from diffusers import PriorTransformer

    torch.manual_seed(seed)
    model = PriorTransformer(
        num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=WIDTH,
        num_embeddings=CONTEXT, additional_embeddings=4,
    )  # fmt: skip
    return randomize(model, seed).eval()


def text_proj(seed: int = 4):
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    torch.manual_seed(seed)
    model = UnCLIPTextProjModel(
        clip_extra_context_tokens=4, clip_embeddings_dim=WIDTH, time_embed_dim=CHANNELS * 4,
        cross_attention_dim=CROSS,
    )  # fmt: skip
    return randomize(model, seed).eval()


def decoder(seed: int = 5):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(
        sample_size=BASE, in_channels=3, out_channels=6,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(CHANNELS, CHANNELS * 2), layers_per_block=1,
        cross_attention_dim=CROSS, attention_head_dim=8, norm_num_groups=8,
        resnet_time_scale_shift="scale_shift", class_embed_type="identity",
    )  # fmt: skip
    return randomize(model, seed).eval()


def super_res(seed: int):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel(
        sample_size=SUPER, in_channels=6, out_channels=3, layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
        up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
        block_out_channels=(CHANNELS, CHANNELS * 2), norm_num_groups=8, add_attention=False,
    )  # fmt: skip
    return randomize(model, seed).eval()


def schedulers() -> dict:
    from diffusers import UnCLIPScheduler

    return {
        "prior_scheduler": UnCLIPScheduler(
            variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0
        ),
        "decoder_scheduler": UnCLIPScheduler(variance_type="learned_range"),
        "super_res_scheduler": UnCLIPScheduler(variance_type="fixed_small_log"),
    }


def unclip_pipeline(folder: Path | None = None):
    """A tiny random ``UnCLIPPipeline`` (text to image), saved to ``folder`` when given."""
    from diffusers import UnCLIPPipeline
    from transformers import CLIPTokenizer

    tok_dir = (folder or Path("/tmp")).parent / ".tiny-tokenizer"
    write_tokenizer(tok_dir)
    sch = schedulers()
    pipe = UnCLIPPipeline(
        prior=prior(), decoder=decoder(), text_encoder=text_encoder(),
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir), text_proj=text_proj(),
        super_res_first=super_res(6), super_res_last=super_res(7), **sch,
    )  # fmt: skip
    if folder is not None:
        pipe.save_pretrained(folder)
    return pipe


def variation_pipeline(folder: Path | None = None):
    """A tiny random ``UnCLIPImageVariationPipeline``, saved to ``folder`` when given."""
    from diffusers import UnCLIPImageVariationPipeline
    from transformers import CLIPTokenizer

    tok_dir = (folder or Path("/tmp")).parent / ".tiny-tokenizer"
    write_tokenizer(tok_dir)
    sch = schedulers()
    pipe = UnCLIPImageVariationPipeline(
        decoder=decoder(), text_encoder=text_encoder(),
        tokenizer=CLIPTokenizer.from_pretrained(tok_dir), text_proj=text_proj(),
        feature_extractor=feature_extractor(), image_encoder=image_encoder(),
        super_res_first=super_res(6), super_res_last=super_res(7),
        decoder_scheduler=sch["decoder_scheduler"], super_res_scheduler=sch["super_res_scheduler"],
    )  # fmt: skip
    if folder is not None:
        pipe.save_pretrained(folder)
    return pipe


def load_reference(folder: Path):
    """diffusers' own pipeline read from ``folder``, component by component (diffusers
    0.42 cannot resolve ``UnCLIPTextProjModel`` from a model_index.json by itself)."""
    import diffusers
    import transformers
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    index = json.loads((folder / "model_index.json").read_text())
    parts = {}
    for name, (_, cls) in ((k, v) for k, v in index.items() if not k.startswith("_")):
        if cls == "UnCLIPTextProjModel":
            parts[name] = UnCLIPTextProjModel.from_pretrained(folder / name)
        elif hasattr(transformers, cls) and name in ("text_encoder", "image_encoder"):
            parts[name] = getattr(transformers, cls).from_pretrained(folder / name).eval()
        elif hasattr(transformers, cls):
            parts[name] = getattr(transformers, cls).from_pretrained(folder / name)
        else:
            parts[name] = getattr(diffusers, cls).from_pretrained(folder / name)
    pipe = getattr(diffusers, index["_class_name"])(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe
