"""Whether a device multiplies bfloat16 natively: the one rule that sampling's "auto" precision
(:func:`unclip.pipeline.stages.default_dtype`) and training's bf16 autocast
(:func:`unclip.train.loop.autocast_context`) follow. Elsewhere bf16 is emulated, and slower
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
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    return False
