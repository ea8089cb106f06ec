"""Winograd F(4×4, 3×3) convolution (unclip.decoder.winograd) and its use in sampling runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compiled import compiled
from unclip import native
from unclip.decoder import UNet, UNetConfig, winograd
from unclip.decoder.blocks import Conv3x3

LANES = 16  # channel counts below are multiples of every vector width (4, 8, 16)


def direct(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The padding-1 convolution in float64."""
    return F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal to Winograd's float32 rounding: a few 1e-6 of the output's scale."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = (got.double() - want).abs().max() / want.abs().max()
    assert err < 2e-5, f"relative error {err:.2e}"


@compiled
def test_the_kernels_are_built_here() -> None:
    assert winograd.available()


@compiled
@pytest.mark.parametrize(
    ("n", "c", "k", "h", "w"),
    [
        (2, 16, 32, 8, 8),
        (1, 32, 16, 5, 7),
        (3, 16, 16, 9, 4),
        (2, 16, 16, 1, 1),
        (1, 48, 32, 32, 32),
    ],
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_equals_the_direct_convolution(
    n: int, c: int, k: int, h: int, w: int, with_bias: bool
) -> None:
    g = torch.Generator().manual_seed(n * 100 + h)
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(k, c, 3, 3, generator=g), torch.randn(k, generator=g)
    b = bias if with_bias else None
    y = winograd.winograd_conv(x, winograd.prepare(weight, b))
    assert y.is_contiguous(memory_format=torch.channels_last)
    close(y, direct(x, weight, b))


@compiled
@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize(
    ("n", "c", "k", "h", "w"),
    [
        (1, 16, 48, 4, 4),  # one tile: its output channels split among the threads
        (2, 16, 80, 20, 20),  # 50 tiles: blocks of several sizes, rows past the last full six
        (1, 32, 16, 3, 30),  # one vector of output channels
    ],
)
def test_every_split_of_tiles_and_channels(
    n: int, c: int, k: int, h: int, w: int, threads: int
) -> None:
    """The one-pass kernel splits tiles into blocks and, with fewer blocks than threads, the
    output channels too: each split gives the convolution."""
    g = torch.Generator().manual_seed(k * h + w)
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(k, c, 3, 3, generator=g), torch.randn(k, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = winograd.winograd_conv(x, winograd.prepare(weight, bias))
    finally:
        torch.set_num_threads(before)
    close(y, direct(x, weight, bias))


@compiled
@pytest.mark.parametrize("threads", [1, 2])
def test_a_last_panel_half_as_wide(threads: int) -> None:
    """Three vectors of output channels: one panel of two and one of one (Kernels)."""
    lanes = native.lanes()
    g = torch.Generator().manual_seed(threads)
    x = torch.randn(2, 2 * lanes, 9, 6, generator=g).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(3 * lanes, 2 * lanes, 3, 3, generator=g), torch.randn(3 * lanes)
    kernels = winograd.prepare(weight, bias)
    assert kernels.panels.shape == (36, 2 * lanes * 3 * lanes)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = winograd.winograd_conv(x, kernels)
    finally:
        torch.set_num_threads(before)
    close(y, direct(x, weight, bias))


@compiled
@pytest.mark.parametrize("upsample", [False, True])
def test_a_residual_added_as_the_output_is_written(upsample: bool) -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, LANES, 6, 5, generator=g).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(LANES, LANES, 3, 3, generator=g), torch.randn(LANES, generator=g)
    size = (12, 10) if upsample else (6, 5)
    r = torch.randn(2, LANES, *size, generator=g).contiguous(memory_format=torch.channels_last)
    u = winograd.prepare(weight, bias)
    y = winograd.winograd_conv(x, u, upsample, residual=r)
    src = F.interpolate(x, scale_factor=2.0, mode="nearest") if upsample else x
    close(y, direct(src, weight, bias) + r.double())
    short = r[:, :, 1:].contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"residual must be \("):
        winograd.winograd_conv(x, u, upsample, residual=short)
    with pytest.raises(ValueError, match="residual must be float32 channels-last"):
        winograd.winograd_conv(x, u, upsample, residual=r.contiguous())


@compiled
@pytest.mark.parametrize(("h", "w"), [(8, 8), (5, 3), (1, 1)])
def test_the_input_read_upsampled(h: int, w: int) -> None:
    """conv(nearest2x(x)) without the upsampled map: [N, K, 2H, 2W]."""
    g = torch.Generator().manual_seed(h * w)
    x = torch.randn(2, LANES, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight, bias = (
        torch.randn(2 * LANES, LANES, 3, 3, generator=g),
        torch.randn(2 * LANES, generator=g),
    )
    y = winograd.winograd_conv(x, winograd.prepare(weight, bias), upsample=True)
    close(y, direct(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias))


def conv(c: int = LANES, k: int = LANES, **kw: int) -> nn.Conv2d:
    return nn.Conv2d(c, k, kw.pop("kernel_size", 3), padding=kw.pop("padding", 1), **kw)


def cl(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last)


@compiled
def test_applies_only_where_it_is_exact_and_pays() -> None:
    assert winograd.applies(cl(2, LANES, 16, 16), conv())
    assert not winograd.applies(cl(2, LANES, 16, 16, dtype=torch.bfloat16), conv())
    assert not winograd.applies(torch.randn(2, LANES, 16, 16), conv())  # not channels-last
    assert not winograd.applies(cl(2, LANES, 16, 16), conv(stride=2))
    assert not winograd.applies(cl(2, LANES, 16, 16), conv(groups=2))
    assert not winograd.applies(cl(2, LANES, 16, 16), conv(dilation=2, padding=2))
    assert not winograd.applies(cl(2, LANES, 16, 16), conv(kernel_size=1, padding=0))
    assert not winograd.applies(cl(2, 3, 16, 16), conv(c=3))  # channels off the vector width
    # few tiles for large kernels: one 8×8 map is 4 tiles
    big = winograd.MAX_KERNEL_ELEMENTS_PER_TILE * 4 // (12 * LANES) + 1
    assert not winograd.applies(cl(1, 12 * LANES, 8, 8), conv(c=12 * LANES, k=big * LANES))


def unet() -> UNet:
    torch.manual_seed(0)
    cfg = UNetConfig(image_size=16, model_channels=LANES, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(8,), num_head_channels=8, clip_dim=12)  # fmt: skip
    model = UNet(cfg).eval().to(memory_format=torch.channels_last)
    with torch.no_grad():  # the zero-initialised output convs would hide a wrong result
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0, 0.1)
    return model


@compiled
def test_a_sampling_run_convolves_by_winograd(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[tuple[int, ...], bool, bool]] = []
    real = winograd.winograd_conv

    def counted(
        x: torch.Tensor,
        kernels: winograd.Kernels,
        up: bool = False,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        calls.append((tuple(x.shape), up, residual is not None))
        return real(x, kernels, up, residual)

    monkeypatch.setattr(winograd, "winograd_conv", counted)
    model = unet()
    x = cl(2, 3, 16, 16)
    t, emb = torch.tensor([10, 500]), torch.randn(2, 12)
    with torch.no_grad():
        want = model(x, t, image_emb=emb)
        assert calls == []
        with model.frozen_weights():
            got = model(x, t, image_emb=emb)
    assert len(calls) >= 4
    assert (
        (2, 2 * LANES, 8, 8),
        True,
        False,
    ) in calls  # the upsampling ResBlock reads its input ×2
    assert any(residual for *_, residual in calls)  # ResBlocks' sums are added as they are written
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@compiled
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradients_equal_the_direct_convolutions(with_bias: bool) -> None:
    torch.manual_seed(0)
    layer = Conv3x3(LANES, 2 * LANES).to(memory_format=torch.channels_last)
    if not with_bias:
        layer.bias = None
    x = cl(2, LANES, 9, 7).requires_grad_()
    assert winograd.trains(x, layer)
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    x64 = x.detach().double().requires_grad_()
    w64 = layer.weight.detach().double().requires_grad_()
    b64 = None if layer.bias is None else layer.bias.detach().double().requires_grad_()
    y64 = F.conv2d(x64, w64, b64, padding=1)
    (y64 * g.double()).sum().backward()
    close(y, y64.detach())
    close(x.grad, x64.grad)
    close(layer.weight.grad, w64.grad)
    if b64 is not None:
        close(layer.bias.grad, b64.grad)


@compiled
def test_training_steps_follow_the_direct_convolutions(monkeypatch: pytest.MonkeyPatch) -> None:
    """A few AdamW steps of a small UNet in float32 channels-last: the same losses with the
    3×3 convolutions as Winograd (which ran) as with the direct ones."""
    calls: list[int] = []
    real = winograd.winograd_conv_autograd

    def counted(*a: torch.Tensor | None) -> torch.Tensor:
        calls.append(1)
        return real(*a)

    def losses(use_winograd: bool) -> list[float]:
        model = unet().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(5)
        x = cl(4, 3, 16, 16)
        t, emb = torch.randint(0, 1000, (4,), generator=g), torch.randn(4, 12, generator=g)
        out = []
        with monkeypatch.context() as m:
            if use_winograd:
                m.setattr(winograd, "winograd_conv_autograd", counted)
            else:
                m.setattr(winograd, "trains", lambda x, conv: False)
            for _ in range(4):
                loss = (model(x, t, image_emb=emb)[:, :3] - x).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                out.append(loss.item())
        return out

    direct_losses = losses(False)
    assert calls == []
    winograd_losses = losses(True)
    assert len(calls) >= 4 * 4
    assert winograd_losses[-1] < winograd_losses[0]
    assert winograd_losses == pytest.approx(direct_losses, rel=1e-4)


@compiled
def test_the_weight_gradient_alone() -> None:
    """With the input not requiring a gradient (a first layer), only dw and db are made."""
    torch.manual_seed(1)
    layer = Conv3x3(LANES, LANES).to(memory_format=torch.channels_last)
    x = cl(3, LANES, 5, 6)
    y = layer(x)
    y.square().sum().backward()
    w64 = layer.weight.detach().double().requires_grad_()
    F.conv2d(x.double(), w64, layer.bias.detach().double(), padding=1).square().sum().backward()
    close(layer.weight.grad, w64.grad)


@compiled
def test_what_the_kernels_cannot_read_is_refused() -> None:
    u = winograd.prepare(torch.randn(LANES, LANES, 3, 3), None)
    with pytest.raises(ValueError, match="channels-last"):
        winograd.winograd_conv(torch.randn(1, LANES, 4, 4), u)
    with pytest.raises(ValueError, match="multiple of"):
        winograd.winograd_conv(cl(1, LANES + 1, 4, 4), u)
    with pytest.raises(ValueError, match="kernels"):
        winograd.winograd_conv(cl(1, 2 * LANES, 4, 4), u)
    with pytest.raises(ValueError, match="residual"):  # output channels padded: no residual
        odd = winograd.prepare(torch.randn(3, LANES, 3, 3), None)
        winograd.winograd_conv(cl(1, LANES, 4, 4), odd, residual=cl(1, 3, 4, 4))


@compiled
def test_an_empty_input_gives_an_empty_output() -> None:
    kernels = winograd.prepare(torch.randn(6, LANES, 3, 3), torch.randn(6))
    for shape in ((0, LANES, 4, 4), (1, LANES, 0, 4)):
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        y = winograd.winograd_conv(x, kernels)
        assert y.shape == (shape[0], 6, *shape[2:])


@compiled
def test_kernels_made_elsewhere_are_checked() -> None:
    import dataclasses

    kernels = winograd.prepare(torch.randn(LANES, LANES, 3, 3), torch.randn(LANES))
    x = cl(1, LANES, 4, 4)
    for bad in (
        dataclasses.replace(kernels, bias=torch.randn(LANES - 1)),
        dataclasses.replace(kernels, panels=kernels.panels[:, :-LANES]),
        dataclasses.replace(kernels, panels=kernels.panels.t().contiguous().t()),
    ):
        with pytest.raises(ValueError, match="kernels must be"):
            winograd.winograd_conv(x, bad)


@compiled
@pytest.mark.parametrize("k", [3, 6, 2 * LANES + 5])
def test_output_channels_padded_with_zero_kernels(k: int) -> None:
    """A last layer's few output channels (6: ε and the variance, 3): zero kernels pad them
    to the vector width; the result has exactly k channels, dense channels-last."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2, LANES, 7, 9, generator=g).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(k, LANES, 3, 3, generator=g), torch.randn(k, generator=g)
    kernels = winograd.prepare(weight, bias)
    assert kernels.out_channels == k and 0 <= kernels.padded_channels - k < native.lanes()
    assert kernels.padded_channels % native.lanes() == 0
    y = winograd.winograd_conv(x, kernels)
    assert y.shape == (2, k, 7, 9) and y.is_contiguous(memory_format=torch.channels_last)
    close(y, direct(x, weight, bias))


@compiled
def test_no_training_under_autocast_or_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    layer, x = conv(), cl(2, LANES, 8, 8).requires_grad_()
    assert winograd.trains(x, layer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not winograd.trains(x, layer)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not winograd.trains(x, layer)
    with torch.no_grad():
        monkeypatch.undo()
        assert not winograd.trains(x, layer)  # nothing to record: the packed path's business
