"""Schedules, closed forms (q, posterior, conversions, KL, likelihood) and training losses."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from unclip.config import DiffusionConfig
from unclip.diffusion import (
    GaussianDiffusion,
    NoiseSchedule,
    cosine_betas,
    discretized_gaussian_log_likelihood,
    dynamic_threshold,
    linear_betas,
    make_betas,
    mean_flat,
    normal_kl,
    space_timesteps,
)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Schedules


@pytest.mark.parametrize(
    ("ours", "theirs"), [("linear", "linear"), ("cosine", "squaredcos_cap_v2")]
)
def test_betas_match_diffusers(ours, theirs):
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs).betas.double()
    # diffusers stores float32, so agreement is to float32 precision
    torch.testing.assert_close(make_betas(ours, 1000), ref, rtol=1e-6, atol=1e-9)


def test_cosine_alpha_bar_closed_form():
    T = 200
    s = NoiseSchedule(cosine_betas(T))
    t = torch.arange(T - 10)  # away from the 0.999 clip at the very end
    f = lambda u: torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    expected = f((t + 1).double() / T) / f(torch.zeros((), dtype=F64))
    torch.testing.assert_close(s.alphas_cumprod[t], expected, rtol=1e-10, atol=0)
    assert float(cosine_betas(T).max()) == pytest.approx(0.999)


def test_linear_betas_scale_with_length():
    # 1000 steps is Ho et al.'s 1e-4 … 0.02; 500 steps doubles both ends (same total noise).
    b = linear_betas(500)
    assert float(b[0]) == pytest.approx(2e-4) and float(b[-1]) == pytest.approx(0.04)
    with pytest.raises(ValueError):
        make_betas("sigmoid", 10)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 25, 50, 1000])
def test_space_timesteps_match_diffusers(spacing, steps):
    ref = DDPMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    if spacing == "linspace" and steps == 1:
        # diffusers gives [0]; a single step from pure noise belongs at T-1
        assert space_timesteps(1000, steps, spacing) == [999]
        return
    assert space_timesteps(1000, steps, spacing) == ref.timesteps.tolist()


def test_respace_keeps_alpha_bar_and_maps_timesteps():
    s = NoiseSchedule(make_betas("cosine", 100))
    keep = [99, 70, 41, 12, 3]
    r = s.respace(keep)
    assert r.num_timesteps == 5
    assert r.timestep_map.tolist() == sorted(keep)
    torch.testing.assert_close(r.alphas_cumprod, s.alphas_cumprod[sorted(keep)], rtol=1e-9, atol=0)
    # respacing a respaced schedule composes the maps and still keeps ᾱ
    rr = r.respace([4, 1])
    assert rr.timestep_map.tolist() == [12, 99]
    torch.testing.assert_close(rr.alphas_cumprod, s.alphas_cumprod[[12, 99]], rtol=1e-9, atol=0)
    with pytest.raises(ValueError):
        s.respace([3, 3])
    with pytest.raises(ValueError):
        s.respace([100])


# ---------------------------------------------------------------------------------------------
# Closed forms


def test_q_sample_marginal_matches_markov_chain():
    """Running q(x_t | x_{t-1}) step by step gives the closed-form marginal of q(x_t | x_0)."""
    T, n = 40, 20000
    d = GaussianDiffusion(make_betas("cosine", T))
    x0 = torch.tensor([0.7, -0.3], dtype=F64)
    g = _gen(1)
    x = x0.expand(n, 2).clone()
    for t in range(25):
        beta = d.schedule.betas[t]
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(n, 2, generator=g, dtype=F64)
    t = torch.full((1,), 24)
    mean, var, log_var = d.q_mean_variance(x0[None], t)
    torch.testing.assert_close(log_var, var.log())
    se = (var.sqrt() / math.sqrt(n)).squeeze()
    assert ((x.mean(0) - mean[0]).abs() < 4 * se).all()
    assert ((x.var(0) - var[0]).abs() < 0.05 * var[0]).all()
    # and q_sample draws from that marginal
    xs = d.q_sample(x0.expand(n, 2), t.expand(n), generator=_gen(2))
    assert ((xs.mean(0) - mean[0]).abs() < 4 * se).all()
    assert ((xs.var(0) - var[0]).abs() < 0.05 * var[0]).all()


def test_q_posterior_is_bayes_rule():
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0): multiply the two Gaussians."""
    for d in [
        GaussianDiffusion(make_betas("linear", 100)),
        GaussianDiffusion(make_betas("cosine", 100)).respace([95, 60, 33, 7, 0]),
    ]:
        s = d.schedule
        g = _gen(3)
        t = torch.arange(1, s.num_timesteps)
        x0 = torch.randn(len(t), 3, generator=g, dtype=F64)
        xt = torch.randn(len(t), 3, generator=g, dtype=F64)
        mean, var, log_var = d.q_posterior_mean_variance(x0, xt, t)
        abar_prev = s.alphas_cumprod[t - 1][:, None]
        alpha = (s.alphas_cumprod[t] / s.alphas_cumprod[t - 1])[:, None]
        precision = 1 / (1 - abar_prev) + alpha / (1 - alpha)
        expected_mean = abar_prev.sqrt() * x0 / (1 - abar_prev) + alpha.sqrt() * xt / (1 - alpha)
        expected_mean = expected_mean / precision
        torch.testing.assert_close(mean, expected_mean, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(var, 1 / precision, rtol=1e-9, atol=0)
        torch.testing.assert_close(log_var, torch.log(1 / precision), rtol=1e-9, atol=1e-12)


def test_eps_x0_v_conversions():
    d = GaussianDiffusion(make_betas("cosine", 1000))
    g = _gen(4)
    n = 64
    t = torch.randint(0, 1000, (n,), generator=g)
    x0 = torch.randn(n, 2, 3, generator=g, dtype=F64)
    eps = torch.randn(n, 2, 3, generator=g, dtype=F64)
    abar = d.schedule.alphas_cumprod[t][:, None, None]
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    xt = d.q_sample(x0, t, eps)
    torch.testing.assert_close(xt, alpha * x0 + sigma * eps)
    v = d.predict_v(x0, t, eps)
    # v = dx_t/dφ with α = cos φ, σ = sin φ (Salimans & Ho §4)
    torch.testing.assert_close(v, alpha * eps - sigma * x0)
    tol = dict(rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(d.predict_x0_from_eps(xt, t, eps), x0, **tol)
    torch.testing.assert_close(d.predict_eps_from_x0(xt, t, x0), eps, **tol)
    torch.testing.assert_close(d.predict_x0_from_v(xt, t, v), x0, **tol)
    torch.testing.assert_close(d.predict_eps_from_v(xt, t, v), eps, **tol)


def test_normal_kl_matches_torch_distributions():
    g = _gen(5)
    m1, m2 = torch.randn(2, 100, generator=g, dtype=F64)
    lv1, lv2 = torch.randn(2, 100, generator=g, dtype=F64)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()),
        torch.distributions.Normal(m2, (0.5 * lv2).exp()),
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref)
    assert float(normal_kl(m1, lv1, m1, lv1).abs().max()) < 1e-12


def test_discretized_gaussian_log_likelihood():
    bins = torch.linspace(-1, 1, 256, dtype=F64)
    mean = torch.tensor(0.13, dtype=F64)
    log_scale = torch.tensor(math.log(0.2), dtype=F64)
    logp = discretized_gaussian_log_likelihood(bins, mean, log_scale)
    # a probability mass function over the 256 levels
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-9)
    # interior bins: the Gaussian mass of [x - 1/255, x + 1/255]
    normal = torch.distributions.Normal(mean, log_scale.exp())
    inner = normal.cdf(bins[1:-1] + 1 / 255) - normal.cdf(bins[1:-1] - 1 / 255)
    torch.testing.assert_close(logp[1:-1].exp(), inner, rtol=1e-6, atol=1e-12)
    # edge bins take the tails
    assert float(logp[0].exp()) == pytest.approx(float(normal.cdf(bins[0] + 1 / 255)), rel=1e-6)
    assert float(logp[-1].exp()) == pytest.approx(
        1 - float(normal.cdf(bins[-1] - 1 / 255)), rel=1e-6
    )


def test_dynamic_threshold_matches_diffusers():
    x0 = (
        torch.randn(3, 2, 4, 4, generator=_gen(6))
        * torch.tensor([0.3, 1.5, 4.0])[:, None, None, None]
    )
    ref = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1e6)
    torch.testing.assert_close(dynamic_threshold(x0, 0.9), ref._threshold_sample(x0))
    out = dynamic_threshold(x0, 0.9)
    torch.testing.assert_close(out[0], x0[0])  # s clamps to 1: a small sample is untouched
    assert float(out.abs().max()) <= 1.0


# ---------------------------------------------------------------------------------------------
# Construction and losses


def test_from_config():
    cfg = DiffusionConfig(
        schedule="linear", timesteps=200, prediction="v", learn_sigma=True, loss="hybrid",
        vlb_weight=0.01, clip_denoised=False, dynamic_threshold=0.99,
    )  # fmt: skip
    d = GaussianDiffusion.from_config(cfg)
    assert d.num_timesteps == 200 and d.prediction == "v" and d.learn_sigma
    assert d.loss_type == "hybrid" and d.vlb_weight == 0.01
    assert d.clip_denoised is False and d.dynamic_threshold == 0.99
    torch.testing.assert_close(d.schedule.betas, linear_betas(200))
    assert GaussianDiffusion.from_config(cfg, clip_denoised=True).clip_denoised
    with pytest.raises(ValueError):
        GaussianDiffusion(linear_betas(10), loss="hybrid")
    with pytest.raises(ValueError):
        DiffusionConfig(dynamic_threshold=1.5)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_training_losses_target(prediction):
    """An oracle that outputs the right target has zero MSE; a wrong one has its squared error."""
    d = GaussianDiffusion(make_betas("cosine", 100), prediction=prediction)
    g = _gen(7)
    x0 = torch.randn(8, 3, 4, 4, generator=g)
    noise = torch.randn(8, 3, 4, 4, generator=g)
    t = d.sample_timesteps(8, generator=g)
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) < 100
    target = {"eps": noise, "x0": x0, "v": d.predict_v(x0, t, noise)}[prediction]
    seen = {}

    def oracle(x, tt, shift=0.0):
        seen["x"], seen["t"] = x, tt
        return target + shift

    out = d.training_losses(oracle, x0, t, noise=noise)
    assert set(out) == {"loss", "mse"}
    assert float(out["mse"].abs().max()) < 1e-10
    torch.testing.assert_close(seen["x"], d.q_sample(x0, t, noise))
    out = d.training_losses(oracle, x0, t, model_kwargs={"shift": 0.5}, noise=noise)
    torch.testing.assert_close(out["loss"], torch.full((8,), 0.25))


def test_hybrid_loss_vlb_terms():
    T = 50
    d = GaussianDiffusion(
        make_betas("linear", T), learn_sigma=True, loss="hybrid", vlb_weight=0.002
    )
    g = _gen(8)
    x0 = torch.randn(T, 2, 3, 3, generator=g, dtype=F64).clamp(-1, 1)
    noise = torch.randn(T, 2, 3, 3, generator=g, dtype=F64)
    t = torch.arange(T)

    # The exact posterior: ε = noise and v = -1 (log σ² = log β̃_t) make every KL term 0.
    def exact(x, tt):
        return torch.cat([noise, -torch.ones_like(noise)], dim=1)

    out = d.training_losses(exact, x0, t, noise=noise)
    assert set(out) == {"loss", "mse", "vlb"}
    assert float(out["vlb"][1:].abs().max()) < 1e-10
    assert float(out["vlb"][0]) > 0  # the t = 0 term is a discretised NLL, not a KL

    # A learnable model: the vlb trains only the variance channels (mean is detached).
    a = torch.tensor(0.3, dtype=F64, requires_grad=True)
    b = torch.tensor(0.1, dtype=F64, requires_grad=True)

    def model(x, tt):
        return torch.cat([a * x, b * torch.ones_like(x)], dim=1)

    out = d.training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(out["loss"], out["mse"] + 0.002 * T * out["vlb"])
    out["vlb"].sum().backward()
    assert a.grad is None or float(a.grad) == 0.0
    assert float(b.grad.abs()) > 0
    # vlb_terms by hand at one t > 0: KL(true posterior ‖ model) in bits per dimension
    k = 17
    xt = d.q_sample(x0[k : k + 1], t[k : k + 1], noise[k : k + 1])
    with torch.no_grad():
        o = model(xt, t[k : k + 1])
    mu, _, lv = d.q_posterior_mean_variance(x0[k : k + 1], xt, t[k : k + 1])
    eps_hat = 0.3 * xt
    x0_hat = d.predict_x0_from_eps(xt, t[k : k + 1], eps_hat)
    mu_hat, _, _ = d.q_posterior_mean_variance(x0_hat, xt, t[k : k + 1])
    frac = (0.1 + 1) / 2
    lv_hat = frac * d.schedule.betas[k].log() + (1 - frac) * d.schedule.posterior_variance[k].log()
    expected = mean_flat(normal_kl(mu, lv, mu_hat, lv_hat)) / math.log(2)
    torch.testing.assert_close(d.vlb_terms(o, x0[k : k + 1], xt, t[k : k + 1]), expected)


def test_model_sees_original_timesteps_after_respacing():
    d = GaussianDiffusion(make_betas("linear", 1000)).respace([999, 500, 20])
    seen = []

    def model(x, t):
        seen.append(t.tolist())
        return torch.zeros_like(x)

    d.p_mean_variance(model, torch.zeros(3, 2), torch.tensor([0, 1, 2]))
    assert seen == [[20, 500, 999]]
    assert d.is_respaced and not GaussianDiffusion(make_betas("linear", 10)).is_respaced


def test_learned_variance_interpolates_between_beta_and_beta_tilde():
    d = GaussianDiffusion(make_betas("cosine", 100), learn_sigma=True, loss="hybrid")
    x = torch.zeros(3, 2, dtype=F64)
    t = torch.full((3,), 40)
    out = torch.cat([torch.zeros(3, 1, dtype=F64), torch.tensor([[-1.0], [1.0], [0.0]])], dim=1)
    r = d.p_mean_variance_from_output(out, x[:, :1], t)
    s = d.schedule
    expected = torch.stack(
        [s.posterior_variance[40], s.betas[40], (s.posterior_variance[40] * s.betas[40]).sqrt()]
    )
    torch.testing.assert_close(r["variance"].reshape(-1), expected)
    with pytest.raises(ValueError):
        d.p_mean_variance_from_output(out[:, :1], x[:, :1], t)


def test_ddpm_scheduler_and_dpm_scheduler_agree_on_alpha_bar():
    """Guard for the trajectory tests: the three reference schedulers share our ᾱ (float32)."""
    ours = NoiseSchedule(make_betas("cosine", 1000)).alphas_cumprod
    for cls in (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler):
        ref = cls(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
        torch.testing.assert_close(ref, ours, rtol=1e-4, atol=1e-7)
