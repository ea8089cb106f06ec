"""What one 256 px image of Karlo v1 alpha costs with unclip, without Karlo's weights.

1. FLOPs at Karlo's real sizes: the stages are mapped from Karlo's configs
   (``unclip.interop.karlo_configs``, read with ``read_configs`` as a real folder would be)
   and built on fake tensors (shapes only, no memory); unclip's counter
   (``unclip.eval.model_stats.forward_flops``) counts one call of each as the pipeline makes
   it: the text encoder once; the prior's caption keys and values once per run for the
   caption and the null caption, then 25 steps of the four tokens after the caption on 2 rows
   (classifier-free guidance: conditional and unconditional); the decoder 25 steps on 2 rows
   at 64 px; super-resolution 7 unguided steps on 1 row at 256 px (``super_res_first`` 6,
   ``super_res_last`` 1: the same architecture).
2. A measured call of each stage on this machine with random weights, made cheap: the UNets
   (decoder, super-resolution) at reduced width (the same layout with every width, head
   width and group count divided by ``--divisor``), the prior at full width with
   ``--prior-layers`` of its 20 identical layers (its steps multiply 8-row matrices: their
   cost is reading the weights, which a narrow prior would hide), the text encoder at full
   size; in float32 and under bf16 autocast (as ``load_pipeline`` samples where the CPU has
   AVX-512 BF16 or AMX; the text encoder always runs in float32), UNets channels-last as the
   pipeline keeps them. The counted FLOPs of the measured call over its time give an achieved
   FLOP/s per stage, and the seconds per image at Karlo's sizes are the full FLOPs over it.
   Narrow UNets run further below the machine's peak than wide ones (smaller matrix
   products, relatively more element-wise work, which the counter leaves out), so that
   extrapolation leans pessimistic; the FLOPs at the measured bf16 matrix-product peak give
   the bound no implementation on this machine can beat.
3. A GPU **estimate** (nothing measured): each call takes the longer of its FLOPs at an
   assumed fraction of a bf16 dense peak and its bf16 weights read once from memory.

Prints Markdown tables (and JSON with ``--json``). usage:
    python benchmarks/karlo_cost.py [--divisor 8] [--prior-layers 2] [--repeat 3]
        [--threads N] [--cores N]
        [--gpu-peak-tflops 989] [--gpu-utilisation 0.3] [--gpu-bandwidth-tbs 4.8] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from unclip.clip.model import CLIP
from unclip.commands.bench_measure import matmul_peak, timed
from unclip.commands.bench_report import machine_info, markdown_table
from unclip.decoder import UNet, Upsampler
from unclip.eval.model_stats import count_parameters, forward_flops
from unclip.interop import karlo_configs as karlo
from unclip.pipeline.diffusers_folder import FolderConfigs, karlo_sampling, read_configs
from unclip.prior.model import DiffusionPriorTransformer


def reduced_files(divisor: int, prior_layers: int) -> dict[str, dict[str, Any]]:
    """Karlo's config files made cheap to run: the UNets (decoder, text projection,
    super-resolution) with every width divided by ``divisor`` (channels, head widths, the
    cross-attention width and the group-norm groups, so the channels per group and the head
    counts stay Karlo's; depths stay), the prior at full width with ``prior_layers`` of its
    20 identical layers. (1, 20): Karlo's own."""
    if divisor < 1 or 32 % divisor:
        raise SystemExit(f"--divisor must divide 32 (Karlo's group count), got {divisor}")
    files = {k: copy.deepcopy(v) for k, v in karlo.config_files().items()}  # one copy each
    for name in ("decoder", "super_res_first", "super_res_last"):
        doc = files[f"{name}/config.json"]
        doc["block_out_channels"] = [c // divisor for c in doc["block_out_channels"]]
        doc["norm_num_groups"] //= divisor
        if name == "decoder":
            doc["attention_head_dim"] //= divisor
            doc["cross_attention_dim"] //= divisor
            tp = files["text_proj/config.json"]
            tp["time_embed_dim"] = 4 * doc["block_out_channels"][0]
            tp["cross_attention_dim"] = doc["cross_attention_dim"]
    files["prior/config.json"]["num_layers"] = prior_layers
    return files


def stage_configs(divisor: int = 1, prior_layers: int = 20) -> FolderConfigs:
    """unclip's configs of Karlo's folder (reduced as :func:`reduced_files` says), mapped as
    a real folder is: the config files written to a temporary folder and read with
    ``read_configs``."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = karlo.write_config_folder(Path(tmp) / "karlo")
        for name, doc in reduced_files(divisor, prior_layers).items():
            (folder / name).write_text(json.dumps(doc), encoding="utf-8")
        return read_configs(folder)


@dataclass
class Stage:
    """One kind of network call in a 256 px image: ``calls`` per image on ``rows`` rows."""

    name: str
    calls: int
    rows: int
    build: Callable[[FolderConfigs], nn.Module]
    #: (model, rows) -> a no-argument function making one call
    call: Callable[[nn.Module, int], Callable[[], Any]]
    convolutional: bool = False
    #: what the measured call runs: "width" (the UNets narrowed), "layers" (the prior, fewer
    #: layers) or "full"
    reduced: str = "width"
    always_fp32: bool = False


def _prior_inputs(model: DiffusionPriorTransformer, rows: int) -> dict[str, torch.Tensor]:
    cfg = model.config
    return {
        "text_emb": torch.randn(rows, cfg.clip_dim),
        "text_tokens": torch.randn(rows, cfg.text_len, cfg.text_dim),
        "text_mask": torch.ones(rows, cfg.text_len, dtype=torch.bool),
    }


def _prior_caption(model: nn.Module, rows: int) -> Callable[[], Any]:
    assert isinstance(model, DiffusionPriorTransformer)
    kw = _prior_inputs(model, rows)
    return lambda: model.caption_cache(**kw)


def _prior_step(model: nn.Module, rows: int) -> Callable[[], Any]:
    assert isinstance(model, DiffusionPriorTransformer)
    kw = _prior_inputs(model, rows)
    cache = model.caption_cache(**kw)
    x, t = torch.randn(rows, model.config.clip_dim), torch.full((rows,), 500)
    return lambda: model(x, t, kw["text_emb"], **cache)


def _decoder_step(model: nn.Module, rows: int) -> Callable[[], Any]:
    assert isinstance(model, UNet)
    cfg = model.config
    s, length = cfg.image_size, 77
    x = torch.randn(rows, cfg.in_channels, s, s).to(memory_format=_format(model))
    kw = {
        "image_emb": torch.randn(rows, cfg.clip_dim),
        "text_tokens": torch.randn(rows, length, cfg.text_dim),
        "text_mask": torch.ones(rows, length, dtype=torch.bool),
        "text_emb": torch.randn(rows, cfg.text_emb_dim),
    }
    t = torch.full((rows,), 500)
    return lambda: model(x, t, **kw)


def _super_res_step(model: nn.Module, rows: int) -> Callable[[], Any]:
    assert isinstance(model, Upsampler)
    cfg = model.config
    s, low = cfg.image_size, cfg.low_res_size
    x = torch.randn(rows, cfg.in_channels, s, s).to(memory_format=_format(model))
    low_res = torch.randn(rows, cfg.in_channels, low, low)
    t = torch.full((rows,), 500)
    return lambda: model(x, t, low_res=low_res)


def _text_encoder(model: nn.Module, rows: int) -> Callable[[], Any]:
    assert isinstance(model, CLIP)
    tokens = torch.randint(1, model.config.vocab_size - 1, (rows, model.config.context_length))
    tokens[:, -1] = model.config.vocab_size - 1  # a full-length caption ends with the end token
    return lambda: model.encode_text_condition(tokens, normalize=False)


def _format(model: nn.Module) -> torch.memory_format:
    w = next(p for p in model.parameters() if p.ndim == 4)
    return (
        torch.channels_last
        if w.is_contiguous(memory_format=torch.channels_last)
        else (torch.contiguous_format)
    )


def stages() -> list[Stage]:
    s = karlo_sampling()
    return [
        Stage("text encoder (CLIP ViT-L/14)", 1, 1, lambda c: CLIP(c.clip), _text_encoder,
              reduced="full", always_fp32=True),
        Stage("prior: caption keys/values (once)", 1, 2,
              lambda c: DiffusionPriorTransformer(c.prior), _prior_caption, reduced="layers"),
        Stage("prior: step", s.prior.steps, 2, lambda c: DiffusionPriorTransformer(c.prior),
              _prior_step, reduced="layers"),
        Stage("decoder 64 px: step", s.decoder.steps, 2, lambda c: UNet(c.decoder),
              _decoder_step, convolutional=True),
        Stage("super-res 256 px: step (first ×6, last ×1)", s.upsampler.steps, 1,
              lambda c: Upsampler(c.super_res[0]), _super_res_step, convolutional=True),
    ]  # fmt: skip


def count(stage: Stage, configs: FolderConfigs) -> tuple[int, int]:
    """(parameters, FLOPs of one call) of ``stage``, on fake tensors."""
    with FakeTensorMode(), torch.no_grad():
        model = stage.build(configs).eval()
        return count_parameters(model), forward_flops(stage.call(model, stage.rows))


def measure(stage: Stage, configs: FolderConfigs, bf16: bool, repeat: int) -> float:
    """Seconds of one call of ``stage`` with random weights on the CPU: the best of at least
    ``repeat`` runs after a warm-up (more for cheap calls, up to about 2 s of them). The best
    run is the one least disturbed by whatever else the machine runs."""
    torch.manual_seed(0)
    model = stage.build(configs).eval()
    if stage.convolutional:  # as the pipeline keeps its UNets
        model.to(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with torch.no_grad(), autocast:  # one context: autocast casts each weight once, as sampling
        fn = stage.call(model, stage.rows)
        probe = timed(fn, repeat=1, warmup=1)["best_s"]
        n = max(repeat, min(30, int(2.0 / max(probe, 1e-3))))
        return min(probe, timed(fn, repeat=n, warmup=0)["best_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--divisor", type=int, default=8, help="width divisor of the measured UNets")
    p.add_argument("--prior-layers", type=int, default=2, help="layers of the measured prior")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--cores",
        type=int,
        help="cores of the CPU estimate (default: the threads measured with); other than the "
        "threads, the measured rates are scaled linearly (an assumption the report states)",
    )
    p.add_argument(
        "--gpu-peak-tflops",
        type=float,
        default=989.0,
        help="bf16 dense peak (H100 SXM and H200: 989)",
    )
    p.add_argument(
        "--gpu-utilisation",
        type=float,
        default=0.3,
        help="assumed fraction of the peak the convolutions and matmuls reach",
    )
    p.add_argument(
        "--gpu-bandwidth-tbs",
        type=float,
        default=4.8,
        help="memory bandwidth, TB/s (H200 4.8, H100 SXM 3.35)",
    )
    p.add_argument("--json", action="store_true", help="print the numbers as JSON too")
    args = p.parse_args()  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    scale = (args.cores or threads) / threads  # achieved FLOP/s on --cores, linear scaling

    load_before = os.getloadavg()[0]
    full, reduced = stage_configs(), stage_configs(args.divisor, args.prior_layers)
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    rows = []
    for st in stages():
        params, flops = count(st, full)
        at = full if st.reduced == "full" else reduced
        _, measured_flops = count(st, at)
        secs = {"fp32": measure(st, at, False, args.repeat)}
        secs["bf16"] = secs["fp32"] if st.always_fp32 else measure(st, at, True, args.repeat)
        rate = {k: measured_flops / v for k, v in secs.items()}
        gpu_call = max(
            flops / (args.gpu_peak_tflops * 1e12 * args.gpu_utilisation),
            2 * params / (args.gpu_bandwidth_tbs * 1e12),
        )
        rows.append({
            "stage": st.name, "params": params, "rows": st.rows, "calls": st.calls,
            "gflops_per_call": flops / 1e9, "tflops_per_image": flops * st.calls / 1e12,
            "measured_as": {
                "full": "full size", "width": f"1/{args.divisor} width",
                "layers": f"{args.prior_layers} of {full.prior.layers} layers",
            }[st.reduced],
            "measured_gflops_per_call": measured_flops / 1e9,
            "measured_s": secs, "achieved_gflops": {k: v / 1e9 for k, v in rate.items()},
            "cpu_s_per_image": {k: flops * st.calls / (v * scale) for k, v in rate.items()},
            "gpu_s_per_image": gpu_call * st.calls,
        })  # fmt: skip
        print(f"# {st.name}: done", flush=True)
    # diffusers' UnCLIPPipeline runs the whole 81-token prior every step (no caption cache)
    with FakeTensorMode(), torch.no_grad():
        prior = DiffusionPriorTransformer(full.prior).eval()
        kw = _prior_inputs(prior, 2)
        x, t = torch.randn(2, prior.config.clip_dim), torch.full((2,), 500)
        uncached = forward_flops(lambda: prior(x, t, **kw)) * karlo_sampling().prior.steps
    report = {
        "machine": machine_info(), "load_average": [load_before, os.getloadavg()[0]],
        "matmul_peak_gflops": {k: v / 1e9 for k, v in peaks.items()}, "stages": rows,
        "diffusers_prior_tflops_per_image": uncached / 1e12, "cores": args.cores or threads,
        "gpu": {
            "peak_tflops": args.gpu_peak_tflops, "utilisation": args.gpu_utilisation,
            "bandwidth_tbs": args.gpu_bandwidth_tbs,
        },
    }  # fmt: skip
    print(format_report(report))
    if args.json:
        print(json.dumps(report, indent=2))


def format_report(r: dict[str, Any]) -> str:
    """The Markdown tables of :func:`main`'s report."""
    st = r["stages"]
    total = {k: sum(s[k] for s in st) for k in ("tflops_per_image", "gpu_s_per_image")}
    cpu = {d: sum(s["cpu_s_per_image"][d] for s in st) for d in ("fp32", "bf16")}
    m, g = r["machine"], r["gpu"]
    flops_rows = [
        (s["stage"], f"{s['params'] / 1e6:.0f} M", s["rows"], s["calls"], s["gflops_per_call"],
         s["tflops_per_image"]) for s in st
    ]  # fmt: skip
    flops_rows.append(("**one 256 px image**", "", "", "", "", total["tflops_per_image"]))
    measured_rows = [
        (s["stage"], s["measured_as"],
         s["measured_gflops_per_call"], s["measured_s"]["fp32"] * 1e3,
         s["achieved_gflops"]["fp32"], s["measured_s"]["bf16"] * 1e3,
         s["achieved_gflops"]["bf16"]) for s in st
    ]  # fmt: skip
    peak = r["matmul_peak_gflops"]

    scale = r["cores"] / m["threads"]
    threads = f"{m['threads']} thread" + ("s" if m["threads"] != 1 else "")

    def at_peak(tflops: float, dtype: str) -> float:
        return tflops * 1e3 / (peak[dtype] * scale)

    estimate_rows = [
        (s["stage"], s["cpu_s_per_image"]["fp32"], s["cpu_s_per_image"]["bf16"],
         at_peak(s["tflops_per_image"], "bf16"), s["gpu_s_per_image"]) for s in st
    ]  # fmt: skip
    estimate_rows.append((
        "**one 256 px image**", cpu["fp32"], cpu["bf16"],
        at_peak(total["tflops_per_image"], "bf16"), total["gpu_s_per_image"],
    ))  # fmt: skip
    return "\n\n".join([
        "### FLOPs at Karlo's sizes (counted, per call and per image)",
        markdown_table(
            ("stage", "params", "rows per call", "calls per image", "GFLOPs per call",
             "TFLOPs per image"), flops_rows,
        ),
        f"diffusers' `UnCLIPPipeline` runs the whole 81-token prior at every step (no caption "
        f"cache): {r['diffusers_prior_tflops_per_image']:.2f} TFLOPs per image for the prior.",
        f"### Measured on this machine ({threads}, {m['processor']}, load average "
        f"{r['load_average'][0]:.1f} before, {r['load_average'][1]:.1f} after; matmul peak "
        f"{peak['fp32']:.0f} GFLOP/s fp32, {peak['bf16']:.0f} GFLOP/s bf16)",
        markdown_table(
            ("stage", "measured as", "GFLOPs per call", "fp32 ms", "fp32 GFLOP/s", "bf16 ms",
             "bf16 GFLOP/s"), measured_rows,
        ),
        f"### Seconds per 256 px image: this CPU on {r['cores']} cores (extrapolated"
        + (
            ""
            if scale == 1
            else f" from {threads}, assuming linear scaling to {r['cores']} cores"
        )
        + f") and a GPU (estimated at {g['utilisation']:.0%} of {g['peak_tflops']:.0f} TFLOP/s "
        f"bf16, weights read at {g['bandwidth_tbs']} TB/s)",
        markdown_table(
            ("stage", "CPU fp32 s", "CPU bf16 s", "CPU at the bf16 matmul peak s (bound)",
             "GPU s (estimate)"), estimate_rows,
        ),
    ])  # fmt: skip


if __name__ == "__main__":
    main()
