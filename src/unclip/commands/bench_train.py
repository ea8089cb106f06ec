"""``unclip bench train STAGE --config FILE``: where the time of one training step goes.

The stage is built as ``unclip train STAGE`` builds it (its network, its loss, a
:class:`~unclip.train.loop.Trainer` with the config's optimizer, EMA, precision and data
loader) and trained for a few steps that do what :meth:`Trainer.fit` does per step, with a
clock read between the parts:

- ``data``: the next micro-batch from the loader and its copy to the device;
- ``text``: the frozen CLIP text encoder inside the loss (prior, decoder);
- ``conditioning``: the rest of the loss before the network runs (inpainting masks, crops,
  low-resolution inputs, timesteps, noise, CLIP's preprocessing);
- ``forward``: the network and the loss terms after it;
- ``backward``; ``grad_clip`` (the trainer's gradient-norm clipping); ``optimizer`` (AdamW
  step and zeroing the gradients); ``ema``;
- ``logging``: setting the learning rate, and the host's one read of the loss, metrics and
  finiteness flag, which the trainer does only on the config's logging steps.

On CUDA each clock reading follows ``torch.cuda.synchronize()``, so a part is charged its own
GPU time; the same steps run without the clock give the free-running samples/s. Model FLOPs
per sample are counted once with :class:`torch.utils.flop_counter.FlopCounterMode` (matrix
products, convolutions, attention; forward and backward, the frozen text encoder's forward
included), and MFU is achieved FLOP/s over the peak: a measured dense matrix product on the
device in the step's precision (bf16 under autocast, else fp32), or ``--peak-bf16`` /
``--peak-fp32``.

``loss outside the network``: the stage's loss with the network replaced by a stand-in that
returns zeros of the network's output shape, on a batch already on the device: the loss's own
work (text encoder, masks, diffusion terms), which must stay small beside the network.

Data is synthetic by default (random images and CLIP embeddings at the config's sizes,
captions from a fixed list; the text encoder is the config's ``clip`` folder if it exists,
else random weights at the sizes of ``clip.json`` beside the config), so the profile runs
without the data set; ``--real-data`` reads the config's data set and embeddings instead.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STAGES = ("clip", "prior", "decoder", "upsampler")
PARTS = ("data", "text", "conditioning", "forward", "backward", "grad_clip", "optimizer",
         "ema", "logging")  # fmt: skip
#: the parts a step cannot do without; the rest is overhead to keep small
MODEL_PARTS = ("forward", "backward", "grad_clip", "optimizer")
#: samples in the synthetic data set: as many as a real one (an epoch's end restarts the
#: loader's workers), drawn from a pool of distinct items (the loader still collates each)
SYNTHETIC_ITEMS, SYNTHETIC_POOL = 1 << 16, 512
DOC_SECTION = "bench-train-{stage}"


# ---------------------------------------------------------------------------------------------
# The clock


class Clock:
    """Charges the time since the last reading to a part; on CUDA it synchronises first."""

    def __init__(self, device: Any, enabled: bool = True) -> None:
        import torch

        self.enabled = enabled
        cuda = device.type == "cuda"
        self._sync: Callable[[], None] = torch.cuda.synchronize if cuda else (lambda: None)
        self.parts: dict[str, float] = dict.fromkeys(PARTS, 0.0)
        self.t = self.t0 = self.wall = 0.0

    def start(self) -> None:
        if self.enabled:
            self._sync()
            self.t = self.t0 = time.perf_counter()

    def stop(self) -> None:
        """Add the wall time since :meth:`start` to ``wall`` (read apart from the laps)."""
        if self.enabled:
            self._sync()
            self.wall += time.perf_counter() - self.t0

    def lap(self, part: str) -> None:
        if self.enabled:
            self._sync()
            now = time.perf_counter()
            self.parts[part] += now - self.t
            self.t = now


class TimedText:
    """The frozen text encoder, its calls charged to ``text`` (what came before to
    ``conditioning``)."""

    def __init__(self, text: Any, clock: Clock) -> None:
        self.text, self.clock = text, clock

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.clock.lap("conditioning")
        out = self.text(*args, **kwargs)
        self.clock.lap("text")
        return out


class StandIn:
    """The network replaced by zeros of its output's structure (shapes and dtypes recorded
    from one real call); requires no gradient."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec

    @staticmethod
    def spec_of(out: Any) -> Any:
        if isinstance(out, (tuple, list)):
            return type(out)(StandIn.spec_of(o) for o in out)
        return (tuple(out.shape), out.dtype, out.device)

    def _zeros(self, spec: Any) -> Any:
        import torch

        if len(spec) == 3 and isinstance(spec[1], torch.dtype):  # one tensor's
            return torch.zeros(spec[0], dtype=spec[1], device=spec[2])
        return type(spec)(self._zeros(s) for s in spec)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._zeros(self.spec)


# ---------------------------------------------------------------------------------------------
# Stages on synthetic or real data


class SyntheticItems:
    """``SYNTHETIC_ITEMS`` items of the stage's shapes: ``fields`` names each item's parts
    (``image``, ``emb``, ``caption``); item i is pool item i mod ``SYNTHETIC_POOL``."""

    def __init__(self, fields: tuple[str, ...], image_size: int = 0, dim: int = 0) -> None:
        import torch

        from unclip.commands.random_pipelines import CAPTIONS

        g = torch.Generator().manual_seed(0)
        n = SYNTHETIC_POOL
        self.fields = fields
        self.images = torch.rand(n, 3, image_size, image_size, generator=g) * 2 - 1
        emb = torch.randn(n, 2, max(dim, 1), generator=g)
        self.emb = torch.nn.functional.normalize(emb, dim=-1)
        self.captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]

    def __len__(self) -> int:
        return SYNTHETIC_ITEMS

    def __getitem__(self, i: int) -> Any:
        i %= SYNTHETIC_POOL
        parts = {"image": self.images[i], "emb": self.emb[i, 0], "emb2": self.emb[i, 1],
                 "caption": self.captions[i]}  # fmt: skip
        out = tuple(parts[f] for f in self.fields)
        return out[0] if len(out) == 1 else out


def _tokenizer(vocab_size: int, context_length: int) -> Any:
    from unclip.commands.random_pipelines import CAPTIONS
    from unclip.tokenizer import train_tokenizer

    return train_tokenizer(CAPTIONS * 4, max(600, min(vocab_size, 1024)),
                           context_length=context_length)  # fmt: skip


def _text_encoder(cfg: Any, config: Path, tmp: Path, real: bool, max_len: int | None) -> Any:
    """The frozen text encoder of a prior/decoder run config (None without ``text_dim``)."""
    from unclip.clip.model import CLIP, CLIPConfig
    from unclip.hub import save_pretrained
    from unclip.run_configs import ClipRunConfig
    from unclip.train.stages.common import text_encoder_for

    if not cfg.model.text_dim:
        return None
    if real or (cfg.clip and Path(cfg.clip).is_dir()):
        return text_encoder_for(cfg, str(config), max_len)
    beside = config.parent / "clip.json"
    width, dim = cfg.model.text_dim, cfg.model.clip_dim
    clip_cfg = ClipRunConfig.load(beside).model if beside.is_file() else CLIPConfig()
    ctx = min(clip_cfg.context_length, max_len or clip_cfg.context_length)
    if clip_cfg.text_width != width:  # heads of 64 channels, as CLIP's text encoder has
        clip_cfg = clip_cfg.replace(text_width=width, text_heads=max(1, width // 64))
    clip_cfg = clip_cfg.replace(embed_dim=dim, context_length=ctx)
    folder = tmp / "clip"
    save_pretrained(CLIP(clip_cfg), folder)
    _tokenizer(clip_cfg.vocab_size, ctx).save(folder / "tokenizer")
    return text_encoder_for(cfg.replace(clip=str(folder)), str(config), max_len)


def build_stage(stage: str, config: Path, tmp: Path, real: bool) -> dict[str, Any]:
    """The stage's run config, network, loss and data (+ collate_fn), as ``unclip train``."""
    from unclip.diffusion import GaussianDiffusion
    from unclip.run_configs import (
        ClipRunConfig,
        DecoderRunConfig,
        PriorRunConfig,
        UpsamplerRunConfig,
    )
    from unclip.train.stages import common

    where = str(config)
    if stage == "clip":
        from unclip.clip.model import CLIP
        from unclip.tokenizer import Tokenizer
        from unclip.train.stages.clip import CaptionedImages, Collate, clip_stage_loss

        cfg = ClipRunConfig.load(config)
        m = cfg.model
        if real:
            tokenizer = Tokenizer.load(cfg.data.tokenizer)
            data: Any = CaptionedImages(common.open_images(cfg))
        else:
            tokenizer = _tokenizer(m.vocab_size, m.context_length)
            data = SyntheticItems(("image", "caption"), cfg.data.image_size or m.image_size)
        collate = Collate(tokenizer, m.context_length)
        return dict(cfg=cfg, model=CLIP(m), loss=clip_stage_loss, data=data, collate=collate)
    if stage == "prior":
        from unclip.prior.model import DiffusionPriorTransformer
        from unclip.train.stages.prior import PriorItems, PriorLoss, prior_type

        if prior_type(argparse.Namespace(type=None, config=where, run_dir=str(tmp))) != "diffusion":
            raise ValueError(f"{config}: bench train profiles the diffusion prior only")
        cfg = PriorRunConfig.load(config)
        text = _text_encoder(cfg, config, tmp, real, cfg.model.text_len)
        rows: Any = (common.embedding_shards(cfg, where) if real
                     else SyntheticItems(("emb", "emb2", "caption"), dim=cfg.model.clip_dim))  # fmt: skip
        data = PriorItems(rows) if real else rows
        if text is not None:  # as `unclip train` does: the run's captions encoded once
            text.precompute(rows.captions)
        loss = PriorLoss(GaussianDiffusion.from_config(cfg.diffusion), cfg.model.embed_scale, text)
        return dict(cfg=cfg, model=DiffusionPriorTransformer(cfg.model), loss=loss, data=data)
    if stage == "decoder":
        from unclip.decoder.unet import UNet
        from unclip.train.stages.decoder import DecoderLoss, ImagesWithEmbeddings

        cfg = DecoderRunConfig.load(config)
        common.check_pixel_stage(cfg, where)
        text = _text_encoder(cfg, config, tmp, real, None)
        if real:
            shards = common.embedding_shards(cfg, where)
            data = ImagesWithEmbeddings(common.open_images(cfg), shards)
            captions = shards.captions
        else:
            data = SyntheticItems(("image", "emb", "caption"), cfg.data.image_size,
                                  cfg.model.clip_dim)  # fmt: skip
            captions = data.captions
        if text is not None:  # as `unclip train` does: the run's captions encoded once
            text.precompute(captions)
        diffusion = GaussianDiffusion.from_config(cfg.diffusion)
        loss = DecoderLoss(diffusion, text, cfg.model.inpaint, cfg.inpaint_prob)
        return dict(cfg=cfg, model=UNet(cfg.model), loss=loss, data=data)
    if stage == "upsampler":
        from unclip.decoder.upsampler import Upsampler
        from unclip.train.stages.upsampler import Images, UpsamplerLoss

        cfg = UpsamplerRunConfig.load(config)
        common.check_pixel_stage(cfg, where)
        data = (Images(common.open_images(cfg)) if real
                else SyntheticItems(("image",), cfg.data.image_size))  # fmt: skip
        diffusion = GaussianDiffusion.from_config(cfg.diffusion)
        loss = UpsamplerLoss(diffusion, cfg.model, cfg.crop_size)
        return dict(cfg=cfg, model=Upsampler(cfg.model), loss=loss, data=data)
    raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")


# ---------------------------------------------------------------------------------------------
# The step, as Trainer.fit takes it


def train_step(trainer: Any, batches: Any, clock: Clock, params: list[Any]) -> None:
    """One optimizer step as :meth:`Trainer.fit` takes it (:meth:`Trainer.train_step`, without
    checkpoints and the progress bar), the clock read between the parts. ``logging``: setting
    the learning rate, and on the config's logging steps the host's read of the numbers."""
    clock.start()
    trainer.set_lr()
    clock.lap("logging")
    stats = trainer.train_step(batches, params, lap=clock.lap)
    if trainer.step % trainer.config.log_every == 0:
        trainer.check_finite()
        _ = {k: float(v) for k, v in stats.items()}
    clock.lap("logging")
    clock.stop()


def measure_peak(device: Any, dtype: Any) -> float:
    """FLOP/s of the best of a few dense matrix products in ``dtype`` on ``device``."""
    import torch

    from unclip.commands.bench_measure import matmul_peak

    if device.type != "cuda":
        return matmul_peak(dtype, 2048, 5)
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * 8192**3 / best


def profile(
    stage: str,
    config: str | Path,
    *,
    batch: int | None = None,
    device: str | None = None,
    steps: int = 3,
    warmup: int = 1,
    real_data: bool = False,
    peaks_gflops: dict[str, float | None] | None = None,
    loss_only: bool = False,
    float32: bool = False,
) -> dict[str, Any]:
    """Profile ``steps`` training steps of ``stage`` (after ``warmup`` untimed ones, the first
    of them counting FLOPs); returns the parts (ms per step), samples/s and MFU. ``float32``:
    train without bf16 autocast whatever the config says.

    ``peaks_gflops``: known peaks by precision (``"bf16"``, ``"fp32"``); the step's is
    measured where it is missing. ``loss_only``: time only the loss outside the network
    (one real forward, without gradients, gives the stand-in its output shapes)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from unclip.train.checkpoint import seed_everything
    from unclip.train.loop import Trainer, autocast_context, default_device, move_to

    if steps < 1 or warmup < 1 or (batch is not None and batch < 1):
        raise ValueError("--steps, --warmup and --batch must be at least 1")
    config = Path(config)
    with tempfile.TemporaryDirectory(prefix="unclip-bench-train-") as tmp:
        seed_everything(0)
        s = build_stage(stage, config, Path(tmp), real_data)
        cfg = s["cfg"]
        train = cfg.train.replace(batch_size=batch or cfg.train.batch_size)
        if float32:
            train = train.replace(bf16=False)
        n = train.batch_size
        dev = torch.device(device) if device else default_device()
        clock = Clock(dev, enabled=False)
        text = getattr(s["loss"], "text", None)
        if text is not None:
            s["loss"].text = TimedText(text, clock)
        trainer = Trainer(s["model"], s["loss"], s["data"], train, Path(tmp) / "run", device=dev,
                          progress=False, collate_fn=s.get("collate"))  # fmt: skip
        seed_everything(train.seed)
        net = trainer.model
        spec: list[Any] = []
        net.register_forward_pre_hook(lambda *_: clock.lap("conditioning"))
        net.register_forward_hook(lambda _m, _a, out: spec.append(StandIn.spec_of(out)))
        params = [p for p in net.parameters() if p.requires_grad]
        batches = iter(trainer.batches)
        net.train()
        head = {"stage": stage, "config": str(config), "device": str(dev), "batch": n,
                "data": "real" if real_data else "synthetic", "steps": steps,
                "threads": torch.get_num_threads(),
                "precision": "bf16 autocast" if trainer.bf16 else "float32"}  # fmt: skip
        if loss_only:
            with torch.no_grad(), autocast_context(dev, trainer.bf16):
                s["loss"](net, move_to(next(batches), dev))
            loss_ms = loss_outside_network(trainer, s["loss"], batches, spec[-1], steps)
            return {**head, "loss_outside_network_ms": loss_ms}
        with FlopCounterMode(display=False) as counter:
            train_step(trainer, batches, clock, params)
        flops = counter.get_total_flops()
        for _ in range(warmup - 1):
            train_step(trainer, batches, clock, params)
        free_clock = Clock(dev)  # the same steps without the clock between the parts
        free_clock.start()
        for _ in range(steps):
            train_step(trainer, batches, clock, params)
        free_clock.stop()
        free = free_clock.wall / steps
        clock.enabled = True
        for _ in range(steps):
            train_step(trainer, batches, clock, params)
        parts = {k: 1000 * v / steps for k, v in clock.parts.items()}
        step_s = clock.wall / steps
        loss_ms = loss_outside_network(trainer, s["loss"], batches, spec[-1], steps)
    dtype = torch.bfloat16 if trainer.bf16 else torch.float32
    known = (peaks_gflops or {}).get("bf16" if trainer.bf16 else "fp32")
    peak = known * 1e9 if known else measure_peak(dev, dtype)
    overhead = sum(v for k, v in parts.items() if k not in MODEL_PARTS)
    return {
        **head, "parts_ms": parts, "step_ms": 1000 * step_s, "free_step_ms": 1000 * free,
        "overhead_share": overhead / (1000 * step_s), "samples_per_s": n / step_s,
        "free_samples_per_s": n / free, "gflops_per_sample": flops / n / 1e9,
        "peak_gflops": peak / 1e9, "mfu": flops / free / peak,
        "loss_outside_network_ms": loss_ms,
    }  # fmt: skip


def loss_outside_network(trainer: Any, loss_fn: Any, batches: Any, spec: Any, steps: int) -> dict:
    """Median ms of the stage's loss with the network replaced by :class:`StandIn` (its parts:
    ``text``, ``conditioning``, and ``rest``, the diffusion terms after the network)."""
    import torch

    from unclip.train.loop import autocast_context, move_to

    batch = move_to(next(batches), trainer.device)
    stand_in = StandIn(spec)
    clock = Clock(trainer.device)
    if isinstance(getattr(loss_fn, "text", None), TimedText):
        loss_fn.text.clock = clock
    runs = []
    for _ in range(steps + 1):
        clock.parts = dict.fromkeys(PARTS, 0.0)
        clock.start()
        with torch.no_grad(), autocast_context(trainer.device, trainer.bf16):
            loss_fn(_Hooked(stand_in, clock, trainer.model), batch)
        clock.lap("forward")
        runs.append(dict(clock.parts))
    runs = runs[1:]  # the first call warms caches (tokens, schedule copies)
    pick = {k: statistics.median(r[k] for r in runs) * 1000 for k in ("text", "conditioning",
                                                                     "forward")}  # fmt: skip
    total = statistics.median(sum(r.values()) for r in runs) * 1000
    return {"total": total, "text": pick["text"], "conditioning": pick["conditioning"],
            "rest": pick["forward"]}  # fmt: skip


class _Hooked:
    """A stand-in network whose call reads the clock, as the real network's pre-hook does;
    ``module`` is the real network (for losses that call its methods, as under DDP)."""

    def __init__(self, fn: Callable[..., Any], clock: Clock, module: Any) -> None:
        self.fn, self.clock, self.module = fn, clock, module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.clock.lap("conditioning")
        return self.fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Report and command


def format_markdown(r: dict[str, Any]) -> str:
    """A profile of :func:`profile` as a Markdown section."""
    from unclip.commands.bench_report import markdown_table

    loss = r["loss_outside_network_ms"]
    head = (
        f"{r['config']}, batch {r['batch']}, {r['data']} data, {r['device']}, "
        f"{r['precision']}, {r['threads']} threads"
    )
    loss_line = (
        f"Loss with the network replaced by zeros: {loss['total']:.1f} ms (text "
        f"{loss['text']:.1f}, conditioning {loss['conditioning']:.1f}, terms after the network "
        f"{loss['rest']:.1f}), median of {r['steps']}."
    )
    if "parts_ms" not in r:
        return "\n".join([f"## `unclip bench train {r['stage']} --loss-only`", "",
                          f"{head}.", "", loss_line])  # fmt: skip
    step = r["step_ms"]
    rows = [(k, f"{v:.1f}", f"{100 * v / step:.1f}%") for k, v in r["parts_ms"].items()]
    rows.append(("**step**", f"{step:.1f}", f"{100 * sum(r['parts_ms'].values()) / step:.1f}%"))
    return "\n".join([
        f"## `unclip bench train {r['stage']}`",
        "",
        f"{head}, mean of {r['steps']} steps.",
        "",
        markdown_table(["part", "ms per step", "share"], rows),
        "",
        f"Outside forward, backward and optimizer: {100 * r['overhead_share']:.1f}% of the step. "
        f"{r['samples_per_s']:.4g} samples/s profiled, {r['free_samples_per_s']:.4g} free-running; "
        f"{r['gflops_per_sample']:.4g} GFLOP per sample (FlopCounterMode, forward + backward); "
        f"MFU {100 * r['mfu']:.2f}% of {r['peak_gflops']:.4g} GFLOP/s "
        f"(a dense matrix product in the step's precision). {loss_line}",
    ])  # fmt: skip


def add_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``unclip bench train STAGE`` (``--batch``, ``--device``, ``--threads``,
    ``--json``, ``--doc`` and the peaks are shared with ``unclip bench``)."""
    g = p.add_argument_group(
        "training-step profile: unclip bench train STAGE --config FILE",
        "time per training step split into data, text, conditioning, forward, backward, "
        "grad_clip, optimizer, ema and logging, with samples/s and MFU",
    )
    g.add_argument("stage", nargs="?", metavar="STAGE", help=f"with train: {', '.join(STAGES)}")
    g.add_argument("--config", help="with train: the stage's run config (JSON)")
    g.add_argument("--steps", type=int, default=3, help="with train: profiled steps (default 3)")
    g.add_argument("--warmup", type=int, default=2,
                   help="with train: untimed steps first, the first counting FLOPs (default 2)")  # fmt: skip
    g.add_argument("--loss-only", action="store_true",
                   help="with train: time only the loss with the network replaced by zeros "
                   "(its own work: text encoder, masks, diffusion terms)")  # fmt: skip
    g.add_argument("--real-data", action="store_true",
                   help="with train: read the config's data set and embeddings (default: "
                   "synthetic data of the config's shapes)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """``unclip bench train STAGE --config FILE``."""
    import json

    import torch

    from unclip.commands.bench_report import write_doc_section

    if args.stage not in STAGES:
        raise ValueError(f"unclip bench train STAGE --config FILE: STAGE is one of "
                         f"{', '.join(STAGES)}, got {args.stage!r}")  # fmt: skip
    if not args.config:
        raise ValueError("unclip bench train: --config FILE (the stage's run config) is required")
    if args.threads:
        torch.set_num_threads(args.threads)
    peaks = {"bf16": args.peak_bf16, "fp32": args.peak_fp32}
    result = profile(args.stage, args.config, batch=args.batch, device=args.device,
                     steps=args.steps, warmup=args.warmup, real_data=args.real_data,
                     peaks_gflops=peaks, loss_only=args.loss_only,
                     float32=args.train_fp32)  # fmt: skip
    text = format_markdown(result)
    if args.doc:
        name = DOC_SECTION.format(stage=args.stage) + ("-loss" if args.loss_only else "")
        write_doc_section(args.doc, name, text)
    print(json.dumps(result, indent=2) if args.json else text, file=sys.stdout)
    return 0
