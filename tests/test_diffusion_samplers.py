"""Samplers against diffusers, DDIM inversion, RePaint and the sampler API.

Reference comparisons: diffusers keeps its schedules in float32. To compare the *algorithms*
rather than float32 rounding, the reference scheduler is given our float64 ᾱ (the same schedule:
`test_betas_match_diffusers` checks it agrees to float32 precision) and both run on float64
samples with the same starting noise and the same generator seed, so every random draw is the
same. Trajectories must agree to 1e-5 at every step.
"""

import itertools

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, RePaintScheduler

from unclip.diffusion import (
    SAMPLERS,
    GaussianDiffusion,
    SampleStep,
    ddim_invert,
    ddim_sample,
    ddpm_sample,
    dpmpp_2m_sample,
    final,
    make_betas,
    repaint_levels,
    repaint_sample,
    sample,
    space_timesteps,
)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
DIFFUSERS_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def dummy_model(d: GaussianDiffusion, prediction: str = "eps", learn_sigma: bool = False):
    """A fixed, deterministic, nonlinear and timestep-dependent model.

    It is the exact ε of N(0, 0.25 I) data plus a nonlinear term that depends on x and t, and it
    outputs ε, x₀ or v as asked (well-conditioned: the x₀ it implies stays O(1) at t = T-1).
    With learn_sigma it appends a variance value in [-1, 1] that depends on x and t.
    """
    abar_all = d.schedule.alphas_cumprod

    def model(x, t):
        abar = _col(abar_all[t.cpu()], x)
        tt = _col(t, x)
        eps = (1 - abar).sqrt() * x / (0.25 * abar + 1 - abar)
        eps = eps + abar.sqrt() * 0.1 * torch.sin(3 * x + tt / 50)
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        out = {"eps": eps, "x0": x0, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[prediction]
        if learn_sigma:
            out = torch.cat([out, torch.tanh(x + tt / 300 - 1.5)], dim=1)
        return out

    return model


def reference_trajectory(ref, model, noise, generator=None, **step_kwargs):
    """Run a diffusers scheduler (after set_timesteps) and return [(x, pred_x0 or None)]."""
    x, out = noise.clone(), []
    for t in ref.timesteps:
        res = ref.step(
            model(x, torch.full((x.shape[0],), int(t))), t, x, generator=generator, **step_kwargs
        )
        out.append((res.prev_sample, getattr(res, "pred_original_sample", None)))
        x = res.prev_sample
    return out


def use_our_schedule(ref, d: GaussianDiffusion):
    ref.alphas_cumprod = d.schedule.alphas_cumprod.clone()
    ref.one = torch.tensor(1.0, dtype=F64)
    if hasattr(ref, "final_alpha_cumprod"):
        ref.final_alpha_cumprod = torch.tensor(1.0, dtype=F64)
    return ref


def assert_same_trajectory(ours: list[SampleStep], refs, timesteps, check_x0=True, atol=1e-5):
    assert [s.timestep for s in ours] == [int(t) for t in timesteps]
    assert len(ours) == len(refs)
    for step, (x_ref, x0_ref) in zip(ours, refs, strict=True):
        torch.testing.assert_close(step.x, x_ref, rtol=0, atol=atol)
        if check_x0 and x0_ref is not None:
            torch.testing.assert_close(step.pred_x0, x0_ref, rtol=0, atol=atol)


SHAPE = (2, 3, 4, 4)


def _noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=_gen(seed), dtype=F64)


# ---------------------------------------------------------------------------------------------
# DDPM


@pytest.mark.parametrize(
    ("schedule", "steps", "spacing", "variance", "clip"),
    [
        ("linear", None, "leading", "small", True),  # the full 1000-step chain
        ("cosine", 50, "leading", "large", True),
        ("cosine", 40, "trailing", "small", False),
        ("linear", 25, "linspace", "large", False),
    ],
)
def test_ddpm_matches_diffusers(schedule, steps, spacing, variance, clip):
    d = GaussianDiffusion(make_betas(schedule, 1000), clip_denoised=clip, fixed_variance=variance)
    model = dummy_model(d)
    ref = DDPMScheduler(
        beta_schedule=DIFFUSERS_SCHEDULE[schedule], variance_type=f"fixed_{variance}",
        clip_sample=clip, timestep_spacing=spacing,
    )  # fmt: skip
    use_our_schedule(ref, d)
    if steps is not None:
        ref.set_timesteps(steps)
    noise = _noise()
    refs = reference_trajectory(ref, model, noise, _gen(1))
    ours = list(ddpm_sample(d, model, noise, steps, spacing=spacing, generator=_gen(1)))
    assert_same_trajectory(ours, refs, ref.timesteps)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_ddpm_learned_range_matches_diffusers(prediction):
    """Learned-range variance (IDDPM), explicit timesteps, x₀/v predictions."""
    d = GaussianDiffusion(make_betas("cosine", 1000), prediction=prediction, learn_sigma=True)
    model = dummy_model(d, prediction, learn_sigma=True)
    ref = DDPMScheduler(
        beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
        prediction_type=DIFFUSERS_PREDICTION[prediction],
    )  # fmt: skip
    use_our_schedule(ref, d)
    ts = [990, 900, 750, 600, 420, 300, 200, 120, 60, 30, 10, 3, 0]
    ref.set_timesteps(timesteps=ts)
    noise = _noise(2)
    refs = reference_trajectory(ref, model, noise, _gen(3))
    ours = list(ddpm_sample(d, model, noise, timesteps=ts, generator=_gen(3)))
    assert_same_trajectory(ours, refs, ts)


def test_ddpm_dynamic_thresholding_matches_diffusers():
    d = GaussianDiffusion(make_betas("linear", 1000), dynamic_threshold=0.9)
    model = dummy_model(d)
    ref = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1e6)
    use_our_schedule(ref, d).set_timesteps(20)
    noise = 3 * _noise(4)
    refs = reference_trajectory(ref, model, noise, _gen(5))
    ours = list(ddpm_sample(d, model, noise, 20, spacing="leading", generator=_gen(5)))
    assert_same_trajectory(ours, refs, ref.timesteps)
    assert max(float(s.pred_x0.abs().max()) for s in ours) <= 1.0 + 1e-12


# ---------------------------------------------------------------------------------------------
# DDIM


@pytest.mark.parametrize(
    ("schedule", "prediction", "steps", "spacing", "eta", "clip"),
    [
        ("cosine", "eps", 25, "trailing", 0.0, False),
        ("cosine", "eps", 25, "trailing", 0.5, True),
        ("linear", "v", 20, "leading", 0.0, True),
        ("linear", "x0", 50, "trailing", 1.0, False),
    ],
)
def test_ddim_matches_diffusers(schedule, prediction, steps, spacing, eta, clip):
    d = GaussianDiffusion(make_betas(schedule, 1000), prediction=prediction, clip_denoised=clip)
    model = dummy_model(d, prediction)
    ref = DDIMScheduler(
        beta_schedule=DIFFUSERS_SCHEDULE[schedule], clip_sample=clip, timestep_spacing=spacing,
        prediction_type=DIFFUSERS_PREDICTION[prediction],
    )  # fmt: skip
    use_our_schedule(ref, d).set_timesteps(steps)
    noise = 2 * _noise(6)
    # like guided-diffusion, ε is recomputed from a clipped x₀ (diffusers' use_clipped_model_output)
    refs = reference_trajectory(ref, model, noise, _gen(7), eta=eta, use_clipped_model_output=True)
    ours = list(ddim_sample(d, model, noise, steps, spacing=spacing, eta=eta, generator=_gen(7)))
    assert_same_trajectory(ours, refs, ref.timesteps)


# ---------------------------------------------------------------------------------------------
# DPM-Solver++(2M)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize(
    ("schedule", "prediction", "steps"),
    [("cosine", "eps", 10), ("linear", "eps", 20), ("cosine", "v", 15), ("linear", "x0", 8)],
)
def test_dpmpp_2m_matches_diffusers(schedule, prediction, steps):
    d = GaussianDiffusion(make_betas(schedule, 1000), prediction=prediction, clip_denoised=False)
    model = dummy_model(d, prediction)
    ref = DPMSolverMultistepScheduler(
        beta_schedule=DIFFUSERS_SCHEDULE[schedule], prediction_type=DIFFUSERS_PREDICTION[prediction]
    )  # defaults: solver_order=2, "dpmsolver++", "midpoint", linspace spacing, final σ = 0
    ref.set_timesteps(steps)
    # its σ = √((1-ᾱ)/ᾱ) table, from our ᾱ (it would otherwise round it to float32)
    abar = d.schedule.alphas_cumprod[ref.timesteps]
    ref.sigmas = torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1, dtype=F64)])
    noise = _noise(8)
    refs = reference_trajectory(ref, model, noise)
    # diffusers rounds the sample to float32 inside each step, so agreement is ~1e-7, not 1e-15
    ours = list(dpmpp_2m_sample(d, model, noise, timesteps=ref.timesteps.tolist()))
    assert_same_trajectory(ours, refs, ref.timesteps)


def test_dpmpp_2m_beats_ddim_at_few_steps():
    """Second order pays off: with 10 steps it lands closer to a 500-step DDIM solution."""
    d = GaussianDiffusion(make_betas("cosine", 1000), clip_denoised=False)
    model = dummy_model(d)
    noise = _noise(9)
    exact = final(ddim_sample(d, model, noise, 500))
    err_dpm = (final(dpmpp_2m_sample(d, model, noise, 10)) - exact).abs().mean()
    err_ddim = (final(ddim_sample(d, model, noise, 10)) - exact).abs().mean()
    assert err_dpm < 0.5 * err_ddim


# ---------------------------------------------------------------------------------------------
# DDIM inversion


def gaussian_eps_model(d: GaussianDiffusion, mu: torch.Tensor, std: float):
    """The exact ε of data x₀ ~ N(mu, std² I): ε = √(1-ᾱ)(x - √ᾱ mu) / (ᾱ std² + 1 - ᾱ)."""
    abar_all = d.schedule.alphas_cumprod

    def model(x, t):
        abar = _col(abar_all[t.cpu()], x)
        return (1 - abar).sqrt() * (x - abar.sqrt() * mu) / (abar * std**2 + 1 - abar)

    return model


@pytest.mark.parametrize(("schedule", "spacing"), [("linear", "trailing"), ("cosine", "leading")])
def test_ddim_inversion_reconstructs(schedule, spacing):
    g = _gen(10)
    mu, std = 0.3 * torch.randn(3, 8, 8, generator=g), 0.5
    z = torch.randn(4, 3, 8, 8, generator=g)
    image = mu + std * z  # a draw from the data distribution
    d = GaussianDiffusion(make_betas(schedule, 1000))  # clipping is on by default for sampling
    model = gaussian_eps_model(d, mu, std)
    steps = list(ddim_invert(d, model, image, 50, spacing=spacing))
    assert len(steps) == 50 and steps[-1].timestep == space_timesteps(1000, 50, spacing)[0]
    assert [s.timestep for s in steps] == sorted(s.timestep for s in steps)
    noise = steps[-1].x
    # the latent is the data's noise: for Gaussian data the ODE maps mu + std·z to ≈ z
    assert float((noise - z).abs().mean()) < 0.1
    recon = final(ddim_sample(d, model, noise, 50, spacing=spacing, clip_denoised=False))
    assert float((recon - image).abs().mean()) < 1e-2
    # plain explicit inversion (no fixed-point refinement) is clearly worse
    plain = final(ddim_invert(d, model, image, 50, spacing=spacing, fixed_point_iters=0))
    recon0 = final(ddim_sample(d, model, plain, 50, spacing=spacing, clip_denoised=False))
    assert float((recon0 - image).abs().mean()) > 2 * float((recon - image).abs().mean())


# ---------------------------------------------------------------------------------------------
# RePaint


def test_repaint_levels_match_diffusers_schedule():
    for steps, jump, resample in [(50, 5, 10), (20, 10, 2), (25, 10, 3), (10, 3, 1)]:
        ref = RePaintScheduler(num_train_timesteps=1000)
        ref.set_timesteps(steps, jump_length=jump, jump_n_sample=resample)
        levels = repaint_levels(steps, jump, resample)
        # diffusers lists the timestep of each state before the final clean one
        assert [(lv - 1) * (1000 // steps) for lv in levels[1:-1]] == ref.timesteps.tolist()[1:]
        assert levels[0] == steps and levels[-1] == 0
        down = sum(b < a for a, b in itertools.pairwise(levels))
        assert down - (len(levels) - 1 - down) == steps
    assert repaint_levels(5, 2, 1) == [5, 4, 3, 2, 1, 0]


def test_repaint_keeps_known_region_and_fills_unknown_with_conditional():
    """Correlated Gaussian data, exact ε: the generated part should follow p(x_u | x_k)."""
    D, n = 4, 2000
    cov = 0.25 * torch.tensor(
        [[1.0, 0.8, 0.5, 0.2], [0.8, 1.0, 0.7, 0.4], [0.5, 0.7, 1.0, 0.6], [0.2, 0.4, 0.6, 1.0]]
    )
    mu = torch.tensor([0.1, -0.2, 0.3, 0.0])
    d = GaussianDiffusion(make_betas("linear", 1000), clip_denoised=False)
    abar_all = d.schedule.alphas_cumprod

    lam, q = torch.linalg.eigh(cov)  # (ᾱ Σ + (1-ᾱ) I)⁻¹ = Q diag(1 / (ᾱ λ + 1 - ᾱ)) Qᵀ

    def model(x, t):
        abar = abar_all[t.cpu()].to(x.dtype)[:, None]  # [N, 1]
        r = (x - abar.sqrt() * mu) @ q  # [N, D] in the eigenbasis
        return (1 - abar).sqrt() * (r / (abar * lam + 1 - abar)) @ q.T

    known = torch.tensor([0.6, 0.4, 9.0, 9.0]).expand(n, D)  # the 9s must be ignored
    keep = torch.tensor([1.0, 1.0, 0.0, 0.0])
    k, u = [0, 1], [2, 3]
    target = mu[u] + cov[u][:, k] @ torch.linalg.solve(cov[k][:, k], known[0, k] - mu[k])
    calls = []
    out = {}
    for resample in (1, 5):
        steps = list(
            repaint_sample(
                d, model, (n, D), 50, x_known=known, keep_mask=keep, jump_length=5,
                resample=resample, generator=_gen(11), progress=calls.append,
            )
        )  # fmt: skip
        assert steps[-1].index == steps[-1].total - 1 == len(steps) - 1
        x = steps[-1].x
        assert torch.equal(x[:, k], known[:, k])
        out[resample] = (x[:, u].mean(0) - target).abs().sum()
    assert len(calls) == 50 + len(repaint_levels(50, 5, 5)) - 1
    # resampling harmonises: much closer to the true conditional mean than plain replacement,
    # which is itself closer than the unconditional mean
    assert out[5] < 0.7 * out[1]
    assert out[1] < (mu[u] - target).abs().sum()


def test_repaint_image_shapes_and_mask_broadcast():
    d = GaussianDiffusion(make_betas("cosine", 100))
    known = torch.rand(2, 3, 6, 6, generator=_gen(12)) * 2 - 1
    keep = torch.zeros(2, 1, 6, 6)
    keep[..., :3] = 1.0
    model = lambda x, t: 0.1 * x  # noqa: E731
    x = final(
        repaint_sample(d, model, known.shape, 10, x_known=known, keep_mask=keep, jump_length=3,
                       resample=2, generator=_gen(13))
    )  # fmt: skip
    assert x.shape == known.shape
    assert torch.equal(x[..., :3], known[..., :3])
    assert not torch.allclose(x[..., 3:], known[..., 3:])
    with pytest.raises(ValueError):
        repaint_sample(d, model, (2, 3, 5, 5), 10, x_known=known, keep_mask=keep)


# ---------------------------------------------------------------------------------------------
# API: seeds, progress, concurrency, shapes


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_seeded_and_stateless(name):
    d = GaussianDiffusion(make_betas("cosine", 1000))
    model = dummy_model(d)
    kw = {"eta": 0.5} if name == "ddim" else {}
    a = sample(d, model, (2, 5), 8, sampler=name, generator=_gen(14), **kw)
    b = sample(d, model, (2, 5), 8, sampler=name, generator=_gen(14), **kw)
    assert a.dtype == torch.float32 and a.shape == (2, 5)
    assert torch.equal(a, b)
    # two requests interleaved on one diffusion object give the results they give alone
    it1 = SAMPLERS[name](d, model, (2, 5), 8, generator=_gen(14), **kw)
    it2 = SAMPLERS[name](d, model, (3, 5), 12, generator=_gen(15), **kw)
    s1, s2 = [], []
    for i in range(12):
        if i < 8:
            s1.append(next(it1))
        s2.append(next(it2))
    assert torch.equal(s1[-1].x, a)
    assert torch.equal(
        s2[-1].x, sample(d, model, (3, 5), 12, sampler=name, generator=_gen(15), **kw)
    )
    c = sample(d, model, (2, 5), 8, sampler=name, generator=_gen(16), **kw)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_one_generator_per_sample_gives_each_its_own_noise_in_any_batch(name):
    d = GaussianDiffusion(make_betas("cosine", 1000))
    model = dummy_model(d)  # elementwise: a row's result cannot depend on the others
    kw = {"eta": 0.7} if name == "ddim" else {}
    alone = [sample(d, model, (2, 5), 6, sampler=name, generator=_gen(s), **kw) for s in (3, 4, 5)]
    gens = [_gen(s) for s in (3, 4, 5)]  # blocks of 2 rows, one generator each
    batch = sample(d, model, (6, 5), 6, sampler=name, generator=gens, **kw)
    # the same noise per row; ATen's elementwise kernels may take a row through their vector
    # loop in one shape and their scalar tail in the other (sin, exp: an ulp apart), so the
    # rows agree to float32 rounding, not bit for bit (another generator would be O(1) away)
    torch.testing.assert_close(batch, torch.cat(alone), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="2 generators cannot split a batch of 3 rows"):
        sample(d, model, (3, 5), 6, sampler=name, generator=[_gen(0), _gen(1)], **kw)


def test_progress_stream_and_no_grad_leak():
    d = GaussianDiffusion(make_betas("linear", 1000))
    model = dummy_model(d)
    seen: list[SampleStep] = []
    it = ddim_sample(d, model, (1, 4), 5, progress=seen.append, generator=_gen(17))
    first = next(it)
    assert torch.is_grad_enabled()  # the generator does not hold no_grad across a yield
    rest = list(it)
    assert seen == [first, *rest]
    assert [s.index for s in seen] == list(range(5)) and {s.total for s in seen} == {5}
    assert [s.timestep for s in seen] == [999, 799, 599, 399, 199]
    assert not seen[-1].x.requires_grad


def test_timestep_validation():
    d = GaussianDiffusion(make_betas("linear", 100))
    model = dummy_model(d)
    for bad in ([10, 50], [100, 5], [5, 5]):
        with pytest.raises(ValueError):
            ddim_sample(d, model, (1, 2), timesteps=bad)
    with pytest.raises(ValueError):
        ddim_sample(d, model, (1, 2), 3, timesteps=[9, 5])
    with pytest.raises(ValueError):
        sample(d, model, (1, 2), 3, sampler="euler")
    # the full chain visits every timestep once
    assert [s.timestep for s in ddpm_sample(d, model, (1, 2))] == list(range(99, -1, -1))


def test_prior_shaped_vectors_with_learned_sigma_and_kwargs():
    """The prior samples vectors [N, D]; kwargs reach the model at every step."""
    d = GaussianDiffusion(
        make_betas("cosine", 1000), prediction="x0", learn_sigma=True, loss="hybrid"
    )
    calls = []

    def model(x, t, cond):
        calls.append(cond)
        return torch.cat([cond.expand_as(x), torch.zeros_like(x)], dim=1)

    cond = torch.full((1, 6), 0.5)
    x = final(ddpm_sample(d, model, (3, 6), 10, generator=_gen(18), model_kwargs={"cond": cond}))
    assert len(calls) == 10 and all(c is cond for c in calls)
    # an x₀-predicting model that always says 0.5 ends (almost) exactly there
    torch.testing.assert_close(x, torch.full((3, 6), 0.5), rtol=0, atol=0.05)
