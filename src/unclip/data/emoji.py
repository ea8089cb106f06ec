"""Build the "emoji" data set: about 23,000 real emoji in seven art styles, from npm packages.

Images come from emoji-datasource-twitter/-google (64 px PNG), openmoji (SVG),
@lobehub/fluent-emoji-3d (WebP) and @iconify-json/{fluent-emoji-flat, fluent-emoji, emojione}
(SVG bodies in JSON); names, tags and groups from emojibase-data, joined by code point
(upper-case hex, FE0F removed). Every image is rendered onto white at 64×64 RGB and written to
WebDataset shards with a ``manifest.jsonl`` (caption, tags, group, style, source, licence,
split). The same packages give byte-identical shards.

Splits: ``test`` holds (concept, style) pairs whose concept is in ``train`` only in other
styles, so a test prompt asks for an emoji the model never saw in that style; ``val`` is a
random 3% of the remaining images.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from unclip.data.shards import ShardWriter, write_manifest
from unclip.data.transforms import fit_square, load_image, onto_white, rasterize_svg

__all__ = [
    "EMOJIBASE",
    "SOURCES",
    "EmojiSource",
    "build_emoji",
    "install_packages",
    "normalize_hex",
]

EMOJIBASE = ("emojibase-data", "17.0.0")


@dataclass(frozen=True)
class EmojiSource:
    """One art style: an npm package and where its images lie inside it."""

    style_id: str  # short id used in keys: "noto"
    style: str  # as written in captions: "noto" -> "…, noto style"
    package: str
    version: str
    licence: str  # SPDX
    kind: str  # "png", "svg", "webp" (a folder of files named by code point) or "iconify"
    path: str  # folder (or, for iconify, the package root) inside the package
    artists: str  # credit line for the README and docs/model-card.md


SOURCES: tuple[EmojiSource, ...] = (
    EmojiSource(
        "twemoji",
        "twemoji",
        "emoji-datasource-twitter",
        "16.0.0",
        "CC-BY-4.0",
        "png",
        "img/twitter/64",
        "Twemoji, © Twitter, Inc. and other contributors",
    ),
    EmojiSource(
        "noto",
        "noto",
        "emoji-datasource-google",
        "16.0.0",
        "Apache-2.0",
        "png",
        "img/google/64",
        "Noto Emoji, © Google LLC",
    ),
    EmojiSource(
        "openmoji",
        "openmoji",
        "openmoji",
        "17.0.0",
        "CC-BY-SA-4.0",
        "svg",
        "color/svg",
        "OpenMoji, © the OpenMoji contributors (openmoji.org)",
    ),
    EmojiSource(
        "fluent3d",
        "fluent 3d",
        "@lobehub/fluent-emoji-3d",
        "1.1.0",
        "MIT",
        "webp",
        "assets",
        "Fluent Emoji 3D, © Microsoft Corporation",
    ),
    EmojiSource(
        "fluentflat",
        "fluent flat",
        "@iconify-json/fluent-emoji-flat",
        "1.2.6",
        "MIT",
        "iconify",
        ".",
        "Fluent Emoji Flat, © Microsoft Corporation",
    ),
    EmojiSource(
        "fluent",
        "fluent color",
        "@iconify-json/fluent-emoji",
        "1.2.7",
        "MIT",
        "iconify",
        ".",
        "Fluent Emoji (color), © Microsoft Corporation",
    ),
    EmojiSource(
        "emojione",
        "emojione",
        "@iconify-json/emojione",
        "1.2.3",
        "CC-BY-4.0",
        "iconify",
        ".",
        "EmojiOne 2.2, © Ranks.com / JoyPixels",
    ),
)

SIZE = 64
SHARD_SIZE = 2000
TEST_CONCEPT_PERCENT = 8
VAL_PERCENT = 3


def normalize_hex(code: str) -> str:
    """``"0023-fe0f-20e3"`` -> ``"0023-20E3"``: upper-case, FE0F removed, '-'-joined."""
    parts = [p.upper().lstrip("0").rjust(4, "0") for p in re.split(r"[-_ ]", code.strip()) if p]
    return "-".join(p for p in parts if p != "FE0F")


def slugify(label: str) -> str:
    """Iconify's icon names: ``"waving hand: dark skin tone"`` -> ``"waving-hand-dark-skin-tone"``."""
    text = label.lower().replace("’", "").replace("'", "").replace("&", "and")
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def _stable_int(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "big")


# --- packages -------------------------------------------------------------------------------


def install_packages(cache: Path, quiet: bool = True) -> Path:
    """``npm install`` the pinned packages into ``cache`` (reused when present); returns
    ``cache/node_modules``."""
    cache.mkdir(parents=True, exist_ok=True)
    modules = cache / "node_modules"
    wanted = [(s.package, s.version) for s in SOURCES] + [EMOJIBASE]
    missing = [(n, v) for n, v in wanted if not _installed(modules, n, v)]
    if not missing:
        return modules
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError(
            "npm is needed to fetch the emoji packages; install Node.js (e.g. `apt install npm`) "
            f"or put the packages into {modules} yourself"
        )
    if not (cache / "package.json").exists():
        (cache / "package.json").write_text('{"name": "unclip-emoji-cache", "private": true}\n')
    cmd = [npm, "install", "--no-audit", "--no-fund", "--ignore-scripts", "--no-save"]
    cmd += [f"{n}@{v}" for n, v in wanted]
    print(f"unclip: installing {len(wanted)} npm packages into {cache}", file=sys.stderr)
    proc = subprocess.run(cmd, cwd=cache, capture_output=quiet, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"npm install failed:\n{proc.stderr or ''}")
    return modules


def _installed(modules: Path, name: str, version: str) -> bool:
    try:
        meta = json.loads((modules / name / "package.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("version") == version


# --- catalogue ------------------------------------------------------------------------------


@dataclass
class Concept:
    hexcode: str  # normalised
    base: str  # normalised hexcode of the emoji without skin tone: what the splits group by
    label: str
    tags: list[str]
    group: str
    subgroup: str
    order: int


def load_emojibase(modules: Path) -> dict[str, Concept]:
    """Every emoji (skin-tone variants included) by normalised code point."""
    root = modules / EMOJIBASE[0] / "en"
    data = json.loads((root / "data.json").read_text(encoding="utf-8"))
    messages = json.loads((root / "messages.json").read_text(encoding="utf-8"))
    groups = {g["order"]: g["message"] for g in messages["groups"]}
    subgroups = {g["order"]: g["message"] for g in messages["subgroups"]}
    out: dict[str, Concept] = {}
    for entry in data:
        if "group" not in entry:
            continue  # regional indicator letters: no group, not emoji on their own
        base = normalize_hex(entry["hexcode"])
        for item in [entry, *entry.get("skins", [])]:
            code = normalize_hex(item["hexcode"])
            out[code] = Concept(
                hexcode=code,
                base=base,
                label=item["label"],
                tags=list(entry.get("tags", [])),
                group=groups.get(item.get("group", entry["group"]), ""),
                subgroup=subgroups.get(item.get("subgroup", entry.get("subgroup", -1)), ""),
                order=int(item.get("order", entry.get("order", 0))),
            )
    return out


def caption_for(concept: Concept, source: EmojiSource) -> str:
    """``"waving hand, light skin tone, noto style"``."""
    return f"{concept.label.replace(': ', ', ')}, {source.style} style"


Job = tuple[str, str, str]  # (kind, path or svg text, name)


def _datasource_allowed(pkg: Path, source: EmojiSource) -> set[str] | None:
    """emoji-datasource marks which images are its set's own (others are fallbacks)."""
    meta = pkg / "emoji.json"
    if not meta.exists():
        return None
    flag = "has_img_" + source.path.split("/")[1]
    allowed = set()
    for entry in json.loads(meta.read_text(encoding="utf-8")):
        for item in [entry, *(entry.get("skin_variations") or {}).values()]:
            if item.get(flag) and item.get("image"):
                allowed.add(item["image"])
    return allowed


def list_source(modules: Path, source: EmojiSource, catalogue: dict[str, Concept]):
    """Yield (concept, job) for every image of ``source`` that emojibase names."""
    pkg = modules / source.package
    if source.kind == "iconify":
        icons = json.loads((pkg / "icons.json").read_text(encoding="utf-8"))
        width, height = icons.get("width", 16), icons.get("height", 16)
        by_name: dict[str, str] = {}
        chars_file = modules / "@iconify-json/fluent-emoji-flat/chars.json"
        for chars in (pkg / "chars.json", chars_file):
            if chars.exists():
                for code, name in json.loads(chars.read_text(encoding="utf-8")).items():
                    by_name.setdefault(name, normalize_hex(code))
        for code, concept in catalogue.items():
            by_name.setdefault(slugify(concept.label), code)
        seen: set[str] = set()
        for name in sorted(icons["icons"]):
            code = by_name.get(name)
            if code is None or code not in catalogue or code in seen:
                continue
            seen.add(code)
            icon = icons["icons"][name]
            w, h = icon.get("width", width), icon.get("height", height)
            left, top = icon.get("left", 0), icon.get("top", 0)
            scale = SIZE / max(w, h)
            svg = (
                f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink"'
                f' width="{w * scale:g}" height="{h * scale:g}" viewBox="{left} {top} {w} {h}">'
                f"{icon['body']}</svg>"
            )
            yield catalogue[code], ("svgtext", svg, f"{source.package}:{name}")
        return
    folder = pkg / source.path
    allowed = _datasource_allowed(pkg, source) if source.kind == "png" else None
    seen = set()
    for path in sorted(folder.iterdir()):
        if allowed is not None and path.name not in allowed:
            continue
        code = normalize_hex(path.stem)
        if code not in catalogue or code in seen:
            continue
        seen.add(code)
        yield (
            catalogue[code],
            (source.kind, str(path), f"{source.package}/{source.path}/{path.name}"),
        )


def render(job: Job) -> bytes:
    """Render one job to a 64×64 RGB PNG (bytes); deterministic."""
    kind, data, name = job
    if kind == "svgtext":
        img = rasterize_svg(data, size=SIZE, name=name)
    elif kind == "svg":
        img = rasterize_svg(Path(data).read_text(encoding="utf-8"), size=SIZE, name=name)
    else:
        img = load_image(data, name=name)
    rgb = onto_white(fit_square(img, SIZE))
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def assign_splits(records: list[dict[str, Any]]) -> None:
    """Add ``split`` to every record (in place), deterministically from the keys.

    A concept (an emoji with its skin-tone variants) is a test concept with probability 8%;
    one of its styles (chosen by hash) goes to ``test`` and the other styles stay in ``train``.
    """
    styles_of: dict[str, list[str]] = {}
    for r in records:
        styles_of.setdefault(r["concept"], [])
        if r["style"] not in styles_of[r["concept"]]:
            styles_of[r["concept"]].append(r["style"])
    held: dict[str, str] = {}
    for concept, styles in styles_of.items():
        if len(styles) >= 2 and _stable_int("test", concept) % 100 < TEST_CONCEPT_PERCENT:
            held[concept] = sorted(styles)[_stable_int("style", concept) % len(styles)]
    for r in records:
        if held.get(r["concept"]) == r["style"]:
            r["split"] = "test"
        elif r["concept"] not in held and _stable_int("val", r["key"]) % 100 < VAL_PERCENT:
            r["split"] = "val"
        else:
            r["split"] = "train"


def build_emoji(
    out: str | os.PathLike,
    cache: str | os.PathLike | None = None,
    modules: str | os.PathLike | None = None,
    workers: int | None = None,
    styles: Iterable[str] | None = None,
    limit: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build the data set into ``out`` (shards + ``manifest.jsonl`` + ``stats.json``).

    ``modules``: an existing ``node_modules`` folder (else the packages are installed into
    ``cache``). ``styles``/``limit`` build a subset (tests). Returns the statistics.
    """
    from tqdm import tqdm

    out = Path(out)
    if modules is None:
        cache = Path(cache) if cache is not None else Path.home() / ".cache" / "unclip" / "npm"
        modules = install_packages(cache)
    modules = Path(modules)
    catalogue = load_emojibase(modules)
    chosen = [s for s in SOURCES if styles is None or s.style_id in set(styles)]
    if not chosen:
        raise ValueError(f"no such style; styles are {[s.style_id for s in SOURCES]}")
    records: list[dict[str, Any]] = []
    jobs: list[Job] = []
    for source in chosen:
        if not (modules / source.package).is_dir():
            raise FileNotFoundError(f"{modules / source.package}: package not installed")
        items = list(list_source(modules, source, catalogue))
        if limit is not None:
            items = items[:limit]
        for concept, job in items:
            key = f"{source.style_id}-{concept.hexcode.lower()}"
            records.append(
                {
                    "key": key,
                    "caption": caption_for(concept, source),
                    "label": concept.label,
                    "tags": concept.tags,
                    "group": concept.group,
                    "subgroup": concept.subgroup,
                    "style": source.style,
                    "concept": concept.base,
                    "hexcode": concept.hexcode,
                    "source": f"{source.package}@{source.version}",
                    "file": job[2],
                    "licence": source.licence,
                    "mode": "pad",
                }
            )
            jobs.append(job)
    assign_splits(records)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("emoji-*.tar"):
        old.unlink()
    failed: list[str] = []
    kept: list[dict[str, Any]] = []
    workers = workers or min(8, os.cpu_count() or 1)
    ctx = get_context("fork" if sys.platform.startswith("linux") else "spawn")
    bar = tqdm(total=len(jobs), desc="emoji", unit="img", disable=not progress)
    with ctx.Pool(workers) as pool, ShardWriter(out, "emoji", SHARD_SIZE) as writer:
        for record, png in zip(records, pool.imap(_render_safe, jobs, chunksize=32), strict=True):
            bar.update(1)
            if png is None:
                failed.append(record["file"])
                continue
            meta = {k: record[k] for k in ("caption", "label", "tags", "group", "style")}
            writer.write(
                record["key"],
                {
                    "png": png,
                    "txt": record["caption"].encode(),
                    "json": json.dumps(meta, sort_keys=True).encode(),
                },
            )
            record["shard"] = writer.paths[-1].name
            kept.append(record)
    bar.close()
    write_manifest(out / "manifest.jsonl", kept)
    stats = dataset_stats(kept)
    stats["failed"] = failed
    (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    log(f"unclip: wrote {len(kept)} images in {len(writer.paths)} shards to {out}")
    if failed:
        log(f"unclip: {len(failed)} images could not be rendered: {', '.join(failed[:5])}")
    return stats


def _render_safe(job: Job) -> bytes | None:
    try:
        return render(job)
    except Exception:  # a broken source file is reported, never fatal
        return None


def dataset_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    by_style: dict[str, dict[str, int]] = {}
    for r in records:
        counts = by_style.setdefault(r["style"], {"train": 0, "val": 0, "test": 0})
        counts[r["split"]] += 1
    totals = {s: sum(c[s] for c in by_style.values()) for s in ("train", "val", "test")}
    return {"images": len(records), "by_style": by_style, "by_split": totals}
