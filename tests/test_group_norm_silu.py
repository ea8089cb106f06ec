"""The fused group norm + scale-shift + SiLU kernel (unclip.group_norm_silu) and its use."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compiled import compiled
from unclip import group_norm_silu as fused
from unclip.nn import normalization


def case(n: int, c: int, h: int, w: int, groups: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=g) * 3 + 1).contiguous(memory_format=torch.channels_last)
    norm = normalization(c, groups)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(c, generator=g))
        norm.bias.copy_(torch.randn(c, generator=g))
    scale, shift = torch.randn(n, 2 * c, 1, 1, generator=g).chunk(2, dim=1)  # views, as ResBlock's
    return x, norm, scale, shift


@compiled
def test_the_kernel_is_built_here() -> None:
    x, norm, *_ = case(1, 16, 4, 4, 4)
    with torch.no_grad():
        assert fused.applies(x, norm.weight, norm.bias)


@compiled
@pytest.mark.parametrize(
    ("n", "c", "h", "w", "groups"),
    [
        (2, 48, 32, 32, 32),
        (1, 96, 8, 8, 32),
        (3, 16, 5, 7, 4),
        (2, 64, 1, 1, 32),
        (1, 32, 65, 3, 8),
    ],
)
@pytest.mark.parametrize("modulated", [True, False])
def test_equals_the_eager_ops(n: int, c: int, h: int, w: int, groups: int, modulated: bool) -> None:
    x, norm, scale, shift = case(n, c, h, w, groups)
    sc, sh = (scale, shift) if modulated else (None, None)
    with torch.no_grad():
        plain = norm.modulate(x.double(), sc, sh).double()
        want = F.silu(plain)
        got = norm.silu(x, sc, sh)
        got_plain = norm.modulate(x, sc, sh)  # the same kernel without its SiLU
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    assert got_plain.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got_plain.double(), plain, atol=2e-5, rtol=1e-5)


@compiled
def test_large_values_and_a_flat_group() -> None:
    """exp is clamped, not overflowed; a constant group normalises to its bias."""
    x = torch.zeros(1, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    x[:, :8] = 5.0  # groups of 8 channels: the first is flat
    x[:, 8:, 0, 0] = 1e4
    x[:, 8:, 3, 3] = -1e4
    norm = normalization(16, 2)
    with torch.no_grad():
        norm.bias.fill_(-200.0)  # silu of a large negative: -0.0, not nan
        got = fused.group_norm_silu(x, 2, norm.weight, norm.bias, norm.eps, silu=True)
        want = F.silu(
            F.group_norm(x.double(), 2, norm.weight.double(), norm.bias.double(), norm.eps)
        )
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@compiled
def test_only_where_it_applies() -> None:
    x, norm, scale, shift = case(2, 16, 8, 8, 4)
    with torch.no_grad():
        assert fused.applies(x, norm.weight, norm.bias, scale, shift)
        assert not fused.applies(x.contiguous(), norm.weight)  # NCHW
        assert not fused.applies(x.bfloat16(), norm.weight)
        assert not fused.applies(x[:, :3].contiguous(memory_format=torch.channels_last))
    assert not fused.applies(x, norm.weight)  # the weight records autograd
    assert fused.applies(x, norm.weight.detach())


@compiled
def test_a_plain_norm_runs_the_kernel_without_silu(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    real = fused.group_norm_silu

    def counted(*args: object, silu: bool = True, **kwargs: object) -> torch.Tensor:
        calls.append(silu)
        return real(*args, silu=silu, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fused, "group_norm_silu", counted)
    x, norm, *_ = case(2, 16, 8, 8, 4)
    with torch.no_grad():
        norm(x)
    assert calls == [False]


@compiled
def test_training_gets_gradients_through_the_eager_ops() -> None:
    x, norm, scale, shift = case(2, 16, 8, 8, 4)
    x.requires_grad_()
    norm.silu(x, scale, shift).square().sum().backward()
    assert x.grad is not None and norm.weight.grad is not None


def test_without_the_kernel_the_eager_ops_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "_kernels", lambda: None)
    x, norm, scale, shift = case(2, 16, 8, 8, 4)
    with torch.no_grad():
        assert not fused.applies(x, norm.weight)
        torch.testing.assert_close(
            norm.silu(x, scale, shift), F.silu(norm.modulate(x, scale, shift))
        )


@compiled
def test_channels_must_split_into_the_groups() -> None:
    x, norm, *_ = case(1, 16, 4, 4, 4)
    with pytest.raises(ValueError, match="16 channels do not split into 3 groups"):
        fused.group_norm_silu(x, 3, norm.weight, norm.bias, norm.eps)


@compiled
def test_a_scale_for_every_image_broadcasts() -> None:
    """[1, C, 1, 1] scale and shift apply to every image, as the eager addcmul broadcasts."""
    x, norm, scale, shift = case(4, 32, 6, 6, 8)
    with torch.no_grad():
        got = norm.silu(x, scale[:1], shift[:1])
        want = F.silu(norm.modulate(x, scale[:1], shift[:1]))
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@compiled
@pytest.mark.parametrize("offset", [100.0, 1000.0])
def test_a_large_mean_keeps_its_precision(offset: float) -> None:
    x, norm, *_ = case(2, 32, 32, 32, 8)
    x = x + offset
    with torch.no_grad():
        got = norm.silu(x)
        want = F.silu(F.group_norm(x.double(), 8, norm.weight.double(), norm.bias.double()))
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@compiled
def test_parameters_it_cannot_read_in_place_are_copied() -> None:
    """Strided channels (scale, bias) and another dtype (weight) give the same result as
    dense float32 ones (the kernel reads the latter in place)."""
    x, norm, scale, shift = case(2, 16, 4, 4, 4)
    w, b = norm.weight.detach(), norm.bias.detach()
    strided = torch.stack([scale, scale], dim=2).view(2, 16, 2, 1)[:, :, :1]  # channel stride 2
    assert strided.stride(1) == 2
    with torch.no_grad():
        want = fused.group_norm_silu(x, 4, w, b, 1e-5, scale.contiguous(), shift.contiguous())
        got = fused.group_norm_silu(
            x, 4, w.double(), torch.stack([b, b], 1)[:, 0], 1e-5, strided, shift
        )
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@compiled
def test_what_the_kernel_cannot_read_is_refused() -> None:
    x, norm, *_ = case(2, 16, 4, 4, 4)
    w, b = norm.weight.detach(), norm.bias.detach()
    with pytest.raises(ValueError, match="channels-last"):
        fused.group_norm_silu(x.contiguous(), 4, w, b, 1e-5)
    with pytest.raises(ValueError, match="float32"):
        fused.group_norm_silu(x.double(), 4, w, b, 1e-5)
    with pytest.raises(ValueError, match="scale"):
        fused.group_norm_silu(x, 4, w, b, 1e-5, torch.ones(3, 16, 1, 1), torch.ones(3, 16, 1, 1))
    with pytest.raises(ValueError, match="weight"):
        fused.group_norm_silu(x, 4, torch.ones(8), b, 1e-5)


def test_scale_and_shift_come_together() -> None:
    x, norm, scale, _ = case(2, 16, 4, 4, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="scale and shift"):
        norm.silu(x, scale, None)
    with torch.no_grad(), pytest.raises(ValueError, match="scale and shift"):
        norm.modulate(x, scale, None)


@compiled
def test_not_under_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    x, norm, *_ = case(1, 16, 4, 4, 4)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        assert not fused.applies(x, norm.weight)
