"""Convolutions with weights packed for oneDNN within a sampling run (unclip.decoder.packed_conv):
the same outputs as the module's own forward, packing only without autograd, and the
modules restored on exit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from unclip.decoder import UNet, UNetConfig
from unclip.decoder.packed_conv import (
    packed_convolutions,
    packed_forward_count,
    packing_available,
)

needs_onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN"
)


def tiny_unet() -> UNet:
    torch.manual_seed(0)
    cfg = UNetConfig(image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(8,), num_head_channels=8, clip_dim=12, text_dim=10)  # fmt: skip
    model = UNet(cfg).eval()
    with torch.no_grad():  # the zero-initialised output convs would hide a wrong packing
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, 0.1)
    return model


def inputs(n: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(n, 3, 16, 16, generator=g),
        "t": torch.tensor([10, 500][:n]),
        "image_emb": torch.randn(n, 12, generator=g),
        "text_tokens": torch.randn(n, 5, 10, generator=g),
    }


@needs_onednn
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_packed_unet_matches_plain_forward(layout: torch.memory_format) -> None:
    model = tiny_unet().to(memory_format=layout)
    kw = inputs()
    x, t = kw.pop("x").contiguous(memory_format=layout), kw.pop("t")
    with torch.no_grad():
        want = model(x, t, **kw)
        with model.frozen_weights():
            assert packed_forward_count(model) == sum(
                isinstance(m, nn.Conv2d) for m in model.modules()
            )
            got = model(x, t, **kw)
            again = model(x, t, **kw)  # the packed weights are reused
    assert packed_forward_count(model) == 0  # restored on exit
    assert want.abs().max() > 0.1
    # float32 rounding: oneDNN's and ATen's kernels sum in other orders (without AVX, 1.2e-5
    # at one of 1536 outputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(again, got)


@needs_onednn
def test_packed_conv_under_bf16_autocast_matches_autocast_conv() -> None:
    conv = nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 8, 8).to(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = conv(x)
        with packed_convolutions(conv):
            got = conv(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@needs_onednn
def test_autograd_and_other_precisions_take_the_module_forward() -> None:
    conv = nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 6, 6)
    with packed_convolutions(conv):
        assert packed_forward_count(conv) == 1
        y = conv(x)  # grad mode, weights need grad: the module's own forward
        y.sum().backward()
        with torch.no_grad():
            packed = conv(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):  # packed again, or the plain conv
                low = conv(x)
    assert conv.weight.grad is not None
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(packed, y.detach(), rtol=1e-4, atol=1e-5)
    assert not packing_available(nn.Linear(2, 2).to(torch.float64))


@needs_onednn
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_upsampling_convolutions_run_at_low_resolution_packed_or_not(layout, monkeypatch) -> None:
    from unclip.decoder import packed_conv
    from unclip.decoder.blocks import ResBlock, Upsample

    torch.manual_seed(0)
    # 6 input channels: a multiple of no vector width, so Winograd never takes these
    block, up = ResBlock(6, 4, 12, up=True, groups=2), Upsample(6, True, 12)
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=layout)
    calls = []
    real = packed_conv.interleave_phases
    monkeypatch.setattr(packed_conv, "interleave_phases", lambda *a: calls.append(1) or real(*a))
    for conv in (block.in_conv, up.conv):
        ref = nn.functional.conv2d(
            nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"),
            conv.weight, conv.bias, padding=1,
        )  # fmt: skip
        with torch.no_grad():
            plain = conv.upsampled(x)
            with packed_convolutions(conv):
                packed = conv.upsampled(x)
                again = conv.upsampled(x)
        torch.testing.assert_close(plain, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again, packed)
        assert packed.is_contiguous(memory_format=layout)
    assert len(calls) == 4  # the packed route ran (twice per conv)
    with torch.no_grad():
        want = up.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
        torch.testing.assert_close(up(x), want, rtol=1e-5, atol=1e-5)


def test_a_residual_that_records_autograd_is_added_outside_the_kernels() -> None:
    """Conv3x3.plus inside a packing context with grad on and a residual that needs it: the
    eager sum, so the residual's gradient is kept."""
    from unclip.decoder.blocks import Conv3x3

    conv = Conv3x3(16, 16).requires_grad_(False).to(memory_format=torch.channels_last)
    x = torch.randn(1, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(1, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    residual.requires_grad_()
    with packed_convolutions(conv):
        y = conv.plus(x, residual)
    y.sum().backward()
    assert residual.grad is not None and torch.equal(residual.grad, torch.ones_like(residual))
