"""Train emoji-small stages on a lent GPU machine that has no network, and bring them back.

Such a machine receives a copy of the repository working tree plus carried paths (64 MiB in
all), runs one command for at most ten minutes, and returns at most eight files of at most
16 MiB. The data set (136 MB of PNG shards) and its embeddings do not travel; this kit moves
only what the stages train on:

    pack     (here)    the split's images at the largest stage's size as raw pixels (a smaller
                       stage's images are derived there by the same resize the stage does, when
                       the pack checked that this gives the very same tensors; otherwise they
                       are packed too), the decoder's CLIP image embeddings, the CLIP text side
                       (the decoder's text encoder), the run configs and the weights to start
                       from (``--init``), lzma-compressed into one file; it refuses a pack that
                       would not travel with the working tree, naming what to leave out
    train    (there)   unpack; measure each stage's step by parts (``unclip bench train``) and
                       try the layouts and options that may matter, keeping the fastest; split
                       the time left between the stages by their measured rates; train each
                       for the steps that fit its share; write every stage's EMA weights
                       (float16) as parts of at most 15 MiB, ``kit.json`` (its first key a
                       one-line verdict: measured samples/s against what the FLOPs promise)
                       and ``train.log`` into --out
    join     (here)    check and reassemble the parts into one model folder per stage

``unpack`` is ``train``'s first step on its own; ``time`` is the measuring phase's subprocess
for a compiled model (killed when its time is up).

    python scripts/gpu/kit.py pack --stages decoder,upsampler --leave-out src/unclip/weights \\
        --out .gpu/emoji-train.pack
    python3 scripts/gpu/kit.py train --pack .gpu/emoji-train.pack --work /tmp/kit \\
        --out "$OUT" --minutes 8.5
    python scripts/gpu/kit.py join FOLDER --out runs/emoji-small/gpu

See docs/gpu-training.md.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
FORMAT = "unclip-gpu-pack"
VERSION = 2
STAGES = ("decoder", "upsampler")
DEFAULT_CONFIGS = {"decoder": "configs/emoji-small/decoder-gpu.json",
                   "upsampler": "configs/emoji-small/upsampler-gpu.json"}  # fmt: skip
DEFAULT_CLIP = "src/unclip/weights/emoji-small/clip"  # tokenizer beside it, in the pipeline
TRAVEL_LIMIT = 64 * 2**20  # the working tree that travels: tracked + untracked files + carry
PART_BYTES = 15 * 2**20  # a returned file is at most 16 MiB
MAX_FILES = 8  # files that come back from $OUT
KIT_NAME, LOG_NAME, TAR_NAME = "kit.json", "train.log", "stages.tar"
MEASURE_SECONDS = 60.0  # the measuring phase, all stages and options together
PROMISE_MFU = 0.25  # what a well-fed step reaches: "what the FLOPs promise"
FAR_BELOW = 0.5  # measured samples/s under this share of the promise: kit.json says so first
STARTUP_SECONDS = 20.0  # an `unclip train` process before its first step, until one is timed
TRIES = ("layout", "compile")
RATE_MARGIN = 0.95  # a run plans its steps at this share of the measured rate
TEXT_SIDE_SKIP = "visual."  # CLIP's image tower: the decoder's loss needs only the text side


class KitError(RuntimeError):
    """A problem with the kit's inputs, said in one line."""


def _environment() -> dict[str, str]:
    """The environment for subprocesses: this checkout's package first."""
    paths = [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1")


def _xz(data: bytes) -> bytes:
    return lzma.compress(data, preset=6)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def run_config_class(stage: str) -> type:
    from unclip.run_configs import DecoderRunConfig, UpsamplerRunConfig

    if stage not in STAGES:
        raise KitError(f"unknown stage {stage!r}; the kit trains {', '.join(STAGES)}")
    return {"decoder": DecoderRunConfig, "upsampler": UpsamplerRunConfig}[stage]


# --- pack -----------------------------------------------------------------------------------


def pack(
    stages: list[str],
    configs: dict[str, Path],
    out: Path,
    *,
    data: str | None = None,
    split: str | None = None,
    embeddings: str | None = None,
    clip: str = DEFAULT_CLIP,
    init: dict[str, Path] | None = None,
    leave_out: list[str] = (),
    max_images: int | None = None,
) -> dict[str, Any]:
    """Write the pack for ``stages`` (run configs ``configs``) to ``out``; refuse past the
    travel limit with what to leave out."""
    from PIL import Image

    from unclip.data.datasets import open_dataset
    from unclip.data.embeddings import EmbeddingShards
    from unclip.data.shards import read_manifest
    from unclip.data.transforms import from_tensor, prepare_image, to_tensor

    init = init or {}
    cfgs = {s: run_config_class(s).load(configs[s]) for s in stages}
    for stage in init:
        if stage not in stages:
            raise KitError(f"--init {stage}: not among the packed stages {','.join(stages)}")
    for stage, folder in init.items():
        if not (Path(folder) / "config.json").is_file():
            raise KitError(f"--init {stage}: {folder} is not a model folder (no config.json)")
    first = cfgs[stages[0]]
    data = data or first.data.path
    split = split if split is not None else first.data.split
    sizes = {s: c.data.image_size for s, c in cfgs.items()}
    size = max(sizes.values())
    mode = first.data.mode or None
    decoder = cfgs.get("decoder")
    shards = None
    if decoder is not None:
        shards = EmbeddingShards(embeddings or decoder.data.embeddings)
    images = open_dataset(data, size=size, split=split or None, mode=mode)
    smaller = {s: open_dataset(data, size=s, split=split or None, mode=mode)
               for s in sorted(set(sizes.values()) - {size})}  # fmt: skip
    manifest = {r["key"]: r for r in read_manifest(Path(data) / "manifest.jsonl")}
    keys, records, pixels, rows = [], [], [], []
    small_pixels: dict[int, list[np.ndarray]] = {s: [] for s in smaller}
    differ = dict.fromkeys(smaller, 0)
    seen: set[str] = set()
    for i in range(len(images)):
        item = images[i]  # a sample that cannot be read gives the next one: keep each key once
        key = item["key"]
        if key in seen or (shards is not None and key not in shards):
            continue
        if max_images is not None and len(keys) >= max_images:
            break
        seen.add(key)
        keys.append(key)
        record = {k: v for k, v in manifest.get(key, {}).items() if k not in ("shard", "file")}
        records.append({**record, "key": key, "caption": item["caption"], "split": split})
        big = np.asarray(from_tensor(item["image"]))  # exactly to_tensor's inverse
        pixels.append(big)
        for s, ds in smaller.items():  # the stage's own tensor, and the one derived there
            own = ds[i]
            if own["key"] != key:
                raise KitError(f"{data}: sample {i} is {own['key']} at {s} px but {key} at {size}")
            derived = to_tensor(prepare_image(Image.fromarray(big), s, ds.mode))
            differ[s] += not bool(torch_equal(derived, own["image"]))
            small_pixels[s].append(np.asarray(from_tensor(own["image"])))
        if shards is not None:
            rows.append(shards.index_of(key))
    if not keys:
        raise KitError(f"{data}: no sample of split {split!r} to pack"
                       + (" has an embedding" if shards is not None else ""))  # fmt: skip
    members: dict[str, bytes] = {}
    lines = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records)
    members["records.jsonl.xz"] = _xz(lines.encode())
    members[f"images-{size}.u8.xz"] = _xz(np.stack(pixels).tobytes())
    for s, n in differ.items():
        if n:  # derived images would differ from the stage's own: pack them as they are
            members[f"images-{s}.u8.xz"] = _xz(np.stack(small_pixels[s]).tobytes())
    dim = 0
    if shards is not None:
        emb = np.asarray(shards.image_emb[np.asarray(rows)], dtype=np.float16)
        dim = int(emb.shape[1])
        members["img_emb.f16.xz"] = _xz(emb.tobytes())
        members.update(clip_text_side(Path(clip)))
    for stage, folder in init.items():
        for file in sorted(Path(folder).iterdir()):
            if file.is_file() and file.name != "metrics.jsonl":
                members[f"init/{stage}/{file.name}"] = file.read_bytes()
    meta = {
        "format": FORMAT, "version": VERSION, "count": len(keys), "size": size, "dim": dim,
        "stages": stages, "sizes": sizes, "split": split, "data": str(data),
        "derived": {str(s): not n for s, n in differ.items()},
        "configs": {s: json.loads(Path(configs[s]).read_text()) for s in stages},
        "skipped": len(images) - len(keys), "init": sorted(init),
        "members": {k: len(v) for k, v in members.items()},
    }  # fmt: skip
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        _add(tar, "pack.json", json.dumps(meta, indent=2).encode())
        for name, blob in members.items():
            _add(tar, name, blob)
    meta["bytes"] = len(buffer.getvalue())
    meta.update(check_travel(meta, out, leave_out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, out)
    meta.pop("configs")
    return meta


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return torch.equal(a, b)


def clip_text_side(clip: Path) -> dict[str, bytes]:
    """The CLIP's text side as pack members: its config, the tensors its loader uses (the EMA
    weights when there are some) except the image tower's, as stored (the shipped CLIP is
    float16), and its tokenizer's files."""
    from safetensors.numpy import load_file, save

    from unclip.hub import CONFIG_NAME, EMA_NAME, WEIGHTS_NAME
    from unclip.train.stages.common import clip_tokenizer_dir

    weights = clip / (EMA_NAME if (clip / EMA_NAME).exists() else WEIGHTS_NAME)
    try:
        tensors = load_file(str(weights))
        tokenizer = clip_tokenizer_dir(clip)
        out = {"clip/config.json": (clip / CONFIG_NAME).read_bytes()}
    except (OSError, FileNotFoundError) as e:
        raise KitError(f"--clip {clip}: no CLIP model folder with a tokenizer ({e})") from None
    text = {k: v for k, v in tensors.items() if not k.startswith(TEXT_SIDE_SKIP)}
    out["clip/text.safetensors.xz"] = _xz(save(text))
    for file in sorted(tokenizer.iterdir()):
        out[f"clip/tokenizer/{file.name}"] = file.read_bytes()
    return out


def travelling_bytes(leave_out: list[str] = ()) -> dict[str, int] | None:
    """Bytes of the files that travel with a call (tracked and untracked-not-ignored, as on
    disk), by top path: ``src/unclip/weights`` and the rest; None without git."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                                "--exclude-standard"], cwd=REPO, capture_output=True,
                               check=True).stdout.split(b"\0")  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    left = [Path(p).as_posix().rstrip("/") + "/" for p in leave_out]
    sizes = {"left out": 0, "weights": 0, "rest": 0}
    for name in filter(None, names):
        path = os.fsdecode(name)
        file = REPO / path
        if not file.is_file():
            continue
        part = ("left out" if any(f"{path}/".startswith(p) for p in left) else
                "weights" if path.startswith("src/unclip/weights/") else "rest")  # fmt: skip
        sizes[part] += file.stat().st_size
    return sizes


def check_travel(meta: dict[str, Any], out: Path, leave_out: list[str]) -> dict[str, Any]:
    """What travels with the pack; a KitError past :data:`TRAVEL_LIMIT`, naming what to leave
    out (largest first)."""
    tree = travelling_bytes(leave_out)
    if tree is None:
        return {}
    if out.exists() and out.resolve().is_relative_to(REPO):  # a pack not ignored by git: once
        listed = travelling_bytes([*leave_out, out.resolve().relative_to(REPO).as_posix()])
        tree["rest"] = listed["rest"]
    total = tree["weights"] + tree["rest"] + meta["bytes"]
    report = {"travels": _mb(total), "limit": _mb(TRAVEL_LIMIT),
              "tree": _mb(tree["rest"] + tree["weights"]), "left_out": _mb(tree["left out"])}  # fmt: skip
    if total <= TRAVEL_LIMIT:
        return report
    m = meta["members"]
    options = []
    if tree["weights"]:
        options.append((tree["weights"], "src/unclip/weights (--leave-out src/unclip/weights, "
                        "and move it out of the checkout for the call: the pack carries the "
                        "CLIP text side)"))  # fmt: skip
    for name, n in m.items():
        if name.startswith("init/") and name.endswith(".safetensors"):
            options.append((n, f"--init {name.split('/')[1]}"))
    if len(meta["stages"]) > 1:
        big = m[f"images-{meta['size']}.u8.xz"]
        options.append((big, f"the {meta['size']} px stage (--stages without it)"))
    per_image = sum(v for k, v in m.items() if k.startswith(("images", "img_emb")))
    over = total - TRAVEL_LIMIT
    fewer = max(1, meta["count"] - math.ceil(over / max(per_image / meta["count"], 1)))
    options.append((per_image, f"images (--max-images {fewer} or fewer)"))
    options.sort(key=lambda o: -o[0])
    raise KitError(
        f"the pack ({_mb(meta['bytes'])}) and the working tree ({report['tree']}) come to "
        f"{_mb(total)}, over the {_mb(TRAVEL_LIMIT)} that travel; leave out "
        + "; or ".join(f"{what}: {_mb(n)}" for n, what in options)
    )


def read_pack(path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(pack.json, the other members by name, still compressed)."""
    try:
        with tarfile.open(path) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        meta = json.loads(files.pop("pack.json"))
    except (OSError, tarfile.TarError, KeyError, ValueError) as e:
        raise KitError(f"{path}: not a whole pack ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise KitError(f"{path}: not a version-{VERSION} GPU kit pack "
                       f"({meta.get('format')!r} version {meta.get('version')!r})")  # fmt: skip
    if {k: len(v) for k, v in files.items()} != meta["members"]:
        raise KitError(f"{path}: its members are not those pack.json lists")
    return meta, files


def _array(blob: bytes, dtype: Any, shape: tuple[int, ...], where: str) -> np.ndarray:
    try:
        return np.frombuffer(lzma.decompress(blob), dtype).reshape(shape)
    except (lzma.LZMAError, ValueError) as e:
        raise KitError(f"{where}: damaged ({e})") from None


# --- unpack ---------------------------------------------------------------------------------


def unpack(path: Path, work: Path, device: str) -> dict[str, Any]:
    """Unpack into ``work``: ``data-S/`` (shards + manifest) per image size a stage reads
    (the largest, and each smaller one that did not derive exactly), ``embeddings/``,
    ``clip/`` (the text side, with the tokenizer inside; its image tower is left at random
    initialisation: nothing reads it) and ``init/STAGE/``. Returns the paths and pack.json."""
    meta, files = read_pack(path)
    n = meta["count"]
    records = [json.loads(x) for x in lzma.decompress(files["records.jsonl.xz"]).splitlines()]
    if len(records) != n:
        raise KitError(f"{path}: {len(records)} records for {n} images")
    data = {}
    for name in sorted(files):
        if name.startswith("images-"):
            s = int(name.split("-")[1].split(".")[0])
            pixels = _array(files[name], np.uint8, (n, s, s, 3), f"{path}: {name}")
            data[s] = write_images(work / f"data-{s}", records, pixels)
    paths: dict[str, Any] = {"meta": meta, "data": {}, "init": {}}
    for stage, s in meta["sizes"].items():
        paths["data"][stage] = data.get(s, data[meta["size"]])
    if "img_emb.f16.xz" in files:
        clip = write_clip(work / "clip", files)
        emb = _array(files["img_emb.f16.xz"], np.float16, (n, meta["dim"]), f"{path}: embeddings")
        paths["embeddings"] = write_embeddings(work / "embeddings", records, emb, clip, device)
        paths["clip"] = clip
    for stage in meta["init"]:
        folder = work / "init" / stage
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, blob in files.items():
            if name.startswith(f"init/{stage}/"):
                (folder / name.rsplit("/", 1)[1]).write_bytes(blob)
        paths["init"][stage] = folder
    return paths


def write_images(folder: Path, records: list[dict], pixels: np.ndarray) -> Path:
    """PNG shards of ``pixels`` ``[N, S, S, 3]`` uint8 with a manifest of ``records``."""
    from PIL import Image

    from unclip.data.shards import ShardWriter, write_manifest

    shutil.rmtree(folder, ignore_errors=True)
    rows = []
    with ShardWriter(folder, prefix="pack", max_count=5000) as writer:
        for record, image in zip(records, pixels, strict=True):
            png = io.BytesIO()
            Image.fromarray(image).save(png, format="PNG")
            writer.write(record["key"], {"png": png.getvalue(), "txt": record["caption"].encode()})
            rows.append({**record, "shard": writer.paths[-1].name})
    write_manifest(folder / "manifest.jsonl", rows)
    return folder


def load_text_side(files: dict[str, bytes]) -> dict[str, Any]:
    """The pack's CLIP text-side tensors by name."""
    from safetensors.torch import load

    return load(lzma.decompress(files["clip/text.safetensors.xz"]))


def write_clip(folder: Path, files: dict[str, bytes]) -> Path:
    """A CLIP model folder from the pack's text side (the image tower seeded, unused)."""
    import torch

    from unclip.clip.model import CLIP, CLIPConfig
    from unclip.hub import save_pretrained

    shutil.rmtree(folder, ignore_errors=True)
    config = json.loads(files["clip/config.json"])
    torch.manual_seed(0)
    model = CLIP(CLIPConfig.from_dict(config["config"]))
    text = load_text_side(files)
    dtype = next(iter(text.values())).dtype
    missing = set(model.state_dict()) - set(text)
    if any(not k.startswith(TEXT_SIDE_SKIP) for k in missing):
        raise KitError(f"the pack's CLIP text side lacks {sorted(missing)[0]}")
    model.load_state_dict(text, strict=False)
    save_pretrained(model, folder, dtype=dtype)
    for name, blob in files.items():
        if name.startswith("clip/tokenizer/"):
            (folder / "tokenizer").mkdir(exist_ok=True)
            (folder / "tokenizer" / name.rsplit("/", 1)[1]).write_bytes(blob)
    return folder


def write_embeddings(folder: Path, records: list[dict], emb: np.ndarray, clip: Path,
                     device: str) -> Path:  # fmt: skip
    """An ``unclip embed`` folder: the packed image rows, text rows from ``clip``."""
    from unclip.data.embeddings import write_info, write_shard
    from unclip.train.stages.common import FrozenTextEncoder

    shutil.rmtree(folder, ignore_errors=True)
    text = FrozenTextEncoder(
        clip, device=device
    )  # its z_t is CLIP's text embedding, as embed writes
    captions = [r["caption"] for r in records]
    batches = (text(captions[i : i + 512])[0] for i in range(0, len(captions), 512))
    text_emb = np.concatenate([z_t.cpu().numpy() for z_t in batches])
    shard_size = 10_000
    shards = (len(records) + shard_size - 1) // shard_size
    for i in range(shards):
        lo, hi = i * shard_size, min(len(records), (i + 1) * shard_size)
        rows = [{"key": r["key"], "caption": r["caption"]} for r in records[lo:hi]]
        write_shard(folder, i, emb[lo:hi], text_emb[lo:hi], rows)
    write_info(folder, len(records), shards, emb.shape[1], {"pack": "gpu kit"})
    return folder


# --- measure --------------------------------------------------------------------------------


def time_steps(stage: str, config: Path, device: str, steps: int) -> dict[str, float]:
    """Seconds of the first training step (where ``torch.compile`` compiles) and the mean of
    the next ``steps``, taken as ``unclip bench train`` takes them, on the config's data."""
    import torch

    from unclip.commands.bench_train import Clock, build_stage, train_step
    from unclip.train.checkpoint import seed_everything
    from unclip.train.loop import Trainer

    dev = torch.device(device)
    with tempfile.TemporaryDirectory(prefix="unclip-kit-") as tmp:
        seed_everything(0)
        s = build_stage(stage, config, Path(tmp), True)
        trainer = Trainer(s["model"], s["loss"], s["data"], s["cfg"].train, Path(tmp) / "run",
                          device=dev, progress=False, collate_fn=s.get("collate"))  # fmt: skip
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        batches, quiet = iter(trainer.batches), Clock(dev, enabled=False)
        trainer.model.train()
        timer = Clock(dev)
        timer.start()
        train_step(trainer, batches, quiet, params)
        timer.stop()
        first, timer.wall = timer.wall, 0.0
        timer.start()
        for _ in range(steps):
            train_step(trainer, batches, quiet, params)
        timer.stop()
    return {"first_step_s": first, "step_s": timer.wall / steps}


def compile_trial(stage: str, config: Path, device: str, timeout: float) -> dict[str, Any]:
    """:func:`time_steps` of a compiled model in a subprocess killed after ``timeout`` s."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "time", stage, "--config",
           str(config), "--device", device, "--steps", "3"]  # fmt: skip
    began = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=_environment(), start_new_session=True, text=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the trial and its compile workers
        proc.communicate()
        return {"finished": False, "seconds": time.monotonic() - began,
                "why": f"not done within the {timeout:.0f} s the measuring phase had left"}  # fmt: skip
    if proc.returncode:
        tail = output.strip().splitlines()[-1:] or ["no output"]
        return {"finished": False, "why": f"exit {proc.returncode}: {tail[0]}"}
    return {"finished": True, **json.loads(output.strip().splitlines()[-1])}


def measure(stage: str, config: Path, device: str, deadline: float, share_s: float,
            tries: tuple[str, ...], peaks: dict[str, float | None]) -> dict[str, Any]:  # fmt: skip
    """Profile ``stage`` by parts, then time the layouts (and a compiled model) while
    ``deadline`` allows; choose the options that train the most steps in ``share_s``
    seconds. Returns the profile, the trials and ``choice`` (the train options)."""
    from unclip.commands.bench_train import profile

    prof = profile(stage, config, device=device, steps=2, warmup=1, real_data=True,
                   peaks_gflops=peaks)  # fmt: skip
    peaks["bf16" if "bf16" in prof["precision"] else "fp32"] = prof["peak_gflops"]
    base = json.loads(config.read_text())
    trials: list[dict[str, Any]] = []

    def variant(**options: Any) -> Path:
        cfg = json.loads(json.dumps(base))
        cfg["train"].update(options)
        path = config.with_name(f"{config.stem}-try-{len(trials)}.json")
        path.write_text(json.dumps(cfg, indent=2))
        return path

    layouts = [True, False] if "layout" in tries else [None]
    for layout in layouts:
        if time.monotonic() > deadline and trials:
            trials.append({"channels_last": layout, "why": "measuring time used up"})
            continue
        options = {} if layout is None else {"channels_last": layout}
        trials.append({**options, "compile": False,
                       **time_steps(stage, variant(**options), device, 3)})  # fmt: skip
    timed = [t for t in trials if "step_s" in t]
    best = min(timed, key=lambda t: t["step_s"])
    choice = {k: best[k] for k in ("channels_last", "compile") if k in best}
    if "compile" in tries:
        left = deadline - time.monotonic()
        options = {**choice, "compile": True}
        trial = compile_trial(stage, variant(**options), device, left)
        trials.append({**options, **trial})
        if trial["finished"]:  # it pays when compiling and its steps fit more steps in share_s
            eager = share_s / best["step_s"]
            compiled = (share_s - trial["first_step_s"]) / trial["step_s"]
            if compiled > eager:
                choice, best = options, {**trial, "compile": True}
    batch = prof["batch"]
    rate = batch / best["step_s"]
    promise = PROMISE_MFU * prof["peak_gflops"] / prof["gflops_per_sample"]
    return {"profile": prof, "trials": trials, "choice": choice,
            "steps_per_s": 1 / best["step_s"], "compile_s": best.get("first_step_s", 0.0)
            if choice.get("compile") else 0.0, "samples_per_s": rate,
            "promised_samples_per_s": promise, "mfu": rate * prof["gflops_per_sample"]
            / prof["peak_gflops"]}  # fmt: skip


def verdict(measured: dict[str, dict[str, Any]]) -> str:
    """One line: each stage's measured samples/s against what the FLOPs promise at
    :data:`PROMISE_MFU` of the device's measured peak."""
    parts, far = [], False
    for stage, m in measured.items():
        if "error" in m:
            parts.append(f"{stage} not measured ({m['error']})")
            continue
        ratio = m["samples_per_s"] / m["promised_samples_per_s"]
        far |= ratio < FAR_BELOW
        parts.append(
            f"{stage} {m['samples_per_s']:,.0f} samples/s (MFU {100 * m['mfu']:.1f}%) vs "
            f"{m['promised_samples_per_s']:,.0f} at {100 * PROMISE_MFU:.0f}% of "
            f"{m['profile']['peak_gflops'] / 1e3:,.1f} TFLOP/s"
        )
    head = "FAR BELOW what the FLOPs promise (see measure in kit.json, train.log)" if far else (
        "within reach of what the FLOPs promise")  # fmt: skip
    return f"{head}: " + "; ".join(parts)


def need_seconds(config: dict[str, Any], measured: dict[str, Any], startup: float) -> float:
    """Seconds a stage needs for its config's ``train.steps`` at its measured rate (unmeasured:
    all it can get)."""
    rate = measured["steps_per_s"]
    if not rate:
        return math.inf
    return config["train"]["steps"] / (RATE_MARGIN * rate) + startup + measured["compile_s"]


def split_seconds(seconds: float, needs: list[float], shares: list[float]) -> list[float]:
    """Share ``seconds`` by ``shares``; a stage that needs less (its config's steps at its
    measured rate) keeps only what it needs and the others share the rest."""
    alloc = [0.0] * len(needs)
    active = set(range(len(needs)))
    left = seconds
    while active:
        total = sum(shares[i] for i in active) or 1.0
        done = {i for i in active if needs[i] <= left * shares[i] / total}
        if not done:
            for i in active:
                alloc[i] = left * shares[i] / total
            break
        for i in done:
            alloc[i] = needs[i]
            left -= needs[i]
        active -= done
    return alloc


# --- train ----------------------------------------------------------------------------------


def _log(log: Path, text: str) -> None:
    with open(log, "a", encoding="utf-8") as f:
        f.write(text.rstrip("\n") + "\n")


def _unclip(args: list[str], log: Path) -> float:
    """Run ``python -m unclip ARGS`` with its output appended to ``log``; its wall time."""
    start = time.monotonic()
    _log(log, f"$ unclip {' '.join(args)}")
    with open(log, "a", encoding="utf-8") as f:
        rc = subprocess.call([sys.executable, "-m", "unclip", *args], stdout=f,
                             stderr=subprocess.STDOUT, env=_environment())  # fmt: skip
    if rc:
        raise KitError(f"unclip {args[0]} {args[1]} exited with {rc}; see {log.name}")
    return time.monotonic() - start


def parse_split(text: str, n: int) -> list[float]:
    """``--split``: time shares, one per stage ("0.7,0.3"); one number is the first stage's
    share of two."""
    try:
        shares = [float(x) for x in text.split(",")]
    except ValueError:
        raise KitError(f"--split {text!r}: numbers separated by commas") from None
    if len(shares) == 1 and n == 2:
        shares.append(1 - shares[0])
    if len(shares) != n or any(s < 0 for s in shares) or sum(shares) <= 0:
        raise KitError(f"--split {text!r}: {n} shares of at least 0, one per stage")
    return shares[:n]


def returned_bytes(configs: dict[str, dict]) -> int:
    """What the stages' float16 weights come to (2 bytes a parameter, plus the side files)."""
    from unclip.decoder.unet import UNet
    from unclip.decoder.upsampler import Upsampler

    total = 0
    for stage, cfg in configs.items():
        model_cls = {"decoder": UNet, "upsampler": Upsampler}[stage]
        model = model_cls(run_config_class(stage).from_dict(cfg).model)
        total += 2 * sum(p.numel() for p in model.parameters()) + 2**20
    return total


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Unpack, measure, train every stage of the pack and export, all inside
    ``args.minutes``: each stage takes the steps that fit its share (at most its config's)."""
    import torch

    deadline = time.monotonic() + args.minutes * 60
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    log = out / LOG_NAME
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    began = time.monotonic()
    paths = unpack(Path(args.pack), work, device)
    meta = paths["meta"]
    stages = args.stages.split(",") if args.stages else meta["stages"]
    configs = {s: meta["configs"][s] for s in stages if s in meta["configs"]}
    for item in args.config or []:
        stage, _, file = item.partition("=")
        configs[stage] = json.loads(Path(file).read_text())
    if set(configs) != set(stages) or not set(stages) <= set(meta["sizes"]):
        raise KitError(f"--stages {','.join(stages)}: the pack holds {','.join(meta['stages'])}")
    parts = math.ceil(returned_bytes(configs) / PART_BYTES)
    if parts + 2 > MAX_FILES:
        raise KitError(f"the weights of {','.join(stages)} need {parts} parts of 15 MiB; "
                       f"{MAX_FILES - 2} come back beside kit.json and train.log")  # fmt: skip
    shares = parse_split(args.split, len(stages))
    seconds: dict[str, float] = {"unpack": time.monotonic() - began}
    run_configs = {}
    for stage, cfg in configs.items():
        cfg["data"]["path"] = str(paths["data"][stage])
        if stage == "decoder":
            cfg["data"]["embeddings"] = str(paths["embeddings"])
            cfg["clip"] = str(paths["clip"])
        cfg.pop("init", None)
        if stage in paths["init"]:
            cfg["init"] = str(paths["init"][stage])
        run_configs[stage] = work / f"{stage}.json"
        run_configs[stage].write_text(json.dumps(cfg, indent=2))

    began = time.monotonic()
    measure_end = began + min(args.measure_seconds, max(0.0, deadline - began - args.reserve))
    tries = tuple(t for t in args.tries.split(",") if t)
    peaks: dict[str, float | None] = {}
    measured, train_s = {}, max(0.0, deadline - measure_end - args.reserve)
    from unclip.commands.bench_train import format_markdown

    for i, stage in enumerate(stages):
        stage_end = time.monotonic() + (measure_end - time.monotonic()) / (len(stages) - i)
        share = train_s * shares[i] / sum(shares)
        try:
            m = measure(stage, run_configs[stage], device, stage_end, share, tries, peaks)
        except Exception as e:  # one visit: train unmeasured rather than not at all
            m = {"error": f"{type(e).__name__}: {e}", "choice": {}, "steps_per_s": None,
                 "compile_s": 0.0}  # fmt: skip
            _log(log, f"{stage}: measuring failed ({m['error']}); it trains for its share")
            measured[stage] = m
            continue
        measured[stage] = m
        _log(log, format_markdown(m["profile"]) + "\n")
        _log(log, f"{stage}: tried {json.dumps(m['trials'])}\n{stage}: chose "
             f"{json.dumps(m['choice'])}, {m['steps_per_s']:.3g} steps/s\n")  # fmt: skip
    seconds["measure"] = time.monotonic() - began
    head = verdict(measured)
    _log(log, head)

    summary: dict[str, Any] = {"verdict": head, "stages": {}}
    startup = STARTUP_SECONDS
    for i, stage in enumerate(stages):
        m, cfg = measured[stage], configs[stage]
        cfg["train"].update(m["choice"])
        rate = m["steps_per_s"]
        rest = list(range(i, len(stages)))
        left = deadline - time.monotonic() - args.reserve
        needs = [need_seconds(configs[stages[j]], measured[stages[j]], startup) for j in rest]
        allots = split_seconds(left, needs, [shares[j] for j in rest])
        allot = allots[0]
        # the run's own clock starts after its start-up; it may use what the others do not need
        limit = max(1.0, left - sum(allots[1:]) - startup)
        free = allot - startup - m["compile_s"]
        fit = int(RATE_MARGIN * rate * free + 1e-6) if rate else 0  # unmeasured: --max-minutes
        steps = min(fit, cfg["train"]["steps"]) if rate or free <= 0 else cfg["train"]["steps"]
        record: dict[str, Any] = {"planned_steps": steps, "seconds": allot,
                                  "options": m["choice"], "steps_per_s": rate}  # fmt: skip
        summary["stages"][stage] = record
        if steps < args.min_steps:
            record["error"] = (f"{rate or 0:.2f} steps/s leaves {steps} steps in the {allot:.0f} s "
                               f"of its share; at least {args.min_steps} are needed")  # fmt: skip
            continue
        cfg["train"]["steps"] = steps
        run_configs[stage].write_text(json.dumps(cfg, indent=2))
        run = work / f"run-{stage}"
        shutil.rmtree(run, ignore_errors=True)
        began = time.monotonic()
        try:
            wall = _unclip(["train", stage, "--config", str(run_configs[stage]), "--device",
                            device, "--no-progress", "--run-dir", str(run), "--max-minutes",
                            f"{limit / 60:.3f}"], log)  # fmt: skip
            if rate:  # the next stage's start-up: what the run took beyond its steps
                startup = max(1.0, wall - steps / rate - m["compile_s"])
        except KitError as e:  # bring back what the run saved before it broke
            record["error"] = str(e)
        seconds[stage] = time.monotonic() - began
    name = torch.cuda.get_device_name() if device.startswith("cuda") else device
    began = time.monotonic()
    runs = {s: work / f"run-{s}" for s in stages if (work / f"run-{s}").exists()}
    exported = export(runs, out) if runs else {"stages": {}}
    for stage, info in exported.pop("stages").items():
        summary["stages"][stage].update(info)
    seconds["export"] = time.monotonic() - began
    summary.update(exported, device=name, seconds=seconds, measure=measured)
    errors = [f"{s}: {r['error']}" for s, r in summary["stages"].items() if "error" in r]
    if errors:
        summary["error"] = "; ".join(errors)
    (out / KIT_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def export(runs: dict[str, Path], out: Path) -> dict[str, Any]:
    """Write each run's sampling weights (``final/``, else its newest checkpoint) in float16,
    with its configs and metrics, as one tar of ``STAGE/`` folders in parts of at most
    15 MiB; returns what kit.json says about them."""
    import torch

    from unclip.hub import from_pretrained, save_pretrained
    from unclip.train.checkpoint import latest_checkpoint

    buffer = io.BytesIO()
    stages = {}
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for stage, run in runs.items():
            final = run / "final"
            source = final if (final / "config.json").exists() else latest_checkpoint(run)
            if source is None:
                continue
            model = from_pretrained(source)  # the EMA weights when there are some
            with tempfile.TemporaryDirectory(prefix="unclip-kit-") as tmp:
                folder = Path(tmp) / stage
                save_pretrained(model, folder, dtype=torch.float16)
                for file in (source / "diffusion.json", run / "run_config.json",
                             run / "metrics.jsonl"):  # fmt: skip
                    if file.exists():
                        shutil.copy(file, folder / file.name)
                for file in sorted(folder.iterdir()):
                    tar.add(file, arcname=f"{stage}/{file.name}")
            step = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
            stages[stage] = {"source": source.name, "step": step}
    if not stages:
        raise KitError(f"no run of {', '.join(runs)} left a final/ or a checkpoint to export")
    blob = buffer.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{TAR_NAME}.part-*"):
        old.unlink()
    parts = []
    for i in range(0, len(blob), PART_BYTES):
        name = f"{TAR_NAME}.part-{i // PART_BYTES}"
        (out / name).write_bytes(blob[i : i + PART_BYTES])
        parts.append(name)
    return {"stages": stages, "parts": parts, "bytes": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest()}  # fmt: skip


# --- join -----------------------------------------------------------------------------------


def join(folder: Path, out: Path, overwrite: bool = False) -> dict[str, Path]:
    """Reassemble ``folder``'s parts (checked against kit.json) into ``out/STAGE`` model
    folders, one per stage that came back."""
    try:
        kit = json.loads((folder / KIT_NAME).read_text())
        blob = b"".join((folder / name).read_bytes() for name in kit["parts"])
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise KitError(f"{folder}: no whole kit ({e})") from None
    if len(blob) != kit["bytes"] or hashlib.sha256(blob).hexdigest() != kit["sha256"]:
        raise KitError(f"{folder}: the parts do not add up to the file kit.json describes")
    files: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 2 or parts[0] not in STAGES:
                raise KitError(f"{folder}: unexpected entry {member.name!r} in the parts")
            files.setdefault(parts[0], {})[parts[1]] = tar.extractfile(member).read()
    for stage in files:
        if (out / stage).exists() and not overwrite:
            raise KitError(f"{out / stage} exists; pass --overwrite to replace it")
    joined = {}
    for stage, contents in files.items():
        tmp = out / f".tmp-{stage}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, data in contents.items():
            (tmp / name).write_bytes(data)
        shutil.rmtree(out / stage, ignore_errors=True)
        os.replace(tmp, out / stage)
        joined[stage] = out / stage
    return joined


# --- command line ---------------------------------------------------------------------------


def _pairs(items: list[str] | None, flag: str) -> dict[str, Path]:
    pairs = {}
    for item in items or []:
        stage, sep, value = item.partition("=")
        if not sep or stage not in STAGES:
            raise KitError(f"{flag} {item!r}: STAGE=PATH with STAGE one of {', '.join(STAGES)}")
        pairs[stage] = Path(value)
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("pack", help="pack what the stages train on (here)")
    p.add_argument("--stages", default=",".join(STAGES), help="default: decoder,upsampler")
    p.add_argument("--config", action="append", metavar="STAGE=FILE",
                   help="a stage's run config (default: " + ", ".join(
                       f"{k}={v}" for k, v in DEFAULT_CONFIGS.items()) + ")")  # fmt: skip
    p.add_argument("--data", help="data set with a manifest.jsonl (default: the configs')")
    p.add_argument("--split", help="default: the configs' data.split")
    p.add_argument("--embeddings", help="`unclip embed` folder of the split (default: the "
                   "decoder config's data.embeddings)")  # fmt: skip
    p.add_argument("--clip", default=str(REPO / DEFAULT_CLIP),
                   help="CLIP model folder whose text side the decoder trains with")  # fmt: skip
    p.add_argument("--init", action="append", metavar="STAGE=FOLDER",
                   help="a model folder (one `join` wrote) the stage continues from")  # fmt: skip
    p.add_argument("--leave-out", action="append", default=[], metavar="PATH",
                   help="checkout paths that will not travel (moved out for the call)")  # fmt: skip
    p.add_argument("--max-images", type=int, help="pack only the first N images")
    p.add_argument("--out", required=True, help="the pack file to write")

    for verb in ("unpack", "train"):
        p = sub.add_parser(verb, help="unpack only" if verb == "unpack" else
                           "unpack, measure, train and export (on the GPU machine)")  # fmt: skip
        p.add_argument("--pack", required=True)
        p.add_argument("--work", required=True, help="folder for the data, embeddings and runs")
        p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", required=True, help="folder for kit.json, the parts and train.log")
    p.add_argument("--stages", help="the stages to train (default: the pack's)")
    p.add_argument("--config", action="append", metavar="STAGE=FILE",
                   help="a run config in place of the packed one")  # fmt: skip
    p.add_argument("--minutes", type=float, default=8.5, help="wall time for everything")
    p.add_argument("--split", default="0.7",
                   help="time shares of the stages (default 0.7: the first stage 70%%); a "
                   "stage that needs less gives the rest to the others")  # fmt: skip
    p.add_argument("--measure-seconds", type=float, default=MEASURE_SECONDS,
                   help=f"the measuring phase (default {MEASURE_SECONDS:.0f})")  # fmt: skip
    p.add_argument("--try", dest="tries", default=",".join(TRIES),
                   help="options to measure: layout (channels-last or not), compile")  # fmt: skip
    p.add_argument("--reserve", type=float, default=30.0,
                   help="seconds kept for the export at the end (default 30)")  # fmt: skip
    p.add_argument("--min-steps", type=int, default=50)

    p = sub.add_parser("join", help="reassemble the returned parts into model folders (here)")
    p.add_argument("folder", help="the folder holding kit.json and the parts")
    p.add_argument("--out", required=True, help="folder for one model folder per stage")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("time", help="time a stage's first and next steps (measuring phase)")
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--config", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3)
    return parser


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO / "src"))
    args = build_parser().parse_args(argv)
    try:
        if args.verb == "pack":
            stages = args.stages.split(",")
            configs = {s: REPO / DEFAULT_CONFIGS[s] for s in stages if s in DEFAULT_CONFIGS}
            configs.update(_pairs(args.config, "--config"))
            for s in stages:
                run_config_class(s)
            result: Any = pack(stages, configs, Path(args.out), data=args.data,
                               split=args.split, embeddings=args.embeddings, clip=args.clip,
                               init=_pairs(args.init, "--init"), leave_out=args.leave_out,
                               max_images=args.max_images)  # fmt: skip
        elif args.verb == "unpack":
            paths = unpack(Path(args.pack), Path(args.work), args.device or "cpu")
            paths.pop("meta")
            result = json.loads(json.dumps(paths, default=str))
        elif args.verb == "train":
            result = train(args)
            if result.get("error"):
                print(f"kit train: error: {result['error']}", file=sys.stderr)
                return 1
        elif args.verb == "time":
            result = time_steps(args.stage, Path(args.config), args.device, args.steps)
            print(json.dumps(result))
            return 0
        else:
            joined = join(Path(args.folder), Path(args.out), args.overwrite)
            result = {k: str(v) for k, v in joined.items()}
    except (KitError, ValueError, OSError) as e:  # bad input, said in one line (as unclip does)
        print(f"kit {args.verb}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
