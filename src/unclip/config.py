"""Configuration dataclasses for every model, diffusion process and training run.

Every config is a frozen-free ``@dataclass`` that inherits :class:`Config`, which gives a
strict JSON round-trip: ``Config.from_dict`` rejects unknown keys and wrong types with a
message that names the field (``"train.lr: expected float, got 'abc'"``), so a typo in a
config file never passes silently.

This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

C = TypeVar("C", bound="Config")

#: the file that makes a folder a pipeline folder (its document: ``unclip.pipeline.config``)
PIPELINE_FILE = "pipeline.json"


class ConfigError(ValueError):
    """A config file or dict does not match its dataclass (unknown key, wrong type, bad value)."""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` (parsed from JSON) against the annotation ``tp``; return the typed value."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: expected one of {_type_name(tp)}, got {value!r}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object for {tp.__name__}, got {value!r}")
        return tp.from_dict(value, where=where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = [
                _convert(v, a, f"{where}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            ]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {value!r}")
        _, vt = get_args(tp) or (str, Any)
        return {str(k): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")  # a bug in a config class


def _jsonable(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


@dataclasses.dataclass
class Config:
    """Base class: strict dict/JSON round-trip for dataclass configs.

    Subclasses that describe a model set ``type_name`` (the ``"type"`` in a model folder's
    ``config.json``); the hub uses it to rebuild the right class with no extra flags.
    """

    type_name: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], *, where: str = "") -> C:
        """Build from a dict, rejecting unknown keys and wrong types (``where`` prefixes errors)."""
        name = where or cls.__name__
        if not isinstance(data, dict):
            raise ConfigError(f"{name}: expected an object, got {data!r}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = [k for k in data if k not in fields]
        if unknown:
            known = ", ".join(sorted(fields))
            raise ConfigError(
                f"{name}: unknown key {unknown[0]!r}"
                + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                + f"; known keys: {known}"
            )
        kwargs = {k: _convert(v, hints[k], f"{name}.{k}") for k, v in data.items()}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:  # __post_init__ checks
            raise ConfigError(f"{name}: {e}") from None

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_json(cls: type[C], text: str, *, where: str = "") -> C:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where or cls.__name__}: not valid JSON ({e})") from None
        return cls.from_dict(data, where=where)

    def save(self, path: str | os.PathLike) -> None:
        write_text_atomic(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls: type[C], path: str | os.PathLike) -> C:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
        return cls.from_json(text, where=str(path))

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace`` (never half-written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path, error: type[ValueError] = ConfigError) -> Any:
    """The JSON document in ``path``; a file that cannot be read or parsed raises ``error``
    with a one-line message naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not a readable JSON file ({e})") from None


@contextlib.contextmanager
def building_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``out`` to write a folder into: renamed over ``out`` when the
    block ends without an error (an old ``out`` removed only then), removed otherwise. ``out``
    must not exist unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite=True / --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Diffusion


#: the file a diffusion stage's model folder keeps its DiffusionConfig in
DIFFUSION_FILE = "diffusion.json"


@dataclasses.dataclass
class DiffusionConfig(Config):
    """A Gaussian diffusion process (Ho et al. 2020; Nichol & Dhariwal 2021).

    ``prediction`` is what the network outputs: ``eps`` (noise), ``x0`` (the clean sample, as
    the DALL·E 2 prior does) or ``v`` (Salimans & Ho 2022). ``learn_sigma`` doubles the output
    channels for the learned-range variance of Improved DDPM, trained with the ``hybrid`` loss.
    ``clip_denoised`` clips predicted x₀ to [-clip_range, clip_range] (default [-1, 1]) when
    sampling; ``dynamic_threshold`` > 0 (a percentile such as 0.995) uses Imagen's dynamic
    thresholding instead; 0 turns it off.
    """

    schedule: Literal["linear", "cosine"] = "cosine"
    timesteps: int = 1000
    prediction: Literal["eps", "x0", "v"] = "eps"
    learn_sigma: bool = False
    loss: Literal["mse", "hybrid"] = "mse"
    vlb_weight: float = 0.001
    clip_denoised: bool = True
    dynamic_threshold: float = 0.0
    clip_range: float = 1.0

    def __post_init__(self) -> None:
        if not self.clip_range > 0:
            raise ConfigError(f"clip_range must be positive, got {self.clip_range}")
        if not 0.0 <= self.dynamic_threshold < 1.0:
            raise ConfigError(f"dynamic_threshold must be in [0, 1), got {self.dynamic_threshold}")
        if self.timesteps < 1:
            raise ConfigError(f"timesteps must be at least 1, got {self.timesteps}")
        if self.loss == "hybrid" and not self.learn_sigma:
            raise ConfigError("loss 'hybrid' needs learn_sigma=true (it trains the variance)")


# ---------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass
class TrainConfig(Config):
    """One training run of any stage (CLIP, prior, decoder, upsampler).

    ``batch_size`` is the global batch of one optimizer step; it is split into
    ``grad_accum`` micro-batches (and, under torchrun, across ranks). ``compile``: run the
    model's forward and backward through ``torch.compile`` (minutes of compiling at the start,
    faster steps after; not with FSDP). ``channels_last``: the memory format of the model's 4-d
    weights and activations; None picks by device and model
    (:func:`unclip.train.loop.channels_last_pays`), true/false force it. ``bf16``: train
    under bf16 autocast where the device has native bf16 (:func:`unclip.precision.native_bf16`;
    elsewhere, where it would be emulated and far slower, in float32 with a warning).
    """

    steps: int = 1000
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    bf16: bool = True
    compile: bool = False
    channels_last: bool | None = None
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        checks = {
            "steps": self.steps >= 1,
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "lr": self.lr > 0,
            "warmup_steps": self.warmup_steps >= 0,
            "ema_decay": 0.0 <= self.ema_decay < 1.0,
            "min_lr_ratio": 0.0 <= self.min_lr_ratio <= 1.0,
            "checkpoint_every": self.checkpoint_every >= 1,
            "keep_checkpoints": self.keep_checkpoints >= 1,
            "log_every": self.log_every >= 1,
            "num_workers": self.num_workers >= 0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"{key}: invalid value {getattr(self, key)!r}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})"
            )


# ---------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class DataConfig(Config):
    """Where a training stage reads its samples.

    ``path``: a data set (shard folder, image folder, CSV/Parquet table; see
    ``unclip.data.datasets.open_dataset``); ``split``: a split named in the shard folder's
    ``manifest.jsonl`` (empty: all samples); ``image_size``: side in pixels the images are
    resized to; ``mode``: ``crop``/``pad`` (empty: the manifest's choice); ``tokenizer``: a
    tokenizer folder (stages that read captions); ``embeddings``: an ``unclip embed`` output
    folder (the prior and the decoder train from precomputed CLIP embeddings); ``balance``:
    manifest fields (e.g. ``["concept", "style"]``) whose joint value names a group, every
    group then drawn as often as any other (empty: every sample as often as any other; see
    ``unclip.data.balance``).
    """

    path: str = ""
    split: str = "train"
    image_size: int = 64
    mode: str = ""
    tokenizer: str = ""
    embeddings: str = ""
    balance: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ConfigError(f"image_size must be positive, got {self.image_size}")
        if self.mode not in ("", "crop", "pad"):
            raise ConfigError(f"mode must be 'crop', 'pad' or empty, got {self.mode!r}")
