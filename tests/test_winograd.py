"""Winograd F(4×4, 3×3) convolutions (unclip.decoder.winograd): the direct convolution's
outputs and gradients (exactly in float64, to rounding in float32), at any size and batch
chunking, only where the rule says, and inside the UNet's packed sampling path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_packed_conv import inputs, tiny_unet
from unclip.decoder import packed_conv, winograd
from unclip.decoder.blocks import Conv3x3, ResBlock
from unclip.decoder.packed_conv import packed_convolutions
from unclip.decoder.winograd import (
    WinogradConv3x3,
    Workspace,
    winograd_applies,
    winograd_conv3x3,
    winograd_weight,
)


def operands(n: int, c: int, h: int, w: int, co: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    weight = torch.randn(co, c, 3, 3, generator=g, dtype=dtype) / (9 * c) ** 0.5
    bias = torch.randn(co, generator=g, dtype=dtype)
    return x, weight, bias


@pytest.mark.parametrize(
    "shape",
    [(2, 5, 8, 8, 3), (1, 4, 7, 9, 6), (3, 2, 1, 5, 2), (2, 3, 12, 4, 4), (5, 6, 16, 16, 7)],
)
def test_forward_is_the_direct_convolution(shape, monkeypatch) -> None:
    monkeypatch.setattr(winograd, "TILE_BLOCK", 8)  # several batch chunks for the larger ones
    x, weight, bias = operands(*shape)
    want = F.conv2d(x, weight, bias, padding=1)
    got = winograd_conv3x3(x, winograd_weight(weight), bias)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    no_bias = winograd_conv3x3(x, winograd_weight(weight))
    torch.testing.assert_close(no_bias, want - bias.view(-1, 1, 1), rtol=1e-12, atol=1e-12)


def test_reused_plans_give_the_same_outputs_for_new_inputs() -> None:
    space = Workspace()
    x, weight, bias = operands(2, 4, 8, 8, 5)
    u = winograd_weight(weight)
    first = winograd_conv3x3(x, u, bias, space)
    small, w2, b2 = operands(1, 4, 4, 4, 3)
    other = winograd_conv3x3(small, winograd_weight(w2), b2, space)  # the same arena
    second = winograd_conv3x3(x * 2, u, bias, space)  # the same buffers, new values
    assert len(space.plans) == 2
    torch.testing.assert_close(other, F.conv2d(small, w2, b2, padding=1))
    torch.testing.assert_close(first, F.conv2d(x, weight, bias, padding=1))
    torch.testing.assert_close(second, F.conv2d(x * 2, weight, bias, padding=1))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_gradients_are_the_direct_convolutions(layout, monkeypatch) -> None:
    monkeypatch.setattr(winograd, "TILE_BLOCK", 4)
    x, weight, bias = operands(3, 4, 6, 10, 5, seed=1)
    x = x.contiguous(memory_format=layout).requires_grad_()
    weight.requires_grad_()
    bias.requires_grad_()
    y = WinogradConv3x3.apply(x, weight, bias)
    assert y.is_contiguous(memory_format=layout)
    want_y = F.conv2d(x, weight, bias, padding=1)
    dy = torch.randn_like(want_y)
    got = torch.autograd.grad(y, (x, weight, bias), dy)
    want = torch.autograd.grad(want_y, (x, weight, bias), dy)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-11)
    assert got[0].is_contiguous(memory_format=layout)


def test_float32_error_is_rounding() -> None:
    x, weight, bias = operands(2, 64, 16, 16, 64, dtype=torch.float32)
    want = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    got = winograd_conv3x3(x, winograd_weight(weight), bias).double()
    assert (got - want).abs().max() < 1e-4 * want.abs().max()
    assert (got - want).abs().max() > 0  # float32 really ran


def test_the_rule_takes_large_float32_cpu_convolutions_only(monkeypatch) -> None:
    big = nn.Conv2d(64, 64, 3, padding=1)
    x = torch.zeros(2, 64, 32, 32)
    assert winograd_applies(big, x)
    assert not winograd_applies(big, x[:, :, :4, :4])  # too few multiply-adds
    assert not winograd_applies(big, x.double())
    assert not winograd_applies(nn.Conv2d(64, 64, 3, padding=1, stride=2), x)
    assert not winograd_applies(nn.Conv2d(64, 64, 3, padding=2, dilation=2), x)
    assert not winograd_applies(nn.Conv2d(64, 64, 1), x)
    assert not winograd_applies(nn.Conv2d(64, 16, 3, padding=1), x)  # too few channels
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not winograd_applies(big, x)
    monkeypatch.setattr(winograd, "ENABLED", False)
    assert not winograd_applies(big, x)


def test_conv3x3_is_a_conv2d_that_trains_through_winograd(monkeypatch) -> None:
    monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
    monkeypatch.setattr(winograd, "MIN_MACS", 0)
    torch.manual_seed(0)
    conv = Conv3x3(6, 7)
    plain = nn.Conv2d(6, 7, 3, padding=1)
    assert conv.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, 6, 9, 8)
    calls = []
    monkeypatch.setattr(
        WinogradConv3x3, "apply", lambda *a: calls.append(1) or F.conv2d(*a, padding=1)
    )
    conv(x)
    assert calls  # the Winograd path was taken
    monkeypatch.undo()
    y, want = conv(x), plain(x)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    y.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(conv.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_unet_sampling_path_runs_winograd_with_the_same_outputs(layout, monkeypatch) -> None:
    model = tiny_unet().to(memory_format=layout)
    kw = inputs()
    x, t = kw.pop("x").contiguous(memory_format=layout), kw.pop("t")
    with torch.no_grad():
        want = model(x, t, **kw)
        monkeypatch.setattr(winograd, "MIN_CHANNELS", 1)
        monkeypatch.setattr(winograd, "MIN_MACS", 0)
        calls = {"winograd": 0, "phases": 0}

        def counted(name, real):
            def run(*args, **kwargs):
                calls[name] += 1
                return real(*args, **kwargs)

            return run

        for name, fn in (("winograd", "winograd_conv3x3"), ("phases", "interleave_phases")):
            real = getattr(packed_conv, fn)
            monkeypatch.setattr(packed_conv, fn, counted(name, real))
        with packed_convolutions(model):
            got = model(x, t, **kw)
            again = model(x, t, **kw)
    upsampled = sum(isinstance(m, ResBlock) and m.up for m in model.modules())
    assert upsampled > 0
    assert calls["phases"] == 2 * upsampled
    assert calls["winograd"] == 2 * (
        sum(isinstance(m, Conv3x3) for m in model.modules()) - upsampled
    )
    if layout == torch.channels_last:  # the pipeline's layout is kept
        assert got.is_contiguous(memory_format=layout)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, got)
