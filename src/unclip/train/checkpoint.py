"""Training checkpoints: whole or absent, never pickled.

A run folder holds ``checkpoints/step-N/`` folders and a ``checkpoints/latest`` file naming
the newest whole one. Each checkpoint folder is also a model folder (``config.json`` +
``model.safetensors`` + ``ema.safetensors``) and adds ``optimizer.safetensors`` and
``trainer_state.json`` (step, data position, RNG states, EMA count, train config).

A checkpoint is written into ``checkpoints/.tmp-step-N-<pid>/``, with ``trainer_state.json``
last, and renamed into place; ``latest`` is then replaced atomically. A process killed at any
point leaves either the previous checkpoint or the new one, never a half-written folder that
``--resume`` would pick up (temporary folders are ignored and cleaned at the next start).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unclip.config import write_text_atomic
from unclip.hub import CONFIG_NAME, HubError, load_state_dict, save_state_dict

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or written; the message names the folder."""


# --- nested state <-> (JSON, tensors) --------------------------------------------------------


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Turn nested dicts/lists/tuples of tensors, arrays and scalars into JSON + a tensor table.

    Tensors go into ``tensors`` under generated keys; the returned JSON refers to them. Dict
    keys keep their type (optimizer state uses int keys), so ``unflatten_state`` is exact.
    """
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "ui" else obj)
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [flatten_state(k, tensors), flatten_state(v, tensors)] for k, v in obj.items()
            ]
        }
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [flatten_state(v, tensors) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
        if "__dict__" in obj:
            return {
                unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in obj["__dict__"]
            }
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        raise CheckpointError(f"unknown stored object {sorted(obj)}")
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


# --- RNG -------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every random number generator a training step may draw from."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's ``random`` for a fresh run."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- folders ---------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A whole checkpoint as read back from disk."""

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    state: dict[str, Any]  # trainer_state.json with RNG and data position restored


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def is_complete(folder: Path) -> bool:
    return _STEP_RE.match(folder.name) is not None and (folder / STATE_NAME).is_file()


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Whole checkpoint folders, oldest first (temporary and incomplete folders are skipped)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The folder named by ``latest`` if it is whole, else the newest whole folder, else None."""
    root = checkpoint_dir(run_dir)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8").strip()
        if named.is_dir() and is_complete(named):
            return named
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def clean_partial(run_dir: str | os.PathLike) -> list[Path]:
    """Remove temporary folders left by a process killed while writing; returns them."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return stale


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor] | None,
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    model_config: dict[str, Any] | None,
    keep: int,
) -> Path:
    """Write a whole checkpoint for ``step`` atomically and point ``latest`` at it."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        if model_config is not None:
            write_text_atomic(tmp / CONFIG_NAME, json.dumps(model_config, indent=2) + "\n")
        save_state_dict(model_state, tmp / "model.safetensors")
        if ema_state is not None:
            save_state_dict(ema_state, tmp / "ema.safetensors")
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_json = flatten_state(optimizer_state, opt_tensors)
        save_state_dict(opt_tensors, tmp / OPTIMIZER_NAME)
        state_tensors: dict[str, torch.Tensor] = {}
        state = dict(trainer_state, step=step, optimizer=opt_json)
        state["rng"] = flatten_state(state.pop("rng"), state_tensors)
        if "rank_rng" in state:  # the other ranks' generators (multi-process runs)
            state["rank_rng"] = flatten_state(state.pop("rank_rng"), state_tensors)
        save_state_dict(state_tensors, tmp / "rng.safetensors")
        # last: marks the folder whole
        write_text_atomic(tmp / STATE_NAME, json.dumps(state) + "\n")
        _fsync_dir(tmp)
        if final.exists():  # re-writing a step (a resumed run reaching it again)
            trash = root / f".tmp-old-{final.name}-{os.getpid()}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
    except OSError:  # a full disk, say: free what was written, keep the older checkpoints
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / LATEST, final.name + "\n")
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    folder = Path(folder)
    if not is_complete(folder):
        raise CheckpointError(f"{folder}: not a whole checkpoint (no {STATE_NAME})")
    try:
        state = json.loads((folder / STATE_NAME).read_text(encoding="utf-8"))
        opt_tensors = load_state_dict(folder / OPTIMIZER_NAME)
        rng_tensors = load_state_dict(folder / "rng.safetensors")
        model = load_state_dict(folder / "model.safetensors")
        ema = (
            load_state_dict(folder / "ema.safetensors")
            if (folder / "ema.safetensors").exists()
            else None
        )
    except (OSError, json.JSONDecodeError, HubError) as e:
        raise CheckpointError(f"{folder}: cannot read checkpoint ({e})") from None
    optimizer = unflatten_state(state.pop("optimizer"), opt_tensors)
    state["rng"] = unflatten_state(state["rng"], rng_tensors)
    if "rank_rng" in state:
        state["rank_rng"] = unflatten_state(state["rank_rng"], rng_tensors)
    return Checkpoint(folder, int(state["step"]), model, ema, optimizer, state)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
