"""Reporting for ``unclip bench`` and ``benchmarks/``: Markdown tables, the machine a run was
measured on, and sections of ``docs/benchmarks.md`` replaced in place."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
