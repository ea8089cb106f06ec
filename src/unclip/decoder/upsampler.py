"""The diffusion upsamplers of DALL·E 2 and their conditioning augmentation.

An upsampler is the decoder :class:`~unclip.decoder.unet.UNet` conditioned on a lower
resolution image, resized to the target size and concatenated to the input channels.
As in the paper (§2.1, Appendix C) it has no caption, no CLIP conditioning and no
attention by default, so it is fully convolutional and can be trained on crops.

Conditioning augmentation (Ho et al. 2021, "Cascaded Diffusion Models"; DALL·E 2 §2.1):
the low-resolution input is corrupted during training so the upsampler learns to fix the
artefacts of the stage before it. The paper's first upsampler blurs with a 3×3 Gaussian
kernel (σ 0.6); the second uses the BSR degradation of Zhang et al. 2021 — here a simpler
"BSR-like" chain without JPEG: random blur, random down/up resize, Gaussian noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from unclip.config import ConfigError
from unclip.decoder.unet import UNet, UNetConfig


@dataclass
class UpsamplerConfig(UNetConfig):
    """:class:`UNetConfig` with upsampler defaults, plus how training makes the low-res input.

    ``low_res_size``: side of the low-resolution input the stage before produces.
    ``augment``: corruption of the low-res input in training: ``"blur"`` (Gaussian,
    ``blur_kernel``/``blur_sigma``), ``"bsr"`` (:func:`bsr_degrade`) or ``"none"``.
    """

    type_name = "upsampler_unet"

    image_size: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    attention_resolutions: tuple[int, ...] = ()
    attention_mid: bool = False
    clip_dim: int = 0
    clip_tokens: int = 0
    text_dim: int = 0
    low_res_cond: bool = True
    low_res_size: int = 32
    augment: Literal["blur", "bsr", "none"] = "blur"
    blur_kernel: int = 3
    blur_sigma: float = 0.6

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.low_res_cond:
            raise ConfigError("an upsampler needs low_res_cond=true")
        if self.low_res_size < 1 or self.low_res_size > self.image_size:
            raise ConfigError(
                f"low_res_size must be in 1..image_size={self.image_size}, got {self.low_res_size}"
            )
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ConfigError(f"blur_kernel must be a positive odd number, got {self.blur_kernel}")
        if self.blur_sigma <= 0:
            raise ConfigError(f"blur_sigma must be positive, got {self.blur_sigma}")


class Upsampler(UNet):
    """A :class:`UNet` built from an :class:`UpsamplerConfig`; ``low_res`` is required.

    ``model(x, t, low_res=low)``: x: [N, C, H, W] noised high-res image, low: [N, C, h, w]
    -> [N, output_channels, H, W].
    """

    config_class = UpsamplerConfig


def gaussian_kernel1d(
    kernel_size: int,
    sigma: float | torch.Tensor,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Normalised 1-D Gaussian taps: sigma float -> [K]; sigma [N] tensor -> [N, K]."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    s = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    pos = torch.arange(kernel_size, dtype=torch.float32, device=s.device) - kernel_size // 2
    g = torch.exp(-(pos**2) / (2 * s[..., None].clamp_min(1e-6) ** 2))  # [..., K]
    return g / g.sum(dim=-1, keepdim=True)


def gaussian_blur(
    x: torch.Tensor, kernel_size: int = 3, sigma: float | torch.Tensor = 0.6
) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding: x: [N, C, H, W] -> [N, C, H, W].

    ``sigma``: one float, or a [N] tensor (one σ per image). The defaults are the paper's
    blur for the first upsampler's conditioning (kernel 3, σ 0.6).
    """
    n, c, h, w = x.shape
    pad = kernel_size // 2
    taps = gaussian_kernel1d(kernel_size, sigma, device=x.device).to(x.dtype)
    taps = taps.expand(n, kernel_size) if taps.ndim == 1 else taps  # [N, K]
    weight = taps.repeat_interleave(c, dim=0)  # [N*C, K], one filter per (image, channel)
    y = x.reshape(1, n * c, h, w)  # [1, N*C, H, W]: grouped conv gives each plane its filter
    y = F.pad(y, (pad, pad, pad, pad), mode="reflect" if min(h, w) > pad else "replicate")
    y = F.conv2d(y, weight[:, None, None, :], groups=n * c)  # horizontal pass
    y = F.conv2d(y, weight[:, None, :, None], groups=n * c)  # vertical pass
    return y.reshape(n, c, h, w)


def resize(x: torch.Tensor, size: int | tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """x: [N, C, H, W] -> [N, C, size, size] (or ``size`` = (h, w)), antialiased when shrinking."""
    size = (size, size) if isinstance(size, int) else size
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(
        x, size=size, mode=mode, align_corners=False, antialias=shrink and mode != "nearest"
    )


def _uniform(
    lo: float, hi: float, n: int, generator: torch.Generator | None, device
) -> torch.Tensor:
    u = torch.rand(n, generator=generator, device=generator.device if generator else device)
    return (lo + (hi - lo) * u).to(device)


def bsr_degrade(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    blur_sigma: tuple[float, float] = (0.2, 2.0),
    kernel_size: int = 7,
    scale: tuple[float, float] = (0.25, 1.0),
    noise_std: tuple[float, float] = (0.0, 0.1),
) -> torch.Tensor:
    """A BSR-like degradation (Zhang et al. 2021, simplified, no JPEG), per image:
    Gaussian blur with σ ~ U(blur_sigma), resize down by a factor ~ U(scale) and back
    (bilinear, bicubic or area at random), then Gaussian noise with std ~ U(noise_std);
    clamped to [-1, 1]. x: [N, C, h, w] in [-1, 1] -> [N, C, h, w].
    """
    n, _, h, w = x.shape
    device = x.device
    y = gaussian_blur(x.float(), kernel_size, _uniform(*blur_sigma, n, generator, device))
    factors = _uniform(*scale, n, generator, device).tolist()
    modes = torch.randint(
        0, 3, (n,), generator=generator, device=generator.device if generator else "cpu"
    ).tolist()
    rows = []
    for i in range(n):
        mode = ("bilinear", "bicubic", "area")[modes[i]]
        small = (max(1, round(h * factors[i])), max(1, round(w * factors[i])))
        rows.append(resize(resize(y[i : i + 1], small, mode), (h, w), mode="bicubic"))
    y = torch.cat(rows, dim=0)  # [N, C, h, w]
    std = _uniform(*noise_std, n, generator, device)[:, None, None, None]
    noise = torch.randn(
        y.shape, generator=generator, device=generator.device if generator else device
    ).to(device)
    return (y + std * noise).clamp(-1.0, 1.0).to(x.dtype)


def augment_low_res(
    low_res: torch.Tensor, config: UpsamplerConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The training corruption ``config.augment`` of a low-res input: [N, C, h, w] -> same."""
    if config.augment == "blur":
        return gaussian_blur(low_res, config.blur_kernel, config.blur_sigma)
    if config.augment == "bsr":
        return bsr_degrade(low_res, generator)
    return low_res


def make_low_res(
    images: torch.Tensor, config: UpsamplerConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The upsampler's training condition from target images: [N, C, H, W] ->
    [N, C, s, s] with s = ``config.low_res_size``·H/``config.image_size`` (so quarter-size crops
    get a matching quarter-size condition), antialiased bicubic downscale then
    :func:`augment_low_res`."""
    h, w = images.shape[-2:]
    size = (
        max(1, h * config.low_res_size // config.image_size),
        max(1, w * config.low_res_size // config.image_size),
    )
    low = resize(images, size, mode="bicubic").clamp(-1.0, 1.0)
    return augment_low_res(low, config, generator)
