"""``unclip bench``: how fast a pipeline samples and trains on this machine, and how much of
the machine's matrix-multiply peak the decoder uses.

For a pipeline (a shipped name such as ``emoji-small``, a pipeline folder, or random weights
built from a folder of run configs with ``--configs``) it measures, per stage (CLIP text
encoder, prior, decoder, each upsampler) and end to end:

- latency: one image, with the pipeline's sampling settings (steps, guidance, candidates);
- throughput: one batch of ``--batch`` images through the stage's sampler at once (what a
  batched pipeline could reach), and ``text_to_image(n=batch)`` end to end (what users get);
- the decoder's achieved FLOP/s: forward FLOPs per sample and model call
  (:mod:`unclip.eval.model_stats`) × the rows the sampler actually fed the network, over the
  measured time, against the measured fp32 and bf16 matrix-multiply peak (model FLOPs
  utilisation, MFU);
- training throughput: samples/s of a few optimizer steps (the stage's own loss, AdamW, bf16
  autocast as ``unclip train`` does) per stage on random data, and the decoder's training MFU
  (a training step counted as 3× the forward FLOPs).

Timings are medians of ``--repeat`` runs after a warm-up run; ratios against other tools are
the business of ``benchmarks/`` (taken side by side in one run).

The helpers here (random pipelines from run configs, timing, Markdown sections of
``docs/benchmarks.md``) are shared with the scripts in ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unclip.commands import add_dtype_argument, bench_train

if TYPE_CHECKING:
    import torch

    from unclip.pipeline import UnclipPipeline

DEFAULT_PIPELINE = "emoji-small"
#: ``unclip bench train STAGE``: the training-step profile (:mod:`unclip.commands.bench_train`)
TRAIN = "train"
#: where ``--configs`` falls back to when a pipeline name is not shipped (yet)
CONFIGS_ROOT = Path("configs")
#: the caption every benchmark encodes (its content does not change the cost)
CAPTION = "cherry blossom, noto style"
CAPTIONS = [
    "a red square", "a green circle", "a blue square", "a black circle", "a red apple",
    "cherry blossom, noto style", "a yellow star", "a smiling face, twemoji style",
    "grinning face, fluent flat style", "red heart, openmoji style",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Timing and reporting helpers (also used by benchmarks/*.py)


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


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeat: int = 10) -> float:
    """Best-of-``repeat`` FLOP/s of a ``size``² matrix product in ``dtype`` (the method of
    ``benchmarks/matmul_peak.py``, which the package cannot import)."""
    import torch

    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats are printed with 4 significant digits."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


DOC_TITLE = "# Benchmarks\n\nWritten by the scripts in `benchmarks/` and `unclip bench`; each "
DOC_TITLE += "section is replaced when its script runs again.\n"


def write_doc_section(path: str | Path, name: str, body: str) -> Path:
    """Replace (or append) the section ``name`` of the Markdown file ``path``: the text between
    ``<!-- name:start -->`` and ``<!-- name:end -->``; other sections are kept."""
    path = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.is_file() else DOC_TITLE
    if start in text and end in text:
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (context for absolute times)."""
    import os
    import platform

    import torch

    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


# ---------------------------------------------------------------------------------------------
# Pipelines with random weights from run configs


@dataclasses.dataclass
class StageConfigs:
    """Model and diffusion configs of every stage (what ``configs/<name>/*.json`` hold),
    the training batch size of each stage and the upsampler's training crop."""

    name: str
    clip: Any
    decoder: Any
    decoder_diffusion: Any
    prior: Any = None
    prior_diffusion: Any = None
    upsamplers: list[tuple[Any, Any]] = dataclasses.field(default_factory=list)
    train_batch: dict[str, int] = dataclasses.field(default_factory=dict)
    crop_size: int = 0


def stage_configs_from_dir(folder: str | Path) -> StageConfigs:
    """The stage configs in a folder of run configs (``clip.json``, ``decoder.json`` and
    optionally ``prior.json``, ``upsampler.json``). The pipeline's decoder is the plain one
    (``inpaint`` off), as a pipeline folder's ``decoder/`` must be."""
    from unclip.run_configs import (
        ClipRunConfig,
        DecoderRunConfig,
        PriorRunConfig,
        UpsamplerRunConfig,
    )

    folder = Path(folder)
    for need in ("clip.json", "decoder.json"):
        if not (folder / need).is_file():
            raise FileNotFoundError(f"{folder}: no {need}; --configs needs a folder of run configs")
    clip = ClipRunConfig.load(folder / "clip.json")
    dec = DecoderRunConfig.load(folder / "decoder.json")
    sc = StageConfigs(
        name=folder.name,
        clip=clip.model,
        decoder=dec.model.replace(inpaint=False),
        decoder_diffusion=dec.diffusion,
        train_batch={"clip": clip.train.batch_size, "decoder": dec.train.batch_size},
    )
    if (folder / "prior.json").is_file():
        prior = PriorRunConfig.load(folder / "prior.json")
        sc.prior, sc.prior_diffusion = prior.model, prior.diffusion
        sc.train_batch["prior"] = prior.train.batch_size
    if (folder / "upsampler.json").is_file():
        up = UpsamplerRunConfig.load(folder / "upsampler.json")
        sc.upsamplers = [(up.model, up.diffusion)]
        sc.train_batch["upsampler"] = up.train.batch_size
        sc.crop_size = up.crop_size
    return sc


def tiny_stage_configs() -> StageConfigs:
    """Tiny stages (16 px decoder -> 32 px upsampler) for quick checks of the benchmarks."""
    from unclip.clip.model import CLIPConfig
    from unclip.config import DiffusionConfig
    from unclip.decoder.unet import UNetConfig
    from unclip.decoder.upsampler import UpsamplerConfig
    from unclip.prior.model import PriorConfig

    clip = CLIPConfig(
        embed_dim=32, context_length=16, vocab_size=1024, text_width=32, text_layers=1,
        text_heads=2, image_size=32, patch_size=8, vision_width=32, vision_layers=1,
        vision_heads=2,
    )  # fmt: skip
    decoder = UNetConfig(
        image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(8,), num_head_channels=32, clip_dim=32, clip_tokens=4,
        text_dim=32, learn_sigma=True,
    )  # fmt: skip
    prior = PriorConfig(clip_dim=32, text_dim=32, text_len=16, width=64, layers=1, heads=2)
    up = UpsamplerConfig(
        image_size=32, low_res_size=16, model_channels=32, channel_mult=(1, 2),
        num_res_blocks=1, learn_sigma=True,
    )  # fmt: skip
    sigma = DiffusionConfig(timesteps=100, prediction="v", learn_sigma=True, loss="hybrid")
    return StageConfigs(
        name="tiny",
        clip=clip,
        decoder=decoder,
        decoder_diffusion=sigma,
        prior=prior,
        prior_diffusion=DiffusionConfig(timesteps=100, prediction="x0", clip_denoised=False),
        upsamplers=[(up, DiffusionConfig(timesteps=100, learn_sigma=True, loss="hybrid"))],
        train_batch={"clip": 4, "prior": 4, "decoder": 2, "upsampler": 2},
        crop_size=0,
    )


def randomize_zeros(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Give the zero-initialised parameters (output layers) random values, so an untrained
    network's output depends on its inputs, as a trained one's does."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and torch.all(p == 0):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def random_pipeline(
    sc: StageConfigs,
    *,
    seed: int = 0,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | str | None = None,
) -> UnclipPipeline:
    """An :class:`~unclip.pipeline.UnclipPipeline` with random weights at the sizes of
    ``sc`` (built in memory; the tokenizer is learnt from a few captions)."""
    import torch

    from unclip.clip.model import CLIP
    from unclip.decoder.unet import UNet
    from unclip.decoder.upsampler import Upsampler
    from unclip.diffusion import GaussianDiffusion
    from unclip.pipeline import PipelineConfig, SamplingConfig, StagesConfig, UnclipPipeline
    from unclip.pipeline.config import upsampler_name
    from unclip.pipeline.loading import Stage, parse_device
    from unclip.prior.model import DiffusionPriorTransformer
    from unclip.tokenizer import train_tokenizer

    dev = parse_device(device)
    torch.manual_seed(seed)
    clip = CLIP(sc.clip).eval().to(dev)
    vocab = max(600, min(sc.clip.vocab_size, 1024))
    tokenizer = train_tokenizer(CAPTIONS * 4, vocab, context_length=sc.clip.context_length)

    def stage(model: torch.nn.Module, diffusion: Any, k: int) -> Stage:
        randomize_zeros(model, seed + k)
        return Stage(model.eval().to(dev), GaussianDiffusion.from_config(diffusion))

    prior = None
    if sc.prior is not None:
        prior = stage(DiffusionPriorTransformer(sc.prior), sc.prior_diffusion, 1)
    decoder = stage(UNet(sc.decoder), sc.decoder_diffusion, 2)
    ups = [stage(Upsampler(m), d, 3 + i) for i, (m, d) in enumerate(sc.upsamplers)]
    names = [upsampler_name(i) for i in range(len(ups))]
    config = PipelineConfig(
        name=sc.name,
        stages=StagesConfig(prior="prior" if prior else None, upsamplers=names),
        sampling=SamplingConfig(),
    )
    return UnclipPipeline(
        tokenizer=tokenizer, clip=clip, prior=prior, decoder=decoder, upsamplers=ups,
        config=config, device=dev, dtype=dtype,
    )  # fmt: skip


def open_pipeline(
    name_or_path: str,
    *,
    configs: str | None = None,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
) -> tuple[UnclipPipeline, StageConfigs | None, str]:
    """(pipeline, its stage configs when built from run configs, where the weights came from).

    ``configs``: build random weights from that folder of run configs. Otherwise load
    ``name_or_path``; a name that is not shipped yet but has ``configs/<name>/`` falls back
    to random weights from there (speed does not depend on the weights' values)."""
    from unclip.pipeline import load_pipeline

    if configs is None:
        try:
            pipe = load_pipeline(name_or_path, device=device, dtype=dtype)
            return pipe, None, str(pipe.path)
        except FileNotFoundError:
            fallback = CONFIGS_ROOT / name_or_path
            if "/" in name_or_path or not (fallback / "decoder.json").is_file():
                raise
            print(
                f"unclip bench: no pipeline {name_or_path!r} installed; using random weights "
                f"at the sizes of {fallback}/",
                file=sys.stderr,
            )
            configs = str(fallback)
    sc = stage_configs_from_dir(configs)
    pipe = random_pipeline(sc, device=device or "cpu", dtype=dtype)
    return pipe, sc, f"random weights from {configs}"


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
    from unclip.pipeline.runners import sampler_steps, stage_generator, stage_precision

    steps = sampler_steps(
        "decoder", stage, fn, shape, st.sampler, st.steps, st.eta, stage_generator(0, "decoder"),
        None, pipe.device,
    )  # fmt: skip
    with stage_precision(stage.model, pipe.device, pipe.dtype):  # as the pipeline runs a stage
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


def _stage_model(pipe: UnclipPipeline, name: str) -> Any:
    if name == "prior":
        return pipe.prior.model if pipe.prior else None
    if name == "decoder":
        return pipe.decoder.model
    if name.startswith("upsampler"):
        return pipe.upsamplers[int(name.removeprefix("upsampler") or 1) - 1].model
    return None


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
    from unclip.pipeline.loading import plain_copy
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


# ---------------------------------------------------------------------------------------------
# The command


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure sampling latency/throughput per stage, decoder MFU and training speed",
        description="Measure a pipeline on this machine: per stage (text encoder, prior, "
        "decoder, upsamplers) and end to end, the latency of one image and the throughput of "
        "a batch; the decoder's achieved FLOP/s against the measured fp32 and bf16 "
        "matrix-multiply peak (model FLOPs utilisation); and training samples/s per stage on "
        "random data. Times are medians after a warm-up run. `unclip bench train STAGE "
        "--config FILE` profiles one training step of a stage instead: where its time goes.",
    )
    p.add_argument(
        "pipeline",
        nargs="?",
        default=DEFAULT_PIPELINE,
        help=f"pipeline name or folder (default: {DEFAULT_PIPELINE}; a name not installed "
        "falls back to random weights from configs/NAME/)",
    )
    p.add_argument("--configs", help="use random weights at the sizes of this run-config folder")
    p.add_argument("--batch", type=int,
                   help="images per batch (default 8); with train: the training batch "
                   "(default: the config's)")  # fmt: skip
    p.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (default 3)")
    add_dtype_argument(p, choices=("auto", "float32", "bfloat16"))
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the sampling networks (warm-up runs absorb compiling)",
    )
    p.add_argument("--prior-steps", type=int, help="override the pipeline's prior steps")
    p.add_argument("--decoder-steps", type=int, help="override the pipeline's decoder steps")
    p.add_argument("--upsampler-steps", type=int, help="override the upsampler steps")
    p.add_argument("--train-steps", type=int, default=3,
                   help="timed optimizer steps per stage (default 3; 0 = skip training)")  # fmt: skip
    p.add_argument("--train-batch", type=int,
                   help="training batch for every stage (default: the run configs' batch "
                   "sizes where known, else 16)")  # fmt: skip
    p.add_argument("--train-fp32", action="store_true", help="train in float32 (no bf16)")
    p.add_argument("--peak-fp32", type=float, help="fp32 matmul peak in GFLOP/s (skip measuring)")
    p.add_argument("--peak-bf16", type=float, help="bf16 matmul peak in GFLOP/s (skip measuring)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--quick", action="store_true",
                   help="a quick check: 2 steps per stage, batch 2, 1 repeat, 1 training step")  # fmt: skip
    p.add_argument("--doc", help="also write the tables as a section of this Markdown file")
    p.add_argument("--json", action="store_true", help="print JSON")
    bench_train.add_args(p)
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    import torch

    if args.pipeline == TRAIN:
        return bench_train.run(args)
    if args.stage is not None:
        raise ValueError(f"unclip bench: STAGE {args.stage!r} goes with `unclip bench train`")
    args.batch = 8 if args.batch is None else args.batch
    if args.threads:
        torch.set_num_threads(args.threads)
    for key in ("batch", "repeat", "train_batch", "prior_steps", "decoder_steps",
                "upsampler_steps"):  # fmt: skip
        value = getattr(args, key)
        if value is not None and value < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {value}")
    if args.train_steps < 0:
        raise ValueError(f"--train-steps must be >= 0, got {args.train_steps}")
    if args.quick:
        args.batch, args.repeat = min(args.batch, 2), 1
        args.train_steps = min(args.train_steps, 1)
        args.train_batch = args.train_batch or 2
        for key in ("prior_steps", "decoder_steps", "upsampler_steps"):
            setattr(args, key, getattr(args, key) or 2)
    pipe, sc, source = open_pipeline(
        args.pipeline, configs=args.configs, device=args.device, dtype=args.dtype
    )
    args.dtype = str(pipe.dtype).removeprefix("torch.")  # what "auto" chose
    if args.compile:
        pipe.compile()
    settings = pipe.sampling_settings(
        prior_steps=args.prior_steps,
        decoder_steps=args.decoder_steps,
        upsampler_steps=args.upsampler_steps,
    )
    size, rep = (512, 2) if args.quick else (2048, 10)
    peaks = {
        "fp32": args.peak_fp32 or matmul_peak(torch.float32, size, rep) / 1e9,
        "bf16": args.peak_bf16 or matmul_peak(torch.bfloat16, size, rep) / 1e9,
    }
    result: dict[str, Any] = {
        "pipeline": pipe.name,
        "weights": source,
        "device": str(pipe.device),
        "dtype": args.dtype,
        "compiled": bool(args.compile),
        "quick": args.quick,
        "machine": machine_info(),
        "peak_gflops": peaks,
        "settings": settings.to_dict(),
        "sampling": bench_sampling(
            pipe, settings, batch=args.batch, repeat=args.repeat, peaks=peaks
        ),
    }
    if args.train_steps:
        known = sc.train_batch if sc is not None else {}
        batch = {k: args.train_batch or known.get(k, 16)
                 for k in ("clip", "prior", "decoder", "upsampler")}  # fmt: skip
        result["training"] = bench_training(
            pipe, batch=batch, steps=args.train_steps, bf16=not args.train_fp32,
            crop_size=sc.crop_size if sc is not None else 0, peaks=peaks,
        )  # fmt: skip
        result["training_precision"] = "float32" if args.train_fp32 else "bf16 autocast"
    if args.doc:
        write_doc_section(args.doc, "unclip-bench", format_markdown(result))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_markdown(result))
    return 0


def format_markdown(r: dict[str, Any]) -> str:
    """The ``unclip bench`` result as Markdown tables."""
    peaks = r["peak_gflops"]
    lines = [
        "## `unclip bench`",
        "",
        f"Pipeline {r['pipeline']} ({r['weights']}), device {r['device']}, sampling in "
        f"{r['dtype']}{' (torch.compile)' if r.get('compiled') else ''}, channels-last "
        f"convolutions, {r['machine']['threads']} threads, {r['machine']['time']}"
        + (" — **quick mode: not a measurement**" if r.get("quick") else "")
        + ". Measured matmul peak: "
        f"{peaks['fp32']:.0f} GFLOP/s fp32, {peaks['bf16']:.0f} GFLOP/s bf16.",
        "",
    ]
    rows = []
    for name, row in r["sampling"].items():
        keys = [k for k in row if k == "latency" or k.startswith("batch")]
        lat, bat = row[keys[0]], row[keys[1]]
        rows.append((
            name, row.get("steps", ""), f"{1000 * lat['median_s']:.1f}",
            f"{bat['images_per_s']:.3g}", _mfu(lat), _mfu(bat),
        ))  # fmt: skip
    batch = next(k for k in next(iter(r["sampling"].values())) if k.startswith("batch"))
    lines.append(markdown_table(
        ["stage", "steps", "latency 1 image (ms)", f"images/s ({batch})",
         "GFLOP/s, MFU fp32/bf16 (1 image)", f"GFLOP/s, MFU fp32/bf16 ({batch})"],
        rows,
    ))  # fmt: skip
    if "prior" in r["sampling"]:
        lines += ["", "The prior's FLOPs are those of its sampling steps: the four tokens after "
                  "the caption, whose keys and values are computed once per run."]  # fmt: skip
    if "training" in r:
        lines += ["", f"Training ({r['training_precision']}, AdamW, random data):", ""]
        rows = [
            (name, row["batch"], f"{1000 * row['median_s']:.1f}", f"{row['samples_per_s']:.3g}",
             _mfu(row))
            for name, row in r["training"].items()
        ]  # fmt: skip
        lines.append(markdown_table(
            ["stage", "batch", "step (ms)", "samples/s", "GFLOP/s (3× fwd), MFU fp32/bf16"], rows
        ))  # fmt: skip
    return "\n".join(lines)


def _mfu(entry: dict[str, Any]) -> str:
    if "achieved_gflops" not in entry:
        return ""
    return (
        f"{entry['achieved_gflops']:.3g}, {100 * entry['mfu_fp32']:.1f}% / "
        f"{100 * entry['mfu_bf16']:.1f}%"
    )
