"""Train the emoji-small decoder on a lent GPU machine that has no network, and bring it back.

Such a machine receives a copy of the repository plus at most a few tens of MB, runs one
command for at most ten minutes, and returns a few files of at most 16 MiB. The data set
(136 MB of 64 px PNG shards) and its embeddings do not fit; this kit moves only what the
decoder trains on:

    pack     (here)    the split's images at the training size as raw pixels and its CLIP
                       image embeddings, lzma-compressed into one file (the emoji train split
                       at 32 px: about 28 MB)
    train    (there)   unpack into a data set + embedding folder, time a short probe run,
                       train for the steps that fit the time left, and write the EMA weights
                       (float16) as parts of at most 15 MiB with a kit.json into --out
    join     (here)    check and reassemble the parts into a decoder model folder

``unpack`` is ``train``'s first step on its own. The images are exactly the tensors the
decoder stage would read from the original data (the same resize), and the image embeddings
are the packed float16 rows; the text embeddings, which the embedding folder format holds but
the decoder does not use, are recomputed from the captions with the pipeline's CLIP.

    python scripts/gpu/decoder_kit.py pack --data data/emoji --split train --size 32 \\
        --embeddings runs/emoji-small/embeddings/train --out .gpu/emoji-train-32.pack
    python3 scripts/gpu/decoder_kit.py train --pack .gpu/emoji-train-32.pack \\
        --config configs/emoji-small/decoder-gpu.json --work /tmp/kit --out "$OUT" --minutes 8.5
    python scripts/gpu/decoder_kit.py join FOLDER --out runs/emoji-small/decoder-gpu/final

See docs/gpu-training.md.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
FORMAT = "unclip-decoder-pack"
PART_BYTES = 15 * 2**20
KIT_NAME = "kit.json"
PROBE_STEPS = 100
TRAVEL_LIMIT = 64 * 2**20  # what the lent GPU machines take: the tracked tree + carried paths


class KitError(RuntimeError):
    """A problem with the kit's inputs, said in one line."""


def _environment() -> dict[str, str]:
    """The environment for the ``unclip`` subprocesses: this checkout's package first."""
    paths = [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1")


def _xz(data: bytes) -> bytes:
    return lzma.compress(data, preset=6)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# --- pack -----------------------------------------------------------------------------------


def pack(data: str, split: str, size: int, embeddings: str, out: Path) -> dict[str, Any]:
    """Write the pack of ``split`` of ``data`` at ``size`` px with the ``embeddings`` rows."""
    from unclip.data.datasets import open_dataset
    from unclip.data.embeddings import EmbeddingShards
    from unclip.data.shards import read_manifest
    from unclip.data.transforms import from_tensor

    images = open_dataset(data, size=size, split=split)
    shards = EmbeddingShards(embeddings)
    manifest = {r["key"]: r for r in read_manifest(Path(data) / "manifest.jsonl")}
    keys, records, pixels, rows = [], [], [], []
    seen: set[str] = set()
    for i in range(len(images)):
        item = images[i]  # a sample that cannot be read gives the next one: keep each key once
        key = item["key"]
        if key in seen or key not in shards:
            continue
        seen.add(key)
        keys.append(key)
        record = {k: v for k, v in manifest.get(key, {}).items() if k not in ("shard", "file")}
        records.append({**record, "key": key, "caption": item["caption"], "split": split})
        pixels.append(np.asarray(from_tensor(item["image"])))  # exactly to_tensor's inverse
        rows.append(shards.index_of(key))
    if not keys:
        raise KitError(f"{data}: no sample of split {split!r} has an embedding in {embeddings}")
    image_array = np.stack(pixels)
    emb = np.asarray(shards.image_emb[np.asarray(rows)], dtype=np.float16)
    meta = {
        "format": FORMAT,
        "version": 1,
        "count": len(keys),
        "size": size,
        "dim": int(emb.shape[1]),
        "split": split,
        "data": str(data),
        "embeddings": str(embeddings),
        "skipped": len(images) - len(keys),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    with tarfile.open(tmp, "w") as tar:
        _add(tar, "pack.json", json.dumps(meta, indent=2).encode())
        lines = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records)
        _add(tar, "records.jsonl.xz", _xz(lines.encode()))
        _add(tar, "images.u8.xz", _xz(image_array.tobytes()))
        _add(tar, "img_emb.f16.xz", _xz(emb.tobytes()))
    os.replace(tmp, out)
    meta["bytes"] = out.stat().st_size
    tree = tracked_bytes()
    if tree is not None:
        meta["travels_with_tracked_tree"] = f"{(tree + meta['bytes']) / 2**20:.1f} MiB"
        if tree + meta["bytes"] > TRAVEL_LIMIT:
            print(f"decoder_kit pack: warning: the tracked tree ({tree / 2**20:.1f} MiB) and the "
                  f"pack together exceed {TRAVEL_LIMIT // 2**20} MiB; see docs/gpu-training.md",
                  file=sys.stderr)  # fmt: skip
    return meta


def tracked_bytes() -> int | None:
    """Bytes of the files git tracks in this checkout (None without git)."""
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                               check=True).stdout.split(b"\0")  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    paths = (REPO / os.fsdecode(n) for n in names if n)
    return sum(p.stat().st_size for p in paths if p.is_file())


def read_pack(path: Path) -> tuple[dict[str, Any], list[dict], np.ndarray, np.ndarray]:
    """(pack.json, records, images ``[N, S, S, 3]`` uint8, image embeddings ``[N, D]`` f16)."""
    try:
        with tarfile.open(path) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        meta = json.loads(files["pack.json"])
        if meta.get("format") != FORMAT:
            raise KitError(f"{path}: not a decoder pack (format {meta.get('format')!r})")
        records = [json.loads(x) for x in lzma.decompress(files["records.jsonl.xz"]).splitlines()]
        n, s, d = meta["count"], meta["size"], meta["dim"]
        images = np.frombuffer(lzma.decompress(files["images.u8.xz"]), np.uint8)
        emb = np.frombuffer(lzma.decompress(files["img_emb.f16.xz"]), np.float16)
        images, emb = images.reshape(n, s, s, 3), emb.reshape(n, d)
    except (OSError, tarfile.TarError, KeyError, ValueError, lzma.LZMAError) as e:
        raise KitError(f"{path}: not a whole decoder pack ({e})") from None
    if len(records) != n:
        raise KitError(f"{path}: {len(records)} records for {n} images")
    return meta, records, images, emb


# --- unpack ---------------------------------------------------------------------------------


def unpack(path: Path, work: Path, pipeline: Path, device: str) -> dict[str, Path]:
    """Unpack into ``work``: ``data/`` (shards + manifest), ``embeddings/`` and ``clip/`` (the
    pipeline's CLIP with its tokenizer, as a decoder run's ``clip`` expects)."""
    from PIL import Image

    from unclip.data.embeddings import write_info, write_shard
    from unclip.data.shards import ShardWriter, write_manifest
    from unclip.train.stages.common import FrozenTextEncoder

    meta, records, images, emb = read_pack(path)
    data, embeddings, clip = work / "data", work / "embeddings", work / "clip"
    for folder in (data, embeddings, clip):
        shutil.rmtree(folder, ignore_errors=True)
    with ShardWriter(data, prefix="pack", max_count=5000) as writer:
        for record, pixels in zip(records, images, strict=True):
            png = io.BytesIO()
            Image.fromarray(pixels).save(png, format="PNG")
            writer.write(record["key"], {"png": png.getvalue(), "txt": record["caption"].encode()})
            record["shard"] = writer.paths[-1].name
    write_manifest(data / "manifest.jsonl", records)

    shutil.copytree(pipeline / "clip", clip)
    if not (clip / "tokenizer").exists():  # a pipeline keeps it beside the CLIP, a run inside
        shutil.copytree(pipeline / "tokenizer", clip / "tokenizer")
    text = FrozenTextEncoder(clip, device)  # its z_t is CLIP's text embedding, as embed writes
    captions = [r["caption"] for r in records]
    batches = (text(captions[i : i + 512])[0] for i in range(0, len(captions), 512))
    text_emb = np.concatenate([z_t.cpu().numpy() for z_t in batches])
    shard_size = 10_000
    shards = (len(records) + shard_size - 1) // shard_size
    for i in range(shards):
        lo, hi = i * shard_size, min(len(records), (i + 1) * shard_size)
        rows = [{"key": r["key"], "caption": r["caption"]} for r in records[lo:hi]]
        write_shard(embeddings, i, emb[lo:hi], text_emb[lo:hi], rows)
    write_info(embeddings, len(records), shards, meta["dim"], {"pack": str(path)})
    return {"data": data, "embeddings": embeddings, "clip": clip}


# --- train ----------------------------------------------------------------------------------


def _unclip(args: list[str], log: Path) -> float:
    """Run ``python -m unclip ARGS`` with its output appended to ``log``; its wall time."""
    start = time.monotonic()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ unclip {' '.join(args)}\n")
        f.flush()
        rc = subprocess.call(
            [sys.executable, "-m", "unclip", *args], stdout=f, stderr=subprocess.STDOUT,
            env=_environment(),
        )  # fmt: skip
    if rc:
        raise KitError(f"unclip {args[0]} {args[1]} exited with {rc}; see {log}")
    return time.monotonic() - start


def steps_per_second(metrics: Path) -> float:
    """Optimizer steps per second between the last two records of a ``metrics.jsonl``."""
    records = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    if len(records) < 2:
        raise KitError(f"{metrics}: fewer than two records to time the steps")
    a, b = records[-2], records[-1]
    return (b["step"] - a["step"]) / max(b["time"] - a["time"], 1e-9)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Unpack, probe, train and export, all inside ``args.minutes`` of wall time: the run
    takes the steps that fit, at most the config's ``train.steps``."""
    import torch

    deadline = time.monotonic() + args.minutes * 60
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "train.log"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    began = time.monotonic()
    paths = unpack(Path(args.pack), work, Path(args.pipeline), device)
    seconds = {"unpack": time.monotonic() - began}
    config = json.loads(Path(args.config).read_text())
    config["data"].update(path=str(paths["data"]), embeddings=str(paths["embeddings"]))
    config["clip"] = str(paths["clip"])
    config.pop("init", None)
    run_config = work / "decoder.json"
    run_config.write_text(json.dumps(config, indent=2))
    common = ["--config", str(run_config), "--device", device, "--no-progress"]

    probe = work / "probe"
    shutil.rmtree(probe, ignore_errors=True)
    probe_steps = args.probe_steps
    wall = _unclip(["train", "decoder", *common, "--run-dir", str(probe), "--steps",
                    str(probe_steps)], log)  # fmt: skip
    seconds["probe"] = wall
    rate = steps_per_second(probe / "metrics.jsonl")
    overhead = max(0.0, wall - probe_steps / rate)  # start-up, first steps, export
    left = deadline - time.monotonic() - overhead - args.reserve
    steps = min(int(rate * left * 0.95), config["train"]["steps"])
    if steps < args.min_steps:
        raise KitError(
            f"{rate:.2f} steps/s leaves {steps} steps in the {left:.0f} s left; "
            f"at least {args.min_steps} are needed (raise --minutes)"
        )
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    error = None
    began = time.monotonic()
    try:
        _unclip(["train", "decoder", *common, "--run-dir", str(run), "--steps", str(steps),
                 "--max-minutes", f"{max(left, 1.0) / 60:.3f}"], log)  # fmt: skip
    except KitError as e:  # bring back what the run saved before it broke
        error = str(e)
    seconds["train"] = time.monotonic() - began
    name = torch.cuda.get_device_name() if device.startswith("cuda") else device
    began = time.monotonic()
    summary = export(run, out, extra={"steps": steps, "probe_steps_per_s": rate, "device": name})
    summary["seconds"] = {**seconds, "export": time.monotonic() - began}
    if error:
        summary["error"] = error
    (out / KIT_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def export(run: Path, out: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the run's sampling weights (``final/``, else its newest checkpoint) in float16,
    with its configs and metrics, as ``final.tar`` parts of at most 15 MiB and ``kit.json``."""
    import torch

    from unclip.hub import from_pretrained, save_pretrained
    from unclip.train.checkpoint import latest_checkpoint

    source = run / "final" if (run / "final" / "config.json").exists() else latest_checkpoint(run)
    if source is None:
        raise KitError(f"{run}: no final/ and no checkpoint to export")
    model = from_pretrained(source)  # the EMA weights when there are some
    folder = run.parent / "export" / "final"
    shutil.rmtree(folder.parent, ignore_errors=True)
    save_pretrained(model, folder, dtype=torch.float16)
    for file in (source / "diffusion.json", run / "run_config.json", run / "metrics.jsonl"):
        if file.exists():
            shutil.copy(file, folder / file.name)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for file in sorted(folder.iterdir()):
            tar.add(file, arcname=f"final/{file.name}")
    blob = buffer.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("final.tar.part-*"):
        old.unlink()
    parts = []
    for i in range(0, len(blob), PART_BYTES):
        name = f"final.tar.part-{i // PART_BYTES}"
        (out / name).write_bytes(blob[i : i + PART_BYTES])
        parts.append(name)
    step = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    kit = {"parts": parts, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
           "source": source.name, "step": step, **(extra or {})}  # fmt: skip
    (out / KIT_NAME).write_text(json.dumps(kit, indent=2) + "\n")
    return kit


# --- join -----------------------------------------------------------------------------------


def join(folder: Path, out: Path, overwrite: bool = False) -> Path:
    """Reassemble ``folder``'s parts (checked against kit.json) into the model folder ``out``."""
    try:
        kit = json.loads((folder / KIT_NAME).read_text())
        blob = b"".join((folder / name).read_bytes() for name in kit["parts"])
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise KitError(f"{folder}: no whole kit ({e})") from None
    if len(blob) != kit["bytes"] or hashlib.sha256(blob).hexdigest() != kit["sha256"]:
        raise KitError(f"{folder}: the parts do not add up to the file kit.json describes")
    if out.exists():
        if not overwrite:
            raise KitError(f"{out} exists; pass --overwrite to replace it")
        shutil.rmtree(out)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        for member in tar.getmembers():
            name = Path(member.name)
            if not member.isfile() or name.parent != Path("final"):
                raise KitError(f"{folder}: unexpected entry {member.name!r} in the parts")
            (tmp / name.name).write_bytes(tar.extractfile(member).read())
    os.replace(tmp, out)
    return out


# --- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("pack", help="pack a split's images and image embeddings (here)")
    p.add_argument("--data", default="data/emoji", help="data set with a manifest.jsonl")
    p.add_argument("--split", default="train")
    p.add_argument("--size", type=int, default=32, help="the decoder's image size in pixels")
    p.add_argument("--embeddings", default="runs/emoji-small/embeddings/train",
                   help="`unclip embed` folder of the same split")  # fmt: skip
    p.add_argument("--out", required=True, help="the pack file to write")

    pipeline = str(REPO / "src/unclip/weights/emoji-small")
    for verb in ("unpack", "train"):
        p = sub.add_parser(verb, help="unpack only" if verb == "unpack" else
                           "unpack, probe, train and export (on the GPU machine)")  # fmt: skip
        p.add_argument("--pack", required=True)
        p.add_argument("--work", required=True, help="folder for the data, embeddings and runs")
        p.add_argument("--pipeline", default=pipeline,
                       help="pipeline folder whose clip/ and tokenizer/ the decoder reads")  # fmt: skip
        p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--config", required=True, help="the decoder run config")
    p.add_argument("--out", required=True, help="folder for kit.json, the parts and train.log")
    p.add_argument("--minutes", type=float, default=8.5, help="wall time for everything")
    p.add_argument("--reserve", type=float, default=30.0,
                   help="seconds kept for the export at the end (default 30)")  # fmt: skip
    p.add_argument("--probe-steps", type=int, default=PROBE_STEPS,
                   help="steps of the timing probe (its config's log_every must be at most "
                   "half of it)")  # fmt: skip
    p.add_argument("--min-steps", type=int, default=50)

    p = sub.add_parser("join", help="reassemble the returned parts into a model folder (here)")
    p.add_argument("folder", help="the folder holding kit.json and the parts")
    p.add_argument("--out", required=True, help="the decoder model folder to write")
    p.add_argument("--overwrite", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO / "src"))
    args = build_parser().parse_args(argv)
    try:
        if args.verb == "pack":
            result: Any = pack(args.data, args.split, args.size, args.embeddings, Path(args.out))
        elif args.verb == "unpack":
            device = args.device or "cpu"
            result = {k: str(v) for k, v in unpack(Path(args.pack), Path(args.work),
                                                    Path(args.pipeline), device).items()}  # fmt: skip
        elif args.verb == "train":
            result = train(args)
            if result.get("error"):
                print(f"decoder_kit train: error: {result['error']}; exported {result['source']}",
                      file=sys.stderr)  # fmt: skip
                return 1
        else:
            result = {"folder": str(join(Path(args.folder), Path(args.out), args.overwrite))}
    except (KitError, ValueError, OSError) as e:  # bad input, said in one line (as unclip does)
        print(f"decoder_kit {args.verb}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
