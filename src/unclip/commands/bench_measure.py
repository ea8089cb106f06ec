"""What ``unclip bench`` measures: timing (median of repeated runs, the matmul peak), the
per-stage sampling runners with the rows their networks were fed, forward FLOPs per stage, and
training steps on random data.

The sampling runners reproduce the pipeline's stages for ``n`` images at once (the sampler over
a batch, with the pipeline's guidance wiring and precision); achieved GFLOP/s are the forward
FLOPs per sample and call times the rows counted, over the measured time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from unclip.commands.random_pipelines import CAPTION, CAPTIONS

if TYPE_CHECKING:
    import torch

    from unclip.pipeline import UnclipPipeline


# ---------------------------------------------------------------------------------------------
# Timing


def _sync() -> None:
    """Wait for queued GPU work (a no-op on the CPU), so a timer sees all of it."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeat: int = 3, warmup: int = 1) -> dict[str, Any]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeat`` times: median/best seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeat)):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "best_s": min(times), "runs": len(times)}


def matmul_peak(
    dtype: torch.dtype, size: int = 2048, repeat: int = 10, budget_s: float = 3.0
) -> float:
    """Best-of-``repeat`` FLOP/s of a square matrix product in ``dtype`` (the method of
    ``benchmarks/matmul_peak.py``, which the package cannot import), within about
    ``budget_s`` seconds. The side doubles from 256 up to ``size`` while the next product
    would take under a tenth of the budget, so where ``dtype`` is emulated (bfloat16 on a CPU
    without AVX-512 BF16 or AMX, hundreds of times slower) it stays small; the repeats stop
    when the budget is spent."""
    import torch

    def product(n: int) -> tuple[float, Any]:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        t = time.perf_counter()
        a @ b
        return time.perf_counter() - t, (a, b)

    n = min(256, size)
    took, (a, b) = product(n)
    while n < size and 8 * took < budget_s / 10:  # the next side up takes about 8× as long
        n *= 2
        took, (a, b) = product(n)
    best, start = took, time.perf_counter()
    for _ in range(max(1, repeat)):
        if time.perf_counter() - start > budget_s:
            break
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


# ---------------------------------------------------------------------------------------------
# Sampling benchmarks


class RowCounter:
    """Wraps a model function and counts the rows (samples) it was called on."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.rows = 0

    def __call__(self, x: Any, t: Any, **kwargs: Any) -> Any:
        self.rows += int(x.shape[0])
        return self.fn(x, t, **kwargs)


def _run_sampler(pipe: UnclipPipeline, stage: Any, fn: Any, shape: tuple[int, ...], st: Any) -> Any:
    from unclip.diffusion import final
    from unclip.pipeline.runners import running, sampler_steps, stage_generator

    ctx = pipe._ctx(None)  # the pipeline's device, precision and offload
    steps = sampler_steps(
        "decoder", stage, fn, shape, st.sampler, st.steps, st.eta, stage_generator(0, "decoder"),
        ctx,
    )  # fmt: skip
    with running(stage, ctx):  # as the pipeline runs a stage
        return final(steps)


def stage_runners(
    pipe: UnclipPipeline, settings: Any, n: int
) -> dict[str, tuple[Callable[[], Any], RowCounter | None]]:
    """Per stage, a call that runs the stage for ``n`` images at once (the sampler over a
    batch, with the pipeline's guidance wiring) and the row counter of its network."""
    import torch

    from unclip.pipeline.config import upsampler_name
    from unclip.pipeline.runners import TextCondition, decoder_conditions
    from unclip.pipeline.runners import autocast as _autocast
    from unclip.pipeline.runners import guided as _guided
    from unclip.pipeline.runners import model_fn as _model_fn

    dev, dtype = pipe.device, pipe.dtype
    text = pipe._text(CAPTION)
    batch_text = TextCondition(
        CAPTION, text.z_t.expand(n, -1), text.tokens.expand(n, -1, -1), text.mask.expand(n, -1)
    )
    out: dict[str, tuple[Callable[[], Any], RowCounter | None]] = {}
    captions = [CAPTION] * n
    context = pipe.clip.config.context_length

    def encode() -> Any:
        tokens = pipe.tokenizer(captions, context).to(dev)
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            pipe.clip.encode_text_tokens(tokens)
            return pipe.clip.encode_text(tokens)

    out["text"] = (encode, None)

    if pipe.prior is not None and pipe.prior.diffusion is None:  # the autoregressive prior
        prior, st = pipe.prior, settings.prior
        rows = n * st.candidates
        cfg = prior.model.config
        tokens = text.tokens.expand(rows, -1, -1) if cfg.text_dim else None
        mask = text.mask.expand(rows, -1) if cfg.text_dim else None

        def sample_ar() -> Any:
            from unclip.pipeline.runners import stage_generator

            with _autocast(dev, dtype):
                return prior.model.sample(
                    text.z_t.expand(rows, -1), tokens, mask, guidance=st.ar_guidance,
                    temperature=st.temperature, top_k=st.top_k, top_p=st.top_p,
                    generator=stage_generator(0, "prior"),
                )  # fmt: skip

        out["prior"] = (sample_ar, None)
    elif pipe.prior is not None:
        prior, st = pipe.prior, settings.prior
        rows = n * st.candidates
        pc = RowCounter(_model_fn(prior.model))
        pshape = (rows, prior.model.config.clip_dim)

        def sample_prior() -> Any:  # as the pipeline: the caption cache is part of each run
            with _autocast(dev, dtype):
                cond, uncond = prior.model.sampling_conditions(
                    text.z_t.expand(rows, -1), text.tokens.expand(rows, -1, -1),
                    text.mask.expand(rows, -1),
                )  # fmt: skip
            return _run_sampler(pipe, prior, _guided(pc, st.guidance, cond, uncond, False),
                                pshape, st)  # fmt: skip

        out["prior"] = (sample_prior, pc)

    dec, dst = pipe.decoder, settings.decoder
    z_i = torch.nn.functional.normalize(torch.randn(n, dec.model.config.clip_dim), dim=-1).to(dev)
    cond, uncond = decoder_conditions(dec.model, z_i, batch_text)
    dc = RowCounter(_model_fn(dec.model))
    dfn = _guided(dc, dst.guidance, cond, uncond, dec.diffusion.learn_sigma)
    s = pipe.base_size
    dshape = (n, 3, s, s)
    out["decoder"] = (lambda: _run_sampler(pipe, dec, dfn, dshape, dst), dc)

    size = s
    for k, up in enumerate(pipe.upsamplers):
        cfg = up.model.config
        low = torch.rand(n, 3, size, size, device=dev) * 2 - 1
        size = size * cfg.image_size // cfg.low_res_size
        uc = RowCounter(_model_fn(up.model))

        def ufn(x: Any, t: Any, low: Any = low, uc: RowCounter = uc, **kw: Any) -> Any:
            return uc(x, t, low_res=low, **kw)

        name = upsampler_name(k)
        shape = (n, 3, size, size)
        out[name] = (
            lambda up=up, ufn=ufn, shape=shape: _run_sampler(
                pipe, up, ufn, shape, settings.upsampler
            ),
            uc,
        )
    return out


def forward_gflops(pipe: UnclipPipeline) -> dict[str, float]:
    """GFLOPs of one forward pass on one sample, per diffusion stage (and the text encoder)."""
    from unclip.eval.model_stats import model_stats
    from unclip.pipeline.config import upsampler_name

    text_len = pipe.clip.config.context_length
    out = {"text": model_stats(pipe.clip.config, text_len=text_len).flops["caption"] / 1e9}
    if pipe.prior is not None:
        out["prior"] = model_stats(pipe.prior.model.config).gflops
    out["decoder"] = model_stats(pipe.decoder.model.config, text_len=text_len).gflops
    for k, up in enumerate(pipe.upsamplers):
        out[upsampler_name(k)] = model_stats(up.model.config).gflops
    return out


def prior_step_gflops(pipe: UnclipPipeline, steps: int) -> float:
    """GFLOPs per sample of one diffusion-prior sampling step as the pipeline runs it: the
    four tokens after the caption (whose keys and values are cached, see
    ``DiffusionPriorTransformer.caption_cache``) plus the caption pass, made once per run,
    spread over ``steps``."""
    import torch

    from unclip.eval.model_stats import forward_flops

    assert pipe.prior is not None
    model = pipe.prior.model
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x, zt = torch.randn(2, 1, cfg.clip_dim, generator=g)
    t = torch.tensor([500])
    if not cfg.text_dim:  # no caption tokens, no cache: the full forward
        return forward_flops(lambda: model(x, t, zt)) / 1e9
    tokens = torch.randn(1, pipe.clip.config.context_length, cfg.text_dim, generator=g)
    cache: dict[str, Any] = {}
    caption = forward_flops(lambda: cache.update(model.caption_cache(zt, tokens)))
    step = forward_flops(lambda: model(x, t, zt, **cache))
    return (step + caption / steps) / 1e9


def bench_sampling(
    pipe: UnclipPipeline,
    settings: Any,
    *,
    batch: int,
    repeat: int,
    peaks: dict[str, float],
) -> dict[str, Any]:
    """Latency (1 image) and batch throughput per stage and end to end, with achieved
    GFLOP/s and MFU of every network (decoder first among them)."""
    gflops = forward_gflops(pipe)
    if pipe.prior is not None and pipe.prior.diffusion is not None:
        gflops["prior"] = prior_step_gflops(pipe, settings.prior.steps)
    results: dict[str, Any] = {}
    single = stage_runners(pipe, settings, 1)
    many = stage_runners(pipe, settings, batch)
    for name in single:
        row: dict[str, Any] = {"gflops_per_call_sample": gflops.get(name)}
        if name in ("prior", "decoder") or name.startswith("upsampler"):
            st = getattr(settings, "upsampler" if name.startswith("upsampler") else name)
            row["steps"] = st.steps
            row["sampler"] = st.sampler
            if name == "prior" and pipe.prior is not None and pipe.prior.diffusion is None:
                row["steps"] = pipe.prior.model.config.components  # one code per step
                row["sampler"] = "autoregressive"
        for label, runners, n in (("latency", single, 1), (f"batch{batch}", many, batch)):
            fn, counter = runners[name]
            if counter is not None:
                counter.rows = 0
            t = timed(fn, repeat)
            calls_rows = counter.rows / (repeat + 1) if counter is not None else None
            entry: dict[str, Any] = {
                **t,
                "images": n,
                "s_per_image": t["median_s"] / n,
                "images_per_s": n / t["median_s"],
            }
            if calls_rows is not None and gflops.get(name):
                achieved = calls_rows * gflops[name] / t["median_s"]
                entry["rows_per_run"] = calls_rows
                entry["achieved_gflops"] = achieved
                for key, peak in peaks.items():
                    entry[f"mfu_{key}"] = achieved / peak
            row[label] = entry
        results[name] = row

    def e2e(n: int) -> Callable[[], Any]:
        return lambda: pipe.text_to_image(CAPTION, n=n, seed=0, **_overrides(settings))

    row = {}
    for label, n in (("latency", 1), (f"batch{batch}", batch)):
        t = timed(e2e(n), repeat)
        row[label] = {**t, "images": n, "s_per_image": t["median_s"] / n,
                      "images_per_s": n / t["median_s"]}  # fmt: skip
    results["end_to_end"] = row
    return results


def _overrides(settings: Any) -> dict[str, Any]:
    """``text_to_image`` keyword arguments that reproduce ``settings``."""
    out: dict[str, Any] = {}
    for stage in ("prior", "decoder", "upsampler"):
        for key, value in getattr(settings, stage).to_dict().items():
            out[f"{stage}_{key}"] = value
    return out


# ---------------------------------------------------------------------------------------------
# Training benchmarks


def training_setups(
    pipe: UnclipPipeline, batch: dict[str, int], crop_size: int = 0
) -> dict[str, tuple[Any, Callable[..., Any], Callable[[], Any]]]:
    """Per stage: (the network, its training loss ``loss(model, batch)``, a random batch maker)."""
    import torch

    from unclip.clip.text import TextEncoder
    from unclip.pipeline.config import upsampler_name
    from unclip.train.stages.clip import clip_stage_loss
    from unclip.train.stages.decoder import DecoderLoss
    from unclip.train.stages.prior import ARPriorLoss, PriorLoss
    from unclip.train.stages.upsampler import UpsamplerLoss

    dev = pipe.device
    clip = pipe.clip
    text = TextEncoder(clip, tokenizer=pipe.tokenizer)  # captions -> z_t, features, mask
    d = clip.config.embed_dim

    def captions(n: int) -> list[str]:
        return [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]

    def images(n: int, s: int) -> Any:
        return torch.rand(n, 3, s, s, device=dev) * 2 - 1

    def emb(n: int) -> Any:
        return torch.nn.functional.normalize(torch.randn(n, d, device=dev), dim=-1)

    out: dict[str, tuple[Any, Callable[..., Any], Callable[[], Any]]] = {}
    nb = batch.get("clip", 16)
    ctx = clip.config.context_length
    out["clip"] = (
        clip,
        clip_stage_loss,
        lambda: {
            "images": images(nb, clip.config.image_size),
            "tokens": pipe.tokenizer(captions(nb), ctx).to(dev),
        },
    )
    if pipe.prior is not None:
        prior = pipe.prior
        npr = batch.get("prior", 16)
        prior_text = text if prior.model.config.text_dim else None
        prior_loss = (
            ARPriorLoss(prior_text)
            if prior.diffusion is None
            else PriorLoss(prior.diffusion, prior.model.embed_scale, prior_text)
        )
        out["prior"] = (prior.model, prior_loss, lambda: (emb(npr), emb(npr), captions(npr)))
    dec = pipe.decoder
    nd = batch.get("decoder", 16)
    out["decoder"] = (
        dec.model,
        DecoderLoss(dec.diffusion, text if dec.model.config.text_dim else None,
                    dec.model.config.inpaint),
        lambda: (images(nd, pipe.base_size), emb(nd), captions(nd)),
    )  # fmt: skip
    for k, up in enumerate(pipe.upsamplers):
        nu = batch.get("upsampler", 16)
        size = up.model.config.image_size
        name = upsampler_name(k)
        out[name] = (
            up.model,
            UpsamplerLoss(up.diffusion, up.model.config, crop_size),
            lambda nu=nu, size=size: images(nu, size),
        )
    return out


def bench_training(
    pipe: UnclipPipeline,
    *,
    batch: dict[str, int],
    steps: int,
    bf16: bool,
    crop_size: int,
    peaks: dict[str, float],
) -> dict[str, Any]:
    """Samples/s of ``steps`` optimizer steps per stage (after one warm-up step), each on a
    copy of the stage's network in training mode."""
    import torch

    from unclip.config import TrainConfig
    from unclip.pipeline.stages import plain_copy
    from unclip.train.loop import autocast_context, build_optimizer

    gflops = forward_gflops(pipe)
    results: dict[str, Any] = {}
    for name, (model, loss_fn, make_batch) in training_setups(pipe, batch, crop_size).items():
        net = plain_copy(model).float().train().requires_grad_(True)
        opt = build_optimizer(net, TrainConfig())
        n = 0

        def step(net: Any = net, opt: Any = opt, loss_fn: Any = loss_fn,
                 make_batch: Any = make_batch) -> None:  # fmt: skip
            nonlocal n
            data = make_batch()
            with autocast_context(pipe.device, bf16):
                out = loss_fn(net, data)
            loss = out[0] if isinstance(out, tuple) else out
            opt.zero_grad(set_to_none=True)
            loss.float().backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            first = data["images"] if isinstance(data, dict) else data
            n = int((first[0] if isinstance(first, tuple) else first).shape[0])

        t = timed(step, steps)
        row: dict[str, Any] = {**t, "batch": n, "samples_per_s": n / t["median_s"]}
        if name != "clip":  # diffusion stages: a training step ≈ 3× the forward FLOPs
            scale = 1.0
            if name.startswith("upsampler") and crop_size:
                # trained on crops: a crop costs (crop / size)² of the full image
                scale = (crop_size / model.config.image_size) ** 2
            achieved = 3 * gflops[name] * scale * n / t["median_s"]
            row["achieved_gflops"] = achieved
            for key, peak in peaks.items():
                row[f"mfu_{key}"] = achieved / peak
        results[name] = row
        del net, opt
    return results
