"""unclip.kept: tensors derived from weights, kept between sampling runs while unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compiled import compiled
from unclip.decoder import UNet, UNetConfig, winograd
from unclip.kept import forget, kept, version_key


def test_kept_while_the_weights_are_unchanged() -> None:
    lin = nn.Linear(4, 3)
    made: list[int] = []

    def make() -> torch.Tensor:
        made.append(1)
        return lin.weight.detach() * 2

    first = kept(lin, "double", [lin.weight, lin.bias], make)
    assert kept(lin, "double", [lin.weight, lin.bias], make) is first
    assert len(made) == 1
    with torch.no_grad():
        lin.weight.add_(1.0)  # in place: the version counter moves
    again = kept(lin, "double", [lin.weight, lin.bias], make)
    assert len(made) == 2
    torch.testing.assert_close(again, lin.weight.detach() * 2)
    lin.load_state_dict(nn.Linear(4, 3).state_dict())
    kept(lin, "double", [lin.weight, lin.bias], make)
    lin.weight.data = torch.zeros(3, 4)  # another tensor under the same parameter
    kept(lin, "double", [lin.weight, lin.bias], make)
    assert len(made) == 4
    forget(lin)
    kept(lin, "double", [lin.weight, lin.bias], make)
    assert len(made) == 5


def test_an_optimizer_step_and_other_names_make_again() -> None:
    lin = nn.Linear(4, 3)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    first = kept(lin, "w", [lin.weight], lambda: lin.weight.detach().clone())
    assert kept(lin, "other", [lin.weight], lambda: "other") == "other"
    lin(torch.randn(2, 4)).sum().backward()
    opt.step()
    second = kept(lin, "w", [lin.weight], lambda: lin.weight.detach().clone())
    assert second is not first and not torch.equal(first, second)


def test_copies_share_nothing_and_a_swapped_storage_is_seen() -> None:
    import copy

    lin = nn.Linear(4, 3)
    made: list[int] = []

    def make() -> int:
        made.append(1)
        return len(made)

    kept(lin, "n", [lin.weight], make)
    twin = copy.deepcopy(lin)  # the entries live beside the module: none is copied
    assert "_unclip_kept" not in twin.__dict__
    assert kept(twin, "n", [twin.weight], make) == 2
    for _ in range(3):  # each new storage is seen, even where the allocator reuses addresses
        lin.weight.data = torch.randn(3, 4)
        kept(lin, "n", [lin.weight], make)
    assert len(made) == 5


def test_inference_tensors_are_not_kept() -> None:
    with torch.inference_mode():
        w = torch.randn(3)
    lin = nn.Linear(1, 1)
    a = kept(lin, "w", [w], lambda: object())
    assert kept(lin, "w", [w], lambda: object()) is not a


@compiled
def test_a_second_sampling_run_reuses_winograds_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs transform each kernel once; after new weights are loaded the next run follows
    them (the same output as a fresh model with those weights)."""
    calls: list[int] = []
    real = winograd.kernel_transform

    def counted(weight: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return real(weight)

    monkeypatch.setattr(winograd, "kernel_transform", counted)
    cfg = UNetConfig(image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(8,), num_head_channels=8, clip_dim=12)  # fmt: skip

    def model(seed: int) -> UNet:
        torch.manual_seed(seed)
        m = UNet(cfg).eval().to(memory_format=torch.channels_last)
        with torch.no_grad():
            for p in m.parameters():  # no zero-initialised layers hiding a stale kernel
                p.normal_(0, 0.1)
        return m

    net, other = model(0), model(1)
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    t, emb = torch.tensor([10, 500]), torch.randn(2, 12)
    with torch.no_grad():
        with net.frozen_weights():
            first = net(x, t, image_emb=emb)
        once = len(calls)
        assert once > 0
        with net.frozen_weights():
            torch.testing.assert_close(net(x, t, image_emb=emb), first)
        assert len(calls) == once
        net.load_state_dict(other.state_dict())
        with net.frozen_weights():
            got = net(x, t, image_emb=emb)
        with other.frozen_weights():
            want = other(x, t, image_emb=emb)
    assert len(calls) == 3 * once
    assert not torch.allclose(got, first)
    torch.testing.assert_close(got, want)  # float32 closeness: MKL may round by alignment


def test_fake_and_meta_tensors_are_not_keyed() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert version_key([torch.zeros(2), None]) is not None
    assert version_key([torch.zeros(2, device="meta")]) is None
    with FakeTensorMode():
        fake = torch.zeros(2)
    assert version_key([fake]) is None
    assert version_key([[1, 2]]) is None
