"""CLIP (Radford et al. 2021, arXiv 2103.00020): a text Transformer and an image encoder
(ViT or modified ResNet) trained with a symmetric contrastive loss into one joint space.

Text encoder (§2.4): token + learned position embeddings, a causal-masked pre-LN
Transformer, a final layer norm, and the feature at the end token projected linearly.
Image encoders (§2.4): a ViT with a class token and an extra layer norm before the
Transformer; or the modified ResNet (three-conv stem with an average pool, anti-aliased
strided convolutions (an average pool before each strided step), attention pooling).

Pixels given to :meth:`CLIP.encode_image` are ``[N, 3, image_size, image_size]`` images in
``[0, 1]`` normalised per channel with ``config.image_mean``/``image_std`` (OpenAI's values by
default). The rest of unclip uses images in ``[-1, 1]``: :meth:`CLIP.preprocess` maps those
(any size) to the model's input.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from unclip.config import Config
from unclip.nn import Attention, attention, normal_parameter

if TYPE_CHECKING:
    from unclip.tokenizer import Tokenizer

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LOGIT_SCALE = math.log(100.0)  # the temperature is clamped so logits scale at most 100


@dataclass
class CLIPConfig(Config):
    """A CLIP model. ``vision_type`` picks the image encoder.

    ViT: ``image_size`` / ``patch_size`` patches of width ``vision_width``, ``vision_layers``
    blocks with ``vision_heads`` heads. ResNet: stem width ``vision_width``, ``resnet_layers``
    bottleneck blocks per stage (final channels ``32 * vision_width``), attention pooling with
    ``vision_heads`` heads; ``image_size`` must be a multiple of 32.
    ``*_mlp_dim`` default to 4 × width. ``eot_token_id`` None pools the text at the largest id
    (the end token in CLIP's vocabulary layout), otherwise at its first occurrence.
    ``vision_type="none"``: a text encoder alone (such as the ``text_encoder/`` of a diffusers
    unCLIP folder); :meth:`CLIP.encode_image` then raises.
    """

    type_name = "clip"
    embed_dim: int = 256
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 256
    text_layers: int = 4
    text_heads: int = 4
    text_mlp_dim: int | None = None
    vision_type: Literal["vit", "resnet", "none"] = "vit"
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 256
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp_dim: int | None = None
    resnet_layers: tuple[int, int, int, int] = (2, 2, 2, 2)
    activation: Literal["gelu", "quick_gelu"] = "gelu"
    layer_norm_eps: float = 1e-5
    eot_token_id: int | None = None
    logit_scale_init: float = math.log(1 / 0.07)
    image_mean: tuple[float, float, float] = OPENAI_MEAN
    image_std: tuple[float, float, float] = OPENAI_STD

    def __post_init__(self) -> None:
        positive = {
            "embed_dim": self.embed_dim,
            "context_length": self.context_length,
            "vocab_size": self.vocab_size,
            "text_width": self.text_width,
            "text_layers": self.text_layers,
            "text_heads": self.text_heads,
            "image_size": self.image_size,
            "vision_width": self.vision_width,
            "vision_heads": self.vision_heads,
        }
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key} must be positive, got {value}")
        if self.text_width % self.text_heads:
            raise ValueError(
                f"text_width {self.text_width} is not divisible by text_heads {self.text_heads}"
            )
        if self.vision_type == "vit":
            if self.patch_size < 1 or self.image_size % self.patch_size:
                raise ValueError(
                    f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
                )
            if self.vision_width % self.vision_heads:
                raise ValueError(
                    f"vision_width {self.vision_width} is not divisible by vision_heads "
                    f"{self.vision_heads}"
                )
        elif self.vision_type == "resnet":
            if self.image_size % 32:
                raise ValueError(
                    f"a ResNet needs image_size a multiple of 32, got {self.image_size}"
                )
            if self.vision_width % 2 or (32 * self.vision_width) % self.vision_heads:
                raise ValueError(
                    f"a ResNet needs an even vision_width with 32 * vision_width divisible by "
                    f"vision_heads (got {self.vision_width}, {self.vision_heads})"
                )
            if any(n < 1 for n in self.resnet_layers):
                raise ValueError(f"resnet_layers must be positive, got {self.resnet_layers}")
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"image_std must be positive, got {self.image_std}")


class QuickGELU(nn.Module):
    """x · sigmoid(1.702 x), the GELU approximation of the released CLIP models."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _activation(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class ResidualAttentionBlock(nn.Module):
    """Pre-LN Transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)). x: [N, L, width]."""

    def __init__(self, width: int, heads: int, mlp_dim: int, activation: str, eps: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, mlp_dim),
                act=_activation(activation),
                c_proj=nn.Linear(mlp_dim, width),
            )
        )

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of :class:`ResidualAttentionBlock`. x: [N, L, width] -> [N, L, width]."""

    def __init__(
        self, width: int, layers: int, heads: int, mlp_dim: int, activation: str, eps: float
    ) -> None:
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_dim, activation, eps) for _ in range(layers)
        )

    @classmethod
    def of_tower(cls, config: CLIPConfig, tower: Literal["text", "vision"]) -> Transformer:
        """The Transformer of one tower, sized by its config fields ``{tower}_width``,
        ``{tower}_layers``, ``{tower}_heads`` and ``{tower}_mlp_dim`` (None: 4 × width)."""
        width = getattr(config, f"{tower}_width")
        return cls(
            width, getattr(config, f"{tower}_layers"), getattr(config, f"{tower}_heads"),
            getattr(config, f"{tower}_mlp_dim") or 4 * width, config.activation,
            config.layer_norm_eps,
        )  # fmt: skip

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, causal=causal)
        return x

    def init_weights(self) -> None:
        """OpenAI CLIP's scheme: std width^-0.5 for attention inputs, smaller for outputs."""
        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


class VisionTransformer(nn.Module):
    """ViT image encoder. pixels: [N, 3, S, S] -> features [N, embed_dim] (not normalised).

    Patches ([N, width, S/p, S/p] from a strided convolution) and a learned class token get
    learned position embeddings, a layer norm, the Transformer, a layer norm on the class
    token, and a linear projection.
    """

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        width, eps = config.vision_width, config.layer_norm_eps
        grid = config.image_size // config.patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width, eps=eps)
        self.transformer = Transformer.of_tower(config, "vision")
        self.ln_post = nn.LayerNorm(width, eps=eps)
        self.proj = nn.Linear(width, config.embed_dim, bias=False)
        self.transformer.init_weights()
        nn.init.normal_(self.proj.weight, std=scale)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels)  # [N, W, g, g]
        x = x.flatten(2).transpose(1, 2)  # [N, g*g, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [N, 1, W]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [N, 1+g*g, W]
        x = self.transformer(self.ln_pre(x))
        return self.proj(self.ln_post(x[:, 0]))  # [N, embed_dim]


class Bottleneck(nn.Module):
    """ResNet bottleneck (1×1, 3×3, 1×1, expansion 4) with anti-aliased striding: the 3×3
    convolution keeps stride 1 and an average pool of size ``stride`` follows it (and precedes
    the 1×1 convolution of the shortcut). x: [N, C_in, H, W] -> [N, 4·planes, H/s, W/s]."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != out:
            self.downsample = nn.Sequential(
                OrderedDict(
                    pool=nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
                    conv=nn.Conv2d(inplanes, out, 1, bias=False),
                    bn=nn.BatchNorm2d(out),
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(self.avgpool(y)))
        return F.relu(y + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling: the mean feature queries all positions (itself included), with
    learned position embeddings. x: [N, C, H, W] -> [N, output_dim]."""

    def __init__(self, spatial: int, channels: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.positional_embedding = normal_parameter(
            spatial * spatial + 1, channels, std=channels**-0.5
        )
        self.q_proj = nn.Linear(channels, channels)
        self.k_proj = nn.Linear(channels, channels)
        self.v_proj = nn.Linear(channels, channels)
        self.c_proj = nn.Linear(channels, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # [N, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [N, 1+HW, C]
        x = x + self.positional_embedding.to(x.dtype)
        q = self.q_proj(x[:, :1])  # [N, 1, C]
        out = attention(q, self.k_proj(x), self.v_proj(x), self.heads)  # [N, 1, C]
        return self.c_proj(out[:, 0])


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image encoder. pixels: [N, 3, S, S] -> features [N, embed_dim]."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        width = config.vision_width
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        stages = []
        for i, blocks in enumerate(config.resnet_layers):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            layer = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            layer += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool2d(
            config.image_size // 32, inplanes, config.vision_heads, config.embed_dim
        )
        std = self.attnpool.c_proj.in_features**-0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj):
            nn.init.normal_(proj.weight, std=std)
        nn.init.normal_(self.attnpool.c_proj.weight, std=std)
        for stage in stages:
            for block in stage:
                nn.init.zeros_(block.bn3.weight)  # each residual branch starts as identity

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(pixels)))  # [N, W/2, S/2, S/2]
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))  # [N, W, S/2, S/2]
        x = self.avgpool(x)  # [N, W, S/4, S/4]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [N, 32W, S/32, S/32]
        return self.attnpool(x)


def clamped_logit_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """exp(min(logit_scale, ln 100)), with the gradient passed straight through the clamp so
    a parameter above the cap can still come back down."""
    excess = (logit_scale - MAX_LOGIT_SCALE).clamp(min=0).detach()
    return (logit_scale - excess).exp()


class CLIP(nn.Module):
    """Text and image encoders into one ``embed_dim`` space (see the module docstring).

    tokens: [N, context_length] long (start, text, end, zero padding); pixels: [N, 3, S, S]
    normalised with ``config.image_mean``/``image_std``.
    """

    config_class = CLIPConfig

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        width, eps = config.text_width, config.layer_norm_eps
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, width))
        self.transformer = Transformer.of_tower(config, "text")
        self.ln_final = nn.LayerNorm(width, eps=eps)
        self.text_projection = nn.Linear(width, config.embed_dim, bias=False)
        self.visual: nn.Module | None = None
        if config.vision_type == "vit":
            self.visual = VisionTransformer(config)
        elif config.vision_type == "resnet":
            self.visual = ModifiedResNet(config)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.register_buffer(
            "image_mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "image_std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False
        )
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_weights()
        nn.init.normal_(self.text_projection.weight, std=width**-0.5)

    # ------------------------------------------------------------------ text

    def encode_text_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token text states after the final layer norm: [N, L] long -> [N, L, text_width]."""
        length = tokens.shape[1]
        if length > self.config.context_length:
            raise ValueError(
                f"tokens have length {length}, the model's context is {self.config.context_length}"
            )
        x = self.token_embedding(tokens) + self.positional_embedding[:length]  # [N, L, W]
        return self.ln_final(self.transformer(x, causal=True))

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Where each row's text feature is read: [N, L] -> [N] long."""
        if self.config.eot_token_id is None:
            return tokens.argmax(dim=-1)  # the end token has the largest id; first if repeated
        return (tokens == self.config.eot_token_id).int().argmax(dim=-1)

    def _project_text(self, states: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The end-token state of each row, projected: [N, L, W], [N] -> [N, embed_dim]."""
        return self.text_projection(
            states[torch.arange(states.shape[0], device=states.device), pos]
        )

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Text embeddings: tokens [N, L] long -> [N, embed_dim], L2-normalised by default."""
        x = self._project_text(self.encode_text_tokens(tokens), self.eot_positions(tokens))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text_condition(
        self, tokens: torch.Tensor, normalize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the prior and the decoder are conditioned on, from one pass of the encoder:
        tokens [N, L] -> (z_t [N, embed_dim] L2-normalised (unless ``normalize=False``),
        per-token states [N, L, W], mask [N, L] bool, True up to and including the end token)."""
        states = self.encode_text_tokens(tokens)  # [N, L, W]
        pos = self.eot_positions(tokens)  # [N]
        z_t = self._project_text(states, pos)
        z_t = F.normalize(z_t, dim=-1) if normalize else z_t
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None] <= pos[:, None]
        return z_t, states, mask

    # ------------------------------------------------------------------ images

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image embeddings: pixels [N, 3, S, S] (model normalisation, see :meth:`preprocess`)
        -> [N, embed_dim], L2-normalised by default."""
        if self.visual is None:
            raise ValueError("this CLIP model is a text encoder alone: it has no image encoder")
        size = self.config.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[-2:] != (size, size):
            raise ValueError(f"pixels must be [N, 3, {size}, {size}], got {tuple(pixels.shape)}")
        x = self.visual(pixels.to(self.logit_scale.dtype))
        return F.normalize(x, dim=-1) if normalize else x

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] in [-1, 1] -> model pixels [N, 3, S, S].

        Resizes the shorter side to ``image_size`` (bicubic, anti-aliased), centre-crops,
        maps to [0, 1] and normalises with ``image_mean``/``image_std``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        size = self.config.image_size
        x = images.float()
        h, w = x.shape[-2:]
        if (h, w) != (size, size):
            scale = size / min(h, w)
            nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
            top, left = (nh - size) // 2, (nw - size) // 2
            x = x[..., top : top + size, left : left + size]
        x = ((x + 1) / 2).clamp(0, 1)
        return (x - self.image_mean.float()) / self.image_std.float()

    # ------------------------------------------------------------------ both

    def logit_scale_value(self) -> torch.Tensor:
        """The inverse temperature exp(logit_scale), capped at 100 (a 0-d tensor)."""
        return clamped_logit_scale(self.logit_scale)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the parameter itself into [0, ln 100] (call after an optimizer step)."""
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def forward(
        self, pixels: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image features [N, D], text features [N, D], logit scale []) for the loss."""
        return self.encode_image(pixels), self.encode_text(tokens), self.logit_scale_value()

    @staticmethod
    def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarities of features a: [N, D] and b: [M, D] -> [N, M]."""
        return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T

    @torch.no_grad()
    def classify(
        self,
        pixels: torch.Tensor,
        labels: Sequence[str],
        tokenizer: Tokenizer,
        template: str = "{}",
    ) -> torch.Tensor:
        """Zero-shot classification (§3.1.2): probabilities [N, len(labels)].

        Each label becomes the caption ``template.format(label)``; the probabilities are the
        softmax over labels of the scaled cosine similarity with each image.
        pixels: [N, 3, S, S] as for :meth:`encode_image`.
        """
        if not labels:
            raise ValueError("classify needs at least one label")
        if "{}" not in template:
            raise ValueError(f"template must contain '{{}}' for the label, got {template!r}")
        device = self.logit_scale.device
        tokens = tokenizer([template.format(label) for label in labels], self.config.context_length)
        text = self.encode_text(tokens.to(device))  # [L, D]
        image = self.encode_image(pixels.to(device))  # [N, D]
        logits = self.logit_scale_value().float() * self.similarity(image, text)
        return logits.softmax(dim=-1)
