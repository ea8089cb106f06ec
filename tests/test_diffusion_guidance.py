"""Classifier-free guidance as a model-function wrapper."""

import pytest
import torch

from unclip.diffusion import (
    GaussianDiffusion,
    classifier_free_guidance,
    ddim_sample,
    final,
    make_betas,
)


class CountingModel:
    """A conditional model: output depends on x, t and an embedding; counts calls and batch."""

    def __init__(self, out_channels: int = 3):
        self.calls: list[int] = []
        self.out_channels = out_channels

    def __call__(self, x, t, emb, mode="add", scale=None):
        assert mode == "add"
        self.calls.append(x.shape[0])
        tt = t.float().reshape(-1, 1, 1, 1) / 1000
        base = torch.sin(x + tt) + emb[:, :, None, None]
        if scale is not None:
            base = base * scale[:, None, None, None]
        if self.out_channels == 2 * x.shape[1]:
            return torch.cat([base, torch.tanh(base + emb[:, :1, None, None])], dim=1)
        return base


def _inputs(n=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 5, 5, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    cond = {"emb": torch.randn(n, 3, generator=g), "mode": "add"}
    uncond = {"emb": torch.zeros(n, 3), "mode": "add"}
    return x, t, cond, uncond


def test_scale_one_is_conditional_and_zero_unconditional():
    x, t, cond, uncond = _inputs()
    model = CountingModel()
    expected_c, expected_u = model(x, t, **cond), model(x, t, **uncond)
    model.calls.clear()
    guided1 = classifier_free_guidance(model, 1.0, cond, uncond)
    guided0 = classifier_free_guidance(model, 0.0, cond, uncond)
    torch.testing.assert_close(guided1(x, t), expected_c)
    torch.testing.assert_close(guided0(x, t), expected_u)
    # one batched call each, on the doubled batch
    assert model.calls == [8, 8]


def test_guidance_formula_and_per_sample_scale():
    x, t, cond, uncond = _inputs()
    model = CountingModel()
    c, u = model(x, t, **cond), model(x, t, **uncond)
    torch.testing.assert_close(
        classifier_free_guidance(model, 3.5, cond, uncond)(x, t), u + 3.5 * (c - u)
    )
    w = torch.tensor([0.0, 1.0, 2.0, 7.5])
    out = classifier_free_guidance(model, w, cond, uncond)(x, t)
    torch.testing.assert_close(out, u + w[:, None, None, None] * (c - u))


def test_learned_sigma_guides_only_the_prediction():
    x, t, cond, uncond = _inputs()
    model = CountingModel(out_channels=6)
    c, u = model(x, t, **cond), model(x, t, **uncond)
    out = classifier_free_guidance(model, 4.0, cond, uncond, learn_sigma=True)(x, t)
    assert out.shape == (4, 6, 5, 5)
    torch.testing.assert_close(out[:, :3], u[:, :3] + 4.0 * (c[:, :3] - u[:, :3]))
    torch.testing.assert_close(out[:, 3:], c[:, 3:])  # variance from the conditional pass


def test_shared_call_kwargs_are_duplicated():
    x, t, cond, uncond = _inputs()
    model = CountingModel()
    scale = torch.linspace(0.5, 2.0, 4)
    c = model(x, t, scale=scale, **cond)
    out = classifier_free_guidance(model, 1.0, cond, uncond)(x, t, scale=scale)
    torch.testing.assert_close(out, c)


def test_kwarg_errors():
    x, t, cond, uncond = _inputs()
    model = CountingModel()
    with pytest.raises(ValueError, match="same keys"):
        classifier_free_guidance(model, 2.0, cond, {"emb": uncond["emb"]})
    with pytest.raises(ValueError, match="must be equal"):
        classifier_free_guidance(model, 2.0, cond, {**uncond, "mode": "mul"})
    with pytest.raises(ValueError, match="tensor on one side"):
        classifier_free_guidance(model, 2.0, cond, {**uncond, "emb": None})
    guided = classifier_free_guidance(model, 2.0, cond, uncond)
    with pytest.raises(ValueError, match="both"):
        guided(x, t, emb=cond["emb"])


def test_guided_model_drives_a_sampler():
    """The wrapper is an ordinary model function; guidance changes the sample, w=1 does not."""
    d = GaussianDiffusion(make_betas("cosine", 1000), learn_sigma=True, loss="hybrid")
    model = CountingModel(out_channels=6)
    _, _, cond, uncond = _inputs(2)
    noise = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))

    def cond_only(x, t):
        return model(x, t, **cond)

    plain = final(ddim_sample(d, cond_only, noise, 5))
    same = final(
        ddim_sample(
            d, classifier_free_guidance(model, 1.0, cond, uncond, learn_sigma=True), noise, 5
        )
    )
    strong = final(
        ddim_sample(
            d, classifier_free_guidance(model, 5.0, cond, uncond, learn_sigma=True), noise, 5
        )
    )
    torch.testing.assert_close(same, plain)
    assert (strong - plain).abs().max() > 1e-3
