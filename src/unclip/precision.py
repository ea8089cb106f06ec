"""Whether a device multiplies bfloat16 natively: the one rule that sampling's "auto" precision
(:func:`unclip.pipeline.stages.default_dtype`) and training's bf16 autocast
(:func:`unclip.train.loop.autocast_context`) follow; and whether unclip's compiled float32
kernels beat it there (sampling's choice). Elsewhere bf16 is emulated, and slower
than float32 by far (the emoji-small decoder's training step under an AVX2 cap, batch 16:
8.4 s in bf16 against 0.34 s in float32)."""

from __future__ import annotations

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 natively: a CUDA GPU with bf16 support, or a CPU
    with AVX-512 BF16 or AMX whose kernels torch runs at AVX-512 (``ATEN_CPU_CAPABILITY=avx2``
    caps them, as on an AVX2-only CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):
        return False
    return _cpu_has("_is_avx512_bf16_supported") or _cpu_has("_is_amx_tile_supported")


def compiled_float32_faster(device: torch.device) -> bool:
    """Whether float32 samples faster than bfloat16 would on ``device``: a CPU where unclip's
    compiled float32 kernels run (Winograd convolutions: :mod:`unclip.decoder.winograd`) and
    bf16 has no AMX tiles. On an AVX-512 BF16 CPU without AMX, float32 with those kernels
    beats oneDNN's bf16 convolutions (docs/benchmarks.md); AMX's bf16 matrix units are not
    measured here, so a CPU with them keeps bf16."""
    if device.type != "cpu" or _cpu_has("_is_amx_tile_supported"):
        return False
    from unclip.decoder import winograd  # builds the kernels at the first call (cached)

    return winograd.available()


def _cpu_has(probe: str) -> bool:
    """torch.cpu's ``probe`` (a CPU feature), False where this torch lacks it."""
    check = getattr(torch.cpu, probe, None)
    return bool(check is not None and check())
