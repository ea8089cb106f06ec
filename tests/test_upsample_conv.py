"""Nearest ×2 upsampling then a 3×3 conv, computed at low resolution (unclip.decoder.upsample_conv):
the reference ``conv2d(interpolate(h))``'s values and gradients, in either memory format."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unclip.decoder.upsample_conv import (
    interleave_phases,
    phase_upsample_conv,
    phase_weights,
    upsample_conv3x3,
)

SHAPES = [(2, 3, 5, 7), (1, 4, 1, 6), (2, 5, 6, 1), (1, 2, 1, 1), (3, 8, 4, 4)]
LAYOUTS = [torch.contiguous_format, torch.channels_last]


def reference(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.conv2d(F.interpolate(h, scale_factor=2.0, mode="nearest"), w, b, padding=1)


def operands(
    shape: tuple[int, int, int, int], co: int, dtype: torch.dtype, fmt: torch.memory_format
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(sum(shape) + co)
    h = torch.randn(shape, generator=g, dtype=dtype).contiguous(memory_format=fmt)
    w = torch.randn(co, shape[1], 3, 3, generator=g, dtype=dtype)
    return h, w, torch.randn(co, generator=g, dtype=dtype)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_equals_the_reference_in_float64(shape: tuple[int, int, int, int], fmt) -> None:
    h, w, b = operands(shape, 5, torch.float64, fmt)
    out = upsample_conv3x3(h, w, b)
    assert out.shape == (shape[0], 5, 2 * shape[2], 2 * shape[3])
    assert max_err(out, reference(h, w, b)) < 1e-10
    assert max_err(upsample_conv3x3(h, w), reference(h, w, None)) < 1e-10


@pytest.mark.parametrize("fmt", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_equal_the_reference_in_float64(shape: tuple[int, int, int, int], fmt) -> None:
    h, w, b = (t.requires_grad_() for t in operands(shape, 3, torch.float64, fmt))
    grad_out = torch.randn(shape[0], 3, 2 * shape[2], 2 * shape[3], dtype=torch.float64)
    grad_out = grad_out.contiguous(memory_format=fmt)
    got = torch.autograd.grad(upsample_conv3x3(h, w, b), (h, w, b), grad_out)
    want = torch.autograd.grad(reference(h, w, b), (h, w, b), grad_out)
    for a, e in zip(got, want, strict=True):
        assert a.shape == e.shape
        assert max_err(a, e) < 1e-10


def test_second_derivatives() -> None:
    """The interleave's backward is itself differentiable (gradgradcheck, float64)."""
    h, w, b = (t.requires_grad_() for t in operands((1, 2, 3, 2), 2, torch.float64, LAYOUTS[0]))
    assert torch.autograd.gradgradcheck(upsample_conv3x3, (h, w, b))
    hc = h.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradgradcheck(upsample_conv3x3, (hc, w, b))


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_interleave_backward_is_its_adjoint(fmt) -> None:
    """<interleave(z), g> = <z, dz> for every z, including z's unread border (dz zero there)."""
    z = torch.randn(2, 12, 4, 6, dtype=torch.float64).contiguous(memory_format=fmt)
    g = torch.randn(2, 3, 6, 10, dtype=torch.float64).contiguous(memory_format=fmt)
    zr = z.clone().requires_grad_()
    (dz,) = torch.autograd.grad(interleave_phases(zr, fmt == torch.channels_last), zr, g)
    lhs = (interleave_phases(z, fmt == torch.channels_last) * g).sum()
    assert abs(lhs - (z * dz).sum()).item() < 1e-10
    assert dz.view(2, 4, 3, 4, 6)[:, 0, :, 3].abs().max() == 0  # phase (0, 0): row H unread
    assert dz.view(2, 4, 3, 4, 6)[:, 3, :, :, 0].abs().max() == 0  # phase (1, 1): column 0


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_output_keeps_the_memory_format(fmt) -> None:
    h, w, b = operands((2, 4, 3, 5), 6, torch.float32, fmt)
    out = upsample_conv3x3(h, w, b)
    assert out.is_contiguous(memory_format=fmt)
    h.requires_grad_()
    (dh,) = torch.autograd.grad(upsample_conv3x3(h, w, b).sum(), h)
    assert dh.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_float32_close_to_the_reference(fmt) -> None:
    h, w, b = operands((2, 32, 8, 6), 16, torch.float32, fmt)
    want = reference(h.double(), w.double(), b.double())
    for got in (upsample_conv3x3(h, w, b), reference(h, w, b)):
        assert max_err(got.double(), want) < 1e-5 * want.abs().max().item()


def test_precomputed_phase_weights() -> None:
    h, w, b = operands((2, 4, 5, 3), 6, torch.float64, torch.channels_last)
    pw, pb = phase_weights(w, b)
    assert pw.shape == (24, 4, 2, 2) and pb is not None and pb.shape == (24,)
    # phase (1, 0) of output channel 2: rows (w0 + w1, w2), columns (w0, w1 + w2)
    k = w[2].clone()
    rows = torch.stack([k[:, 0] + k[:, 1], k[:, 2]], 1)
    want = torch.stack([rows[:, :, 0], rows[:, :, 1] + rows[:, :, 2]], 2)
    assert max_err(pw[2 * 6 + 2], want) < 1e-12
    assert max_err(phase_upsample_conv(h, pw, pb), reference(h, w, b)) < 1e-10


def test_bf16_autocast() -> None:
    """Under bf16 autocast the phase kernels are summed in float32 and the convolution casts,
    as it casts the reference's weight: a bf16 result within bf16 rounding of the reference."""
    h, w, b = operands((2, 16, 6, 6), 8, torch.float32, torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert phase_weights(w)[0].dtype == torch.float32
        got, want = upsample_conv3x3(h, w, b), reference(h, w, b)
    assert got.dtype == want.dtype == torch.bfloat16
    exact = reference(h.double(), w.double(), b.double())
    assert max_err(got.double(), exact) < 0.05 * exact.abs().max().item()


def test_traces_under_torch_compile() -> None:
    """One graph under dynamo (no graph break at the interleave), forward and backward."""
    h, w, b = (t.requires_grad_() for t in operands((1, 4, 3, 5), 2, torch.float32, LAYOUTS[1]))
    compiled = torch.compile(upsample_conv3x3, backend="aot_eager", fullgraph=True)
    out = compiled(h, w, b)
    assert out.is_contiguous(memory_format=torch.channels_last)
    got = torch.autograd.grad(out.square().sum(), (h, w, b))
    want = torch.autograd.grad(reference(h, w, b).square().sum(), (h, w, b))
    for a, e in zip(got, want, strict=True):
        assert max_err(a, e) < 1e-4 * e.abs().max().item()
