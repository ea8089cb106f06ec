"""unclip against diffusers' unCLIP (Karlo) components at matched sizes, side by side in one run.

Both sides get random weights at the sizes of unclip's run configs (default
``configs/emoji-small``): the CLIP text encoder (``transformers.CLIPTextModelWithProjection``
built from a config, nothing downloaded), the prior (``PriorTransformer``), the decoder
(``UNet2DConditionModel`` with ``SimpleCrossAttn`` blocks + ``UnCLIPTextProjModel``, the Karlo
layout) and the super-resolution UNets (``UNet2DModel``; Karlo's "first" and "last" UNets,
the last used for the final step only), with the same widths, depths, attention resolutions,
head widths and embedding sizes; parameter counts are printed and must agree within 10%.

The diffusers side runs the loop of diffusers' ``UnCLIPPipeline.__call__`` (text encoder
for the caption and the empty caption, guided prior, text projection, guided decoder, bicubic
upscaling and super-resolution) with ``DDIMScheduler`` (η = 0, trailing timesteps, the
stage's prediction type), since ``UnCLIPPipeline`` itself is fixed to the DDPM-style
``UnCLIPScheduler`` and a ``CLIPTokenizer`` whose vocabulary would have to be downloaded (the
token ids are made here instead). The unclip side is ``UnclipPipeline.text_to_image`` with
the DDIM sampler, one prior candidate (diffusers draws one) and the same steps, guidance
scales and images per call; its stages are timed by wrapping the pipeline's stage methods.
Two diffusers adaptations keep the sizes matched: the caption features enter the prior and
the text projection through a ``Linear(text_width, ·)`` (diffusers assumes text width =
embedding width).

Reported: seconds per image per stage and end to end for each batch size, the ratio
unclip/diffusers (< 1: unclip is faster), and one decoder training step (forward, backward,
AdamW) per implementation. Runs alternate between the two implementations after a warm-up
run of each, so machine noise hits both alike; medians are reported. JSON goes to stdout, a
Markdown section to docs/benchmarks.md (full mode; ``--doc`` elsewhere).

Processes: unclip runs in this process, with unclip's malloc setting
(``unclip.allocator.keep_freed_memory``, as its pipeline and trainer set it); diffusers runs in
a worker process (this script with ``--diffusers-worker``, same arguments and environment, same
torch threads) with glibc's default malloc settings, as a diffusers user gets them, or with
unclip's under ``--diffusers-keep-freed-memory``. Each side times its own runs; the parent
asks the worker for one run after each of its own. Parameters and FLOPs are counted here.

Precision: each side samples as it does by default unless told otherwise: unclip in its
``load_pipeline`` default ("auto": float32 with its compiled kernels where they run and bf16
has no AMX, else bf16 autocast where the CPU has AVX-512 BF16 or AMX; channels-last
convolutions), diffusers in float32 (its default; ``--diffusers-dtype bfloat16`` runs it
under the same bf16 autocast). ``--dtype X`` sets both. The training step: unclip under bf16
autocast (``TrainConfig.bf16``, its default) where bf16 is native, in float32 where it is not
or float32 is asked for (``--unclip-dtype``, or ``UNCLIP_DTYPE`` as the AVX2 stand-in sets
it: on an AVX2-only CPU bf16 is emulated and slower, so its users train with ``bf16: false``),
diffusers in float32 (its training scripts' default) unless told otherwise.

usage: python benchmarks/pipeline_vs_diffusers.py [--quick] [--configs configs/emoji-small]
       [--batch 1 --batch 4] [--repeat 3] [--dtype auto|float32|bfloat16]
       [--unclip-dtype ...] [--diffusers-dtype ...] [--diffusers-keep-freed-memory]
       [--doc docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from unclip.allocator import keep_freed_memory
from unclip.commands import add_dtype_argument
from unclip.commands.bench_report import machine_info, markdown_table, write_doc_section
from unclip.commands.random_pipelines import (
    CAPTION,
    StageConfigs,
    random_pipeline,
    randomize_zeros,
    stage_configs_from_dir,
    tiny_stage_configs,
)
from unclip.pipeline import UnclipPipeline
from unclip.pipeline.stages import plain_copy

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
BETAS = {"cosine": "squaredcos_cap_v2", "linear": "linear"}
STAGES = ("text", "prior", "decoder", "upsampler", "other")
#: untimed training steps per side before the timed ones
TRAIN_WARMUP = 4


CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
CPU_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "UNCLIP_DTYPE")


def cpu_info() -> dict[str, Any]:
    """What chooses the kernels: torch's CPU capability, the CPU's flags among
    :data:`CPU_FLAGS` (from /proc/cpuinfo, empty where it cannot be read) and the environment
    variables that cap the instruction sets (an AVX2-only CPU emulated on a larger one)."""
    import os

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(
                next((ln for ln in f if ln.startswith("flags")), ":").split(":", 1)[1].split()
            )
    except OSError:
        pass
    return {
        "kernels": torch.backends.cpu.get_cpu_capability(),
        "flags": [x for x in CPU_FLAGS if x in flags],
        "env": {k: os.environ[k] for k in CPU_ENV if k in os.environ},
    }


def unclip_trains_bf16(args: argparse.Namespace) -> bool:
    """Whether unclip's training step runs under bf16 autocast here: asked for by
    ``--unclip-dtype`` or ``UNCLIP_DTYPE``, else where bf16 is native (module docstring)."""
    from unclip.pipeline.stages import DTYPE_ENV, native_bf16

    asked = args.unclip_dtype if args.unclip_dtype != "auto" else os.environ.get(DTYPE_ENV, "")
    if asked.strip() in ("float32", "bfloat16"):
        return asked.strip() == "bfloat16"
    return native_bf16(torch.device("cpu"))


def section_name(r: dict[str, Any]) -> str:
    """The docs section of a result: one per kernel set and unclip precision, so the AVX2
    float32 and the AVX-512 bf16 tables stand side by side."""
    kernels = r["cpu"]["kernels"].lower().replace("default", "generic")
    name = f"pipeline-vs-diffusers-{kernels}-{r['dtype']['unclip']}"
    return name + ("-compiled" if r.get("compiled") else "")


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# diffusers / transformers models at unclip's sizes


@dataclasses.dataclass
class DiffusersModels:
    text_encoder: nn.Module
    prior: nn.Module
    text_proj: nn.Module
    decoder: nn.Module
    super_res_first: nn.Module
    super_res_last: nn.Module
    schedulers: dict[str, Any]
    eos_id: int
    context: int

    def modules(self) -> list[nn.Module]:
        return [self.text_encoder, self.prior, self.text_proj, self.decoder,
                self.super_res_first, self.super_res_last]  # fmt: skip


def _groups(channels: Sequence[int], groups: int) -> int:
    """One GroupNorm group count that divides every width (diffusers has one per model;
    unclip takes gcd(groups, width) per layer)."""
    import math

    g = groups
    for c in channels:
        g = math.gcd(g, c)
    return g


def _attends(cfg: Any, level: int) -> bool:
    return cfg.image_size // 2**level in cfg.attention_resolutions


def build_text_encoder(c: Any) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.text_width,
        intermediate_size=c.text_mlp_dim or 4 * c.text_width, num_hidden_layers=c.text_layers,
        num_attention_heads=c.text_heads, max_position_embeddings=c.context_length,
        projection_dim=c.embed_dim, hidden_act=c.activation, layer_norm_eps=c.layer_norm_eps,
        bos_token_id=c.vocab_size - 2, eos_token_id=c.vocab_size - 1, pad_token_id=0,
    )  # fmt: skip
    return CLIPTextModelWithProjection(config)


def build_prior(p: Any) -> nn.Module:
    from diffusers import PriorTransformer

    model = PriorTransformer(
        num_attention_heads=p.heads, attention_head_dim=p.width // p.heads, num_layers=p.layers,
        embedding_dim=p.clip_dim, num_embeddings=p.text_len, additional_embeddings=4,
        dropout=p.dropout,
    )  # fmt: skip
    # caption features are text_width wide (diffusers assumes embedding_dim)
    model.encoder_hidden_states_proj = nn.Linear(p.text_dim, p.width)
    return model


def build_decoder(d: Any) -> tuple[nn.Module, nn.Module]:
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    if d.num_res_blocks < 1 or not d.attention_mid or not d.resblock_updown:
        raise ValueError("the diffusers decoder layout needs res blocks, mid attention, updown")
    widths = [m * d.model_channels for m in d.channel_mult]
    levels = range(len(widths))
    down = ["SimpleCrossAttnDownBlock2D" if _attends(d, i) else "ResnetDownsampleBlock2D"
            for i in levels]  # fmt: skip
    up = ["SimpleCrossAttnUpBlock2D" if _attends(d, i) else "ResnetUpsampleBlock2D"
          for i in reversed(levels)]  # fmt: skip
    ted = d.time_embed_dim
    unet = UNet2DConditionModel(
        sample_size=d.image_size, in_channels=d.in_channels, out_channels=d.output_channels,
        down_block_types=tuple(down), up_block_types=tuple(up),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=tuple(widths),
        layers_per_block=d.num_res_blocks, cross_attention_dim=ted,
        attention_head_dim=d.num_head_channels, resnet_time_scale_shift="scale_shift",
        class_embed_type="identity", norm_num_groups=_groups(widths, d.norm_groups),
        time_embedding_dim=ted,
    )  # fmt: skip
    proj = UnCLIPTextProjModel(
        clip_extra_context_tokens=d.clip_tokens, clip_embeddings_dim=d.clip_dim,
        time_embed_dim=ted, cross_attention_dim=ted,
    )  # fmt: skip
    proj.encoder_hidden_states_proj = nn.Linear(d.text_dim, ted)  # caption width
    return unet, proj


def build_super_res(u: Any) -> nn.Module:
    from diffusers import UNet2DModel

    if u.attention_resolutions or u.attention_mid:
        raise ValueError("the benchmark's super-resolution UNet has no attention, as in Karlo")
    widths = [m * u.model_channels for m in u.channel_mult]
    n = len(widths)
    return UNet2DModel(
        sample_size=u.image_size, in_channels=u.input_channels, out_channels=u.output_channels,
        down_block_types=("ResnetDownsampleBlock2D",) * n,
        up_block_types=("ResnetUpsampleBlock2D",) * n, block_out_channels=tuple(widths),
        layers_per_block=u.num_res_blocks, resnet_time_scale_shift="scale_shift",
        add_attention=False, norm_num_groups=_groups(widths, u.norm_groups),
    )  # fmt: skip


def ddim(diffusion: Any, clip_sample: bool) -> Any:
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=diffusion.timesteps, beta_schedule=BETAS[diffusion.schedule],
        prediction_type=PREDICTION[diffusion.prediction], clip_sample=clip_sample,
        timestep_spacing="trailing", set_alpha_to_one=True,
    )  # fmt: skip


def build_diffusers(sc: StageConfigs) -> DiffusersModels:
    torch.manual_seed(0)
    if sc.prior is None or len(sc.upsamplers) != 1:
        raise ValueError("the comparison needs a prior and exactly one upsampler")
    up_cfg, up_diff = sc.upsamplers[0]
    decoder, proj = build_decoder(sc.decoder)
    models = DiffusersModels(
        text_encoder=build_text_encoder(sc.clip),
        prior=build_prior(sc.prior),
        text_proj=proj,
        decoder=decoder,
        super_res_first=build_super_res(up_cfg),
        super_res_last=build_super_res(up_cfg),
        schedulers={
            "prior": ddim(sc.prior_diffusion, sc.prior_diffusion.clip_denoised),
            "decoder": ddim(sc.decoder_diffusion, sc.decoder_diffusion.clip_denoised),
            "upsampler": ddim(up_diff, up_diff.clip_denoised),
        },
        eos_id=sc.clip.vocab_size - 1,
        context=sc.clip.context_length,
    )
    for i, m in enumerate(models.modules()):
        randomize_zeros(m, 10 + i)
        m.eval()
    with torch.no_grad():  # diffusers starts these at zero; unit std keeps latents finite
        models.prior.clip_std.fill_(1.0)
    return models


def parameter_table(pipe: UnclipPipeline, m: DiffusersModels) -> list[dict[str, Any]]:
    """Parameters per stage on both sides; the ratio must be within 10% of 1."""
    clip = pipe.clip
    clip_text = (
        sum(p.numel() for n, p in clip.named_parameters() if not n.startswith("visual."))
        - clip.logit_scale.numel()
    )
    assert pipe.prior is not None
    rows = [
        ("text encoder", clip_text, count(m.text_encoder)),
        ("prior", count(pipe.prior.model), count(m.prior)),
        ("decoder (+ text proj)", count(pipe.decoder.model), count(m.decoder) + count(m.text_proj)),
        ("upsampler (one UNet)", count(pipe.upsamplers[0].model), count(m.super_res_first)),
    ]
    return [{"stage": s, "unclip": a, "diffusers": b, "ratio": a / b} for s, a, b in rows]


def decoder_gflops(pipe: UnclipPipeline, m: DiffusersModels) -> dict[str, float]:
    """Forward GFLOPs of one decoder call on one sample with a full-length caption, both sides
    (a check that the matched models do the same work)."""
    from unclip.eval.model_stats import forward_flops

    cfg = pipe.decoder.model.config
    s, d, ctx = cfg.image_size, cfg.clip_dim, pipe.clip.config.context_length
    x, t = torch.randn(1, 3, s, s), torch.tensor([500])
    z = F.normalize(torch.randn(1, d), dim=-1)
    tokens = torch.randn(1, ctx, cfg.text_dim)
    mask = torch.ones(1, ctx, dtype=torch.bool)

    def theirs() -> Any:
        hid, add = m.text_proj(
            image_embeddings=z, prompt_embeds=z, text_encoder_hidden_states=tokens,
            do_classifier_free_guidance=False,
        )  # fmt: skip
        dmask = F.pad(mask, (m.text_proj.clip_extra_context_tokens, 0), value=True)
        return m.decoder(sample=x, timestep=t, encoder_hidden_states=hid, class_labels=add,
                         attention_mask=dmask)  # fmt: skip

    return {
        "unclip": forward_flops(pipe.decoder.model, x, t, image_emb=z, text_tokens=tokens,
                                text_mask=mask) / 1e9,
        "diffusers": forward_flops(theirs) / 1e9,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Generation, diffusers side: the loop of diffusers' UnCLIPPipeline with DDIM


def caption_ids(m: DiffusersModels, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A caption of ``length`` tokens (bos, words, eos, padding): ids [1, L], mask [1, L]."""
    g = torch.Generator().manual_seed(length)
    ids = torch.zeros(1, m.context, dtype=torch.long)
    ids[0, 0] = m.eos_id - 1
    ids[0, 1 : length - 1] = torch.randint(1, m.eos_id - 2, (length - 2,), generator=g)
    ids[0, length - 1] = m.eos_id
    mask = torch.arange(m.context)[None] < length
    return ids, mask


@torch.no_grad()
def diffusers_generate(
    m: DiffusersModels, n: int, steps: dict[str, int], guidance: dict[str, float],
    seed: int, autocast: Any, caption_length: int,
) -> dict[str, float]:  # fmt: skip
    """Draw ``n`` images; returns seconds per stage."""
    from PIL import Image

    times = dict.fromkeys(STAGES, 0.0)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    with autocast:
        ids, mask = caption_ids(m, caption_length)
        empty_ids, empty_mask = caption_ids(m, 2)
        cond = m.text_encoder(ids.expand(n, -1))
        uncond = m.text_encoder(empty_ids.expand(n, -1))
        prompt_embeds = torch.cat([uncond.text_embeds, cond.text_embeds]).float()
        hidden = torch.cat([uncond.last_hidden_state, cond.last_hidden_state]).float()
        text_mask = torch.cat([empty_mask.expand(n, -1), mask.expand(n, -1)])
    t1 = time.perf_counter()
    times["text"] = t1 - t0

    sched = m.schedulers["prior"]
    sched.set_timesteps(steps["prior"])
    dim = m.prior.config.embedding_dim
    latents = torch.randn(n, dim, generator=g) * sched.init_noise_sigma
    for t in sched.timesteps:
        with autocast:
            pred = m.prior(
                torch.cat([latents] * 2), timestep=t, proj_embedding=prompt_embeds,
                encoder_hidden_states=hidden, attention_mask=text_mask,
            ).predicted_image_embedding.float()  # fmt: skip
        pu, pc = pred.chunk(2)
        pred = pu + guidance["prior"] * (pc - pu)
        latents = sched.step(pred, t, latents, eta=0.0).prev_sample
    image_embeddings = m.prior.post_process_latents(latents)
    t2 = time.perf_counter()
    times["prior"] = t2 - t1

    with autocast:
        hid, add_emb = m.text_proj(
            image_embeddings=image_embeddings, prompt_embeds=prompt_embeds,
            text_encoder_hidden_states=hidden, do_classifier_free_guidance=True,
        )  # fmt: skip
    dec_mask = F.pad(text_mask, (m.text_proj.clip_extra_context_tokens, 0), value=True)
    sched = m.schedulers["decoder"]
    sched.set_timesteps(steps["decoder"])
    size = m.decoder.config.sample_size
    latents = torch.randn(n, 3, size, size, generator=g) * sched.init_noise_sigma
    for t in sched.timesteps:
        with autocast:
            out = m.decoder(
                sample=torch.cat([latents] * 2), timestep=t, encoder_hidden_states=hid,
                class_labels=add_emb, attention_mask=dec_mask,
            ).sample.float()  # fmt: skip
        ou, oc = out.chunk(2)
        pred = ou[:, :3] + guidance["decoder"] * (oc[:, :3] - ou[:, :3])
        latents = sched.step(pred, t, latents, eta=0.0).prev_sample
    image_small = latents.clamp(-1, 1)
    t3 = time.perf_counter()
    times["decoder"] = t3 - t2

    sched = m.schedulers["upsampler"]
    sched.set_timesteps(steps["upsampler"])
    size = m.super_res_first.config.sample_size
    latents = torch.randn(n, 3, size, size, generator=g) * sched.init_noise_sigma
    upscaled = F.interpolate(
        image_small, size=[size, size], mode="bicubic", align_corners=False, antialias=True
    )
    last = len(sched.timesteps) - 1
    for i, t in enumerate(sched.timesteps):
        unet = m.super_res_last if i == last else m.super_res_first
        with autocast:
            out = unet(sample=torch.cat([latents, upscaled], dim=1), timestep=t).sample.float()
        latents = sched.step(out[:, :3], t, latents, eta=0.0).prev_sample
    t4 = time.perf_counter()
    times["upsampler"] = t4 - t3

    image = (latents * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    [Image.fromarray((im * 255).round().astype("uint8")) for im in image]
    times["other"] = time.perf_counter() - t4
    return times


# ---------------------------------------------------------------------------------------------
# Generation, unclip side: text_to_image with its stage methods timed


class StageTimer:
    """Wraps a pipeline's stage methods (as bound on the instance) and the stage runners its
    methods call (functions of ``unclip.pipeline.core``, put back by :meth:`close`) to add up
    their time."""

    METHODS: ClassVar[dict[str, str]] = {"_text": "text", "_sample_prior": "prior"}
    RUNNERS: ClassVar[dict[str, str]] = {"decode": "decoder", "upsample": "upsampler"}

    def __init__(self, pipe: UnclipPipeline) -> None:
        import unclip.pipeline.core as core

        self.times: dict[str, float] = {}
        for method, stage in self.METHODS.items():
            setattr(pipe, method, self._wrap(getattr(pipe, method), stage))
        self._runners = {name: getattr(core, name) for name in self.RUNNERS}
        for name, stage in self.RUNNERS.items():
            setattr(core, name, self._wrap(self._runners[name], stage))

    def close(self) -> None:
        """Put the stage runners back."""
        import unclip.pipeline.core as core

        for name, fn in self._runners.items():
            setattr(core, name, fn)

    def _wrap(self, fn: Callable[..., Any], stage: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.times[stage] = self.times.get(stage, 0.0) + time.perf_counter() - t

        return timed


def unclip_generate(
    pipe: UnclipPipeline, timer: StageTimer, n: int, steps: dict[str, int],
    guidance: dict[str, float], seed: int,
) -> dict[str, float]:  # fmt: skip
    timer.times = {}
    t = time.perf_counter()
    pipe.text_to_image(
        CAPTION, n=n, seed=seed, sampler="ddim", prior_candidates=1,
        prior_steps=steps["prior"], decoder_steps=steps["decoder"],
        upsampler_steps=steps["upsampler"], prior_guidance=guidance["prior"],
        decoder_guidance=guidance["decoder"], prior_eta=0.0, decoder_eta=0.0, upsampler_eta=0.0,
    )  # fmt: skip
    total = time.perf_counter() - t
    times = {s: timer.times.get(s, 0.0) for s in STAGES[:-1]}
    times["other"] = total - sum(times.values())
    return times


# ---------------------------------------------------------------------------------------------
# Decoder training step


def bf16_autocast(on: bool) -> Any:
    """A reusable context: CPU bf16 autocast when ``on``, else nothing (float32)."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else nullcontext()


def training_inputs(sc: StageConfigs, batch: int) -> dict[str, torch.Tensor]:
    """The random decoder training batch both sides train on (the same seed in each process):
    x, target [B, 3, S, S]; t [B]; z_i, z_t [B, clip_dim]; tokens [B, L, text_dim]; mask [B, L]
    (the first 10 tokens)."""
    cfg, ctx = sc.decoder, sc.clip.context_length
    s, d = cfg.image_size, cfg.clip_dim
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(batch, 3, s, s, generator=g),
        "target": torch.randn(batch, 3, s, s, generator=g),
        "t": torch.randint(0, 1000, (batch,), generator=g),
        "z_i": F.normalize(torch.randn(batch, d, generator=g), dim=-1),
        "z_t": F.normalize(torch.randn(batch, d, generator=g), dim=-1),
        "tokens": torch.randn(batch, ctx, cfg.text_dim, generator=g),
        "mask": torch.arange(ctx)[None].expand(batch, -1) < 10,
    }


def unclip_training_step(
    pipe: UnclipPipeline, inputs: dict[str, torch.Tensor], bf16: bool, compile: bool = False
) -> Callable[[], None]:
    """One forward+backward+AdamW step of a copy of unclip's decoder on ``inputs`` (loss: MSE
    of the first 3 output channels against ``target``), under bf16 autocast when ``bf16``.
    ``compile``: the network compiled in place, as the trainer does with ``compile``."""
    from unclip.config import TrainConfig
    from unclip.train.loop import build_optimizer, training_layout

    ours = plain_copy(pipe.decoder.model).float().train()
    ours.to(memory_format=training_layout(ours, torch.device("cpu"), bf16=bf16))  # as the trainer
    if compile:
        ours.compile()
    opt = build_optimizer(ours, TrainConfig())
    cast, i = bf16_autocast(bf16), inputs

    def step() -> None:
        with cast:
            out = ours(i["x"], i["t"], image_emb=i["z_i"], text_tokens=i["tokens"],
                       text_mask=i["mask"])  # fmt: skip
        loss = F.mse_loss(out[:, :3].float(), i["target"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def diffusers_training_step(
    m: DiffusersModels, inputs: dict[str, torch.Tensor], bf16: bool
) -> Callable[[], None]:
    """The same step for a copy of the diffusers decoder and text projection (AdamW, lr 1e-4)."""
    import copy

    unet, proj = copy.deepcopy(m.decoder).train(), copy.deepcopy(m.text_proj).train()
    opt = torch.optim.AdamW([*unet.parameters(), *proj.parameters()], lr=1e-4)
    cast, i = bf16_autocast(bf16), inputs
    dec_mask = F.pad(i["mask"], (proj.clip_extra_context_tokens, 0), value=True)

    def step() -> None:
        with cast:
            hid, add_emb = proj(
                image_embeddings=i["z_i"], prompt_embeds=i["z_t"],
                text_encoder_hidden_states=i["tokens"], do_classifier_free_guidance=False,
            )  # fmt: skip
            out = unet(
                sample=i["x"], timestep=i["t"], encoder_hidden_states=hid, class_labels=add_emb,
                attention_mask=dec_mask,
            ).sample  # fmt: skip
        loss = F.mse_loss(out[:, :3].float(), i["target"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


# ---------------------------------------------------------------------------------------------
# The diffusers side in its own process


class DiffusersWorker:
    """The diffusers side in a worker process (this script with ``--diffusers-worker`` and the
    parent's arguments, so it builds the same models; the environment is inherited), so that
    the allocator setting of the parent (unclip's) does not leak into it. It talks JSON lines:
    one reply when its models are built (``{"keep_freed_memory": bool}``), then one per command
    (``{"run": "generate", "n", "caption_length"}``: seconds per stage; ``{"run": "train"}``:
    seconds of one training step). An error in it raises here; leaving the ``with`` block
    ends it (killed if the block raised)."""

    def __init__(self, argv: list[str], threads: int) -> None:
        command = [sys.executable, __file__, *argv, "--threads", str(threads), "--diffusers-worker"]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)  # fmt: skip
        assert self.proc.stdin and self.proc.stdout
        self.commands, self.replies = self.proc.stdin, self.proc.stdout

    def __enter__(self) -> DiffusersWorker:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.proc.kill()
        with suppress(BrokenPipeError):
            self.commands.close()  # the worker's cue to exit
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.replies.close()

    def reply(self) -> Any:
        """The worker's next reply (its result), or a RuntimeError saying why there is none."""
        line = self.replies.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"the diffusers worker exited with code {code} before replying "
                               "(its error is on stderr above)")  # fmt: skip
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            raise RuntimeError(f"the diffusers worker sent {line!r}, not a JSON reply") from None
        if "error" in msg:
            raise RuntimeError(f"the diffusers worker failed:\n{msg['error']}")
        return msg["result"]

    def __call__(self, **command: Any) -> Any:
        with suppress(BrokenPipeError):  # a dead worker: reply() says so
            self.commands.write(json.dumps(command) + "\n")
            self.commands.flush()
        return self.reply()


def serve_diffusers(args: argparse.Namespace, setup: Setup) -> int:
    """The ``--diffusers-worker`` loop (see :class:`DiffusersWorker`): build the diffusers
    models, then answer the parent's commands from stdin until it closes it. glibc's malloc
    keeps its defaults unless ``--diffusers-keep-freed-memory``."""
    replies = os.fdopen(os.dup(1), "w")  # the parent reads JSON lines here ...
    os.dup2(2, 1)  # ... and anything else printed goes to stderr

    def send(**msg: Any) -> None:
        replies.write(json.dumps(msg) + "\n")
        replies.flush()

    try:
        keep = keep_freed_memory() if args.diffusers_keep_freed_memory else False
        m = build_diffusers(setup.sc)
        bf16 = args.diffusers_dtype == "bfloat16"
        autocast, train_step = bf16_autocast(bf16), None
        send(result={"keep_freed_memory": keep})
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["run"] == "generate":
                out = diffusers_generate(m, cmd["n"], setup.steps, setup.guidance, 0, autocast,
                                         cmd["caption_length"])  # fmt: skip
            elif cmd["run"] == "train":
                if train_step is None:
                    inputs = training_inputs(setup.sc, setup.train_batch)
                    train_step = diffusers_training_step(m, inputs, bf16)
                t = time.perf_counter()
                train_step()
                out = time.perf_counter() - t
            else:
                raise ValueError(f"unknown command {cmd!r}")
            send(result=out)
    except Exception:
        send(error=traceback.format_exc())
        return 1
    return 0


def side_by_side(
    a: Callable[[], Any], b: Callable[[], Any], repeat: int, warmup: int = 1
) -> tuple[list[Any], list[Any]]:
    """Warm each up ``warmup`` times, then alternate ``repeat`` timed runs: (results of a,
    results of b); a result is what the call returns, or its seconds when it returns None."""

    def run(fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t if out is None else out

    for _ in range(warmup):
        run(a), run(b)
    ra, rb = [], []
    for _ in range(max(1, repeat)):
        ra.append(run(a))
        rb.append(run(b))
    return ra, rb


def pair_ratios(ours: list[float], theirs: list[float]) -> list[float]:
    """The ratio of each alternating pair of runs (run i of unclip / run i of diffusers), sorted:
    its spread says how much the machine moved during the measurement."""
    return sorted(a / b for a, b in zip(ours, theirs, strict=True) if b)


def median_times(runs: list[dict[str, float]], n: int) -> dict[str, float]:
    """Median seconds per image per stage, and ``total`` (median of the runs' totals)."""
    out = {s: statistics.median(r[s] for r in runs) / n for s in STAGES}
    out["total"] = statistics.median(sum(r.values()) for r in runs) / n
    return out


# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
    """What both processes derive from the arguments: the stage configs, batches, steps,
    guidance, repeats and the training batch."""

    sc: StageConfigs
    batches: list[int]
    steps: dict[str, int]
    guidance: dict[str, float]
    repeat: int
    train_repeat: int
    train_batch: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Setup:
        guidance = {"prior": args.prior_guidance, "decoder": args.decoder_guidance}
        if args.quick:
            return cls(tiny_stage_configs(), args.batch or [1, 2],
                       {"prior": 2, "decoder": 2, "upsampler": 2}, guidance, 1, 1,
                       args.train_batch or 2)  # fmt: skip
        sc = stage_configs_from_dir(args.configs)
        steps = {"prior": args.prior_steps, "decoder": args.decoder_steps,
                 "upsampler": args.upsampler_steps}  # fmt: skip
        return cls(sc, args.batch or [1, 4], steps, guidance, args.repeat, args.train_repeat,
                   args.train_batch or sc.train_batch.get("decoder", 16))  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=str(REPO / "configs" / "emoji-small"),
                   help="unclip run configs giving the sizes (default configs/emoji-small)")  # fmt: skip
    p.add_argument("--batch", type=int, action="append",
                   help="images per call (repeatable; default 1 and 4)")  # fmt: skip
    p.add_argument("--repeat", type=int, default=3, help="timed runs each (default 3)")
    p.add_argument("--prior-steps", type=int, default=25)
    p.add_argument("--decoder-steps", type=int, default=25)
    p.add_argument("--upsampler-steps", type=int, default=7)
    p.add_argument("--prior-guidance", type=float, default=4.0)
    p.add_argument("--decoder-guidance", type=float, default=8.0)
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="sampling precision of both sides (default: each side's own)",
    )
    add_dtype_argument(p, "--unclip-dtype", ("auto", "float32", "bfloat16"))
    p.add_argument("--diffusers-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="diffusers' sampling precision (default float32, its default)")  # fmt: skip
    p.add_argument(
        "--diffusers-keep-freed-memory",
        action="store_true",
        help="give the diffusers process unclip's malloc setting too "
        "(unclip.allocator.keep_freed_memory; default: glibc's defaults, as diffusers users get)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile unclip's sampling networks (UnclipPipeline.compile; the "
        "warm-up run absorbs compiling); its table goes to its own section",
    )
    p.add_argument("--train-batch", type=int, help="decoder training batch (default: config's)")
    p.add_argument(
        "--train-repeat", type=int, default=9, help="timed training steps per side (default 9)"
    )
    p.add_argument("--threads", type=int, help="torch threads (both processes)")
    p.add_argument("--quick", action="store_true",
                   help="tiny models, 2 steps per stage, batches 1 and 2, 1 repeat")  # fmt: skip
    p.add_argument("--doc", help=f"Markdown file for the table (default in full mode: {DOC})")
    p.add_argument("--no-doc", action="store_true", help="write no Markdown")
    # internal: this script as the diffusers side's process (DiffusersWorker)
    p.add_argument("--diffusers-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dtype:
        args.unclip_dtype = args.diffusers_dtype = args.dtype
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = Setup.from_args(args)
    if args.diffusers_worker:
        return serve_diffusers(args, setup)
    keep_freed_memory()  # as unclip's pipeline and trainer do (unclip.allocator)
    with DiffusersWorker(argv, torch.get_num_threads()) as worker:  # builds while we do
        result = compare(args, setup, worker)
    doc = None if args.no_doc else args.doc or (None if args.quick else str(DOC))
    if doc:
        write_doc_section(doc, section_name(result), format_markdown(result))
    print(json.dumps(result, indent=2))
    return 0


def compare(args: argparse.Namespace, setup: Setup, worker: DiffusersWorker) -> dict[str, Any]:
    """Check the sizes match, then time unclip here against the diffusers ``worker``."""
    sc, steps, guidance = setup.sc, setup.steps, setup.guidance
    pipe = random_pipeline(sc, dtype=args.unclip_dtype)
    dtypes = {"unclip": str(pipe.dtype).removeprefix("torch."), "diffusers": args.diffusers_dtype}
    theirs = build_diffusers(sc)  # only counted here; the worker runs its own
    params = parameter_table(pipe, theirs)
    for row in params:
        print(f"{row['stage']:24s} unclip {row['unclip']:>10,}  diffusers {row['diffusers']:>10,}"
              f"  ratio {row['ratio']:.3f}", file=sys.stderr)  # fmt: skip
    bad = [r["stage"] for r in params if not 0.9 <= r["ratio"] <= 1.1]
    if bad:
        raise SystemExit(f"parameter counts differ by more than 10%: {', '.join(bad)}")

    flops = decoder_gflops(pipe, theirs)
    del theirs
    if args.compile:  # after the FLOP count: a model first called under a dispatch mode
        pipe.compile()  # would be left uncompiled by dynamo for good
    print(f"decoder forward GFLOPs: unclip {flops['unclip']:.4g}, diffusers "
          f"{flops['diffusers']:.4g}", file=sys.stderr)  # fmt: skip

    worker_keep = worker.reply()["keep_freed_memory"]  # its models are built
    # the diffusers caption has as many tokens as unclip's tokenizer gives the benchmark caption
    tokens = pipe.tokenizer([CAPTION], sc.clip.context_length)
    length = max(3, int(pipe.clip.eot_positions(tokens)[0]) + 1)
    timer = StageTimer(pipe)
    generation = []
    for n in setup.batches:
        ours, theirs_runs = side_by_side(
            lambda n=n: unclip_generate(pipe, timer, n, steps, guidance, seed=0),
            lambda n=n: worker(run="generate", n=n, caption_length=length),
            setup.repeat,
        )
        a, b = median_times(ours, n), median_times(theirs_runs, n)
        totals = [sum(r.values()) for r in ours], [sum(r.values()) for r in theirs_runs]
        generation.append({
            "batch": n, "unclip_s_per_image": a, "diffusers_s_per_image": b,
            "ratio": {k: (a[k] / b[k] if b[k] else None) for k in a},
            "total_ratio_per_run": pair_ratios(*totals),
        })  # fmt: skip
    timer.close()

    # unclip under bf16 autocast (TrainConfig.bf16) where bf16 is native, else or when float32
    # is asked for in float32 (module docstring); diffusers' training scripts default to float32
    train_bf16 = (unclip_trains_bf16(args), args.diffusers_dtype == "bfloat16")
    inputs = training_inputs(sc, setup.train_batch)
    step_ours = unclip_training_step(pipe, inputs, train_bf16[0], compile=args.compile)
    # diffusers' step needs a few steps to settle: TRAIN_WARMUP untimed steps per side
    t_ours, t_theirs = side_by_side(
        step_ours, lambda: worker(run="train"), setup.train_repeat, warmup=TRAIN_WARMUP
    )
    training = {
        "batch": setup.train_batch,
        "repeat": setup.train_repeat,
        "warmup": TRAIN_WARMUP,
        "precision": {
            side: "bf16 autocast" if on else "float32"
            for side, on in zip(("unclip", "diffusers"), train_bf16, strict=True)
        },
        "unclip_s": statistics.median(t_ours),
        "diffusers_s": statistics.median(t_theirs),
    }
    training["ratio"] = training["unclip_s"] / training["diffusers_s"]
    training["ratio_per_step"] = pair_ratios(t_ours, t_theirs)

    return {
        "configs": "tiny (quick)" if args.quick else args.configs,
        "quick": args.quick,
        "dtype": dtypes,
        "compiled": bool(args.compile),
        "steps": steps,
        "guidance": guidance,
        "repeat": setup.repeat,
        "machine": machine_info(),
        "cpu": cpu_info(),
        "parameters": params,
        "decoder_forward_gflops": flops,
        "generation": generation,
        "decoder_training_step": training,
        # keep_freed_memory() repeats its first call's answer
        "keep_freed_memory": {"unclip": keep_freed_memory(), "diffusers": worker_keep},
    }


def format_markdown(r: dict[str, Any]) -> str:
    m, cpu, keep = r["machine"], r["cpu"], r["keep_freed_memory"]
    env = " ".join(f"{k}={v}" for k, v in cpu["env"].items())
    lines = [
        f"## unclip vs diffusers, matched sizes: {cpu['kernels']} kernels, unclip in "
        f"{r['dtype']['unclip']}" + (", unclip compiled" if r.get("compiled") else ""),
        "",
        f"CPU: torch kernels **{cpu['kernels']}**, CPU flags {' '.join(cpu['flags']) or 'unknown'}"
        + (f", capped by `{env}`" if env else "")
        + f"; unclip samples in **{r['dtype']['unclip']}**, diffusers in "
        f"**{r['dtype']['diffusers']}**.",
        "",
        f"`python benchmarks/pipeline_vs_diffusers.py` — sizes of {r['configs']}, random "
        f"weights, DDIM on both sides, steps prior/decoder/upsampler "
        f"{r['steps']['prior']}/{r['steps']['decoder']}/{r['steps']['upsampler']}, guidance "
        f"{r['guidance']['prior']}/{r['guidance']['decoder']}, sampling in "
        f"{r['dtype']['unclip']} (unclip, channels-last convolutions"
        f"{', torch.compile' if r.get('compiled') else ''}) and "
        f"{r['dtype']['diffusers']} (diffusers), "
        f"median of {r['repeat']} alternating runs; each side in its own process, unclip "
        f"with {_malloc(keep['unclip'])} and diffusers with {_malloc(keep['diffusers'])}; "
        f"{m['threads']} threads, torch {m['torch']}, {m['time']}."
        + (" **Quick mode: not a measurement.**" if r["quick"] else ""),
        "",
        markdown_table(
            ["stage", "unclip params", "diffusers params", "ratio"],
            [
                (p["stage"], f"{p['unclip']:,}", f"{p['diffusers']:,}", f"{p['ratio']:.3f}")
                for p in r["parameters"]
            ],
        ),
        "",
        f"Decoder forward, one sample: {r['decoder_forward_gflops']['unclip']:.4g} GFLOPs "
        f"(unclip), {r['decoder_forward_gflops']['diffusers']:.4g} GFLOPs (diffusers).",
        "",
        "Seconds per image (ratio = unclip / diffusers; below 1 means unclip is faster):",
        "",
    ]
    rows = []
    for g in r["generation"]:
        for s in (*STAGES, "total"):
            a, b, q = g["unclip_s_per_image"][s], g["diffusers_s_per_image"][s], g["ratio"][s]
            rows.append((g["batch"], s, f"{a:.4f}", f"{b:.4f}", "" if q is None else f"{q:.3f}"))
    lines.append(markdown_table(["batch", "stage", "unclip s/img", "diffusers s/img", "ratio"],
                                rows))  # fmt: skip
    spread = [
        f"{g['batch']} image(s) {_span(g['total_ratio_per_run'])}"
        for g in r["generation"]
        if g.get("total_ratio_per_run")
    ]
    if spread:
        lines += [
            "",
            "End-to-end ratio of each alternating pair of runs: " + "; ".join(spread) + ".",
        ]
    t = r["decoder_training_step"]
    lines += [
        "",
        f"Decoder training step (forward, backward, AdamW; batch {t['batch']}; median of "
        f"{t.get('repeat', '?')} alternating steps after {t.get('warmup', 1)} untimed): unclip "
        f"{t['unclip_s']:.4f} s ({t['precision']['unclip']}), diffusers {t['diffusers_s']:.4f} s "
        f"({t['precision']['diffusers']}), ratio **{t['ratio']:.3f}**"
        + (f" (pairs of steps {_span(t['ratio_per_step'])})." if t.get("ratio_per_step") else "."),
    ]
    return "\n".join(lines)


def _malloc(keep_freed_memory: bool) -> str:
    if keep_freed_memory:
        return "the freed-memory malloc setting of `unclip.allocator`"
    return "glibc's default malloc settings"


def _span(ratios: list[float]) -> str:
    return f"{ratios[0]:.3f}" if len(ratios) == 1 else f"{ratios[0]:.3f}–{ratios[-1]:.3f}"


if __name__ == "__main__":
    sys.exit(main())
