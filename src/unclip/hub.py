"""Model folders: ``save_pretrained`` / ``from_pretrained``.

A model folder holds ``config.json`` (``{"type", "format_version", "config"}``) and
``model.safetensors`` (plus ``ema.safetensors`` where the model was trained with EMA). The
``type`` names the model class, so a folder rebuilds its model with no extra flags.

Weights are never unpickled. A ``.pt``/``.bin``/``.pth``/``.ckpt`` file is refused unless the
caller opts in with ``allow_legacy=True``, and even then it is read with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.

Model classes are looked up lazily by type name (``"module:Class"`` strings), so this module
imports no model package; a model class has a ``config_class`` attribute and is built as
``ModelClass(config)``.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from unclip.config import Config, ConfigError, write_text_atomic

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
M = TypeVar("M", bound=nn.Module)

# type name -> model class or "module:Class" (imported on first use).
# The package's own model types, resolved lazily so a folder loads without importing its
# package first; other types join with ``register_model_type``.
_MODEL_TYPES: dict[str, str | type[nn.Module]] = {
    "clip": "unclip.clip.model:CLIP",
    "diffusion_prior": "unclip.prior.model:DiffusionPriorTransformer",
    "ar_prior": "unclip.prior.ar:ARPrior",
    "decoder_unet": "unclip.decoder.unet:UNet",
    "upsampler_unet": "unclip.decoder.upsampler:Upsampler",
}


class HubError(ValueError):
    """A model folder or weights file cannot be used; the message names the file."""


class UnsafeWeightsError(HubError):
    """A weights file would need unpickling arbitrary objects; it is refused."""


def register_model_type(type_name: str, target: str | type[nn.Module]) -> None:
    """Make ``type_name`` (as written in ``config.json``) build ``target``."""
    _MODEL_TYPES[type_name] = target


def model_class(type_name: str) -> type[nn.Module]:
    try:
        target = _MODEL_TYPES[type_name]
    except KeyError:
        known = ", ".join(sorted(_MODEL_TYPES)) or "none"
        raise HubError(f"unknown model type {type_name!r} (known types: {known})") from None
    if isinstance(target, str):
        module_name, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module_name), attr)
        _MODEL_TYPES[type_name] = target
    return target


def _config_of(model: nn.Module) -> Config:
    config = getattr(model, "config", None)
    if not isinstance(config, Config) or not config.type_name:
        raise HubError(
            f"{type(model).__name__} has no .config with a type_name; "
            "only unclip models can be saved with save_pretrained"
        )
    return config


def config_document(config: Config) -> dict[str, Any]:
    """The JSON document written as a model folder's ``config.json``."""
    return {
        "type": config.type_name,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
    }


def _plain_state(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict:
    """Contiguous, unshared copies (safetensors refuses shared storage), floats cast to ``dtype``."""
    out = {}
    for k, v in state.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous().clone()
    return out


def save_state_dict(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors to a ``.safetensors`` file atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(_plain_state(state, dtype), str(tmp), metadata=metadata or {"format": "pt"})
    _sort_header_metadata(tmp)
    os.replace(tmp, path)


def _sort_header_metadata(path: Path) -> None:
    """Rewrite the header's ``__metadata__`` with its keys sorted, in place.

    safetensors keeps the metadata in a hash map whose order changes from run to run, so
    saving the same tensors twice gave files that differ byte for byte (a new blob in git for
    every unchanged stage of a re-assembled pipeline). Sorting reorders the same characters,
    so the header keeps its length and the data offsets stay valid; if the length ever differs
    the file is left as safetensors wrote it.
    """
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (n - len(text))  # safetensors pads its header with spaces
        if len(text) == n:
            f.seek(8)
            f.write(text)


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    ema: nn.Module | Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` (and optionally its EMA weights) as a model folder at ``path``.

    ``dtype`` (e.g. ``torch.float16``) casts floating-point weights on disk; loading casts
    them back to the model's own dtype. ``state``: the weights to write instead of
    ``model.state_dict()`` (e.g. gathered from the shards of an FSDP-trained model).
    """
    config = _config_of(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "type": config.type_name}
    weights = model.state_dict() if state is None else state
    save_state_dict(weights, path / WEIGHTS_NAME, dtype=dtype, metadata=meta)
    if ema is not None:
        ema_state = ema.state_dict() if isinstance(ema, nn.Module) else ema
        save_state_dict(ema_state, path / EMA_NAME, dtype=dtype, metadata=meta)
    elif (path / EMA_NAME).exists():
        (path / EMA_NAME).unlink()  # a stale EMA file must not outlive its model
    write_text_atomic(path / CONFIG_NAME, json.dumps(config_document(config), indent=2) + "\n")
    return path


def load_config(path: str | os.PathLike) -> Config:
    """Read a model folder's ``config.json`` (or the file itself) into its config dataclass."""
    path = Path(path)
    file = path / CONFIG_NAME if path.is_dir() else path
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HubError(f"{file}: no such file; a model folder needs {CONFIG_NAME}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HubError(f"{file}: not a readable JSON config ({e})") from None
    if not isinstance(doc, dict) or "type" not in doc or "config" not in doc:
        raise HubError(f"{file}: expected an object with 'type', 'format_version' and 'config'")
    version = doc.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise HubError(f"{file}: missing or invalid 'format_version' ({version!r})")
    if version > FORMAT_VERSION:
        raise HubError(
            f"{file}: format_version {version} was written by a newer unclip "
            f"(this one reads up to {FORMAT_VERSION}); upgrade unclip"
        )
    if not isinstance(doc["type"], str):
        raise HubError(f"{file}: 'type' must be a string, got {doc['type']!r}")
    try:
        cls = model_class(doc["type"])
    except HubError as e:
        raise HubError(f"{file}: {e}") from None
    try:
        return cls.config_class.from_dict(doc["config"], where=f"{file}: config")
    except ConfigError as e:
        raise HubError(str(e)) from None


def load_state_dict(
    path: str | os.PathLike, *, allow_legacy: bool = False
) -> dict[str, torch.Tensor]:
    """Read a weights file into a dict of tensors on the CPU, without ever unpickling objects.

    ``.safetensors`` files are read directly. Pickle-based files (``.pt``, ``.bin``, ...) are
    refused unless ``allow_legacy=True``, and then read with ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    if not path.is_file():
        raise HubError(f"{path}: no such weights file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        if not allow_legacy:
            raise UnsafeWeightsError(
                f"{path}: refusing a pickle-based weights file; unclip loads .safetensors only. "
                "If you trust it, pass allow_legacy=True (read with torch.load(weights_only=True)) "
                "and re-save it with save_pretrained."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnsafeWeightsError(
                f"{path}: refused: not a plain tensor file (weights_only load failed: {first})"
            ) from None
        if (
            isinstance(state, dict)
            and "state_dict" in state
            and isinstance(state["state_dict"], dict)
        ):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise HubError(f"{path}: expected a dict of tensors")
        return state
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise HubError(f"{path}: not a valid safetensors file ({e})") from None


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def _header_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors a ``.safetensors`` file declares, as meta tensors of the declared shapes and
    dtypes; only the header is read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            declared = [(k, f.get_slice(k)) for k in f.keys()]  # noqa: SIM118 (not a dict)
            entries = [(k, part.get_dtype(), part.get_shape()) for k, part in declared]
    except (SafetensorError, OSError, ValueError) as e:
        raise HubError(f"{path}: not a valid safetensors file ({e})") from None
    out = {}
    for key, dtype, shape in entries:
        if dtype not in _SAFETENSORS_DTYPES:
            raise HubError(f"{path}: tensor {key!r} has dtype {dtype}, which unclip does not read")
        out[key] = torch.empty(shape, dtype=_SAFETENSORS_DTYPES[dtype], device="meta")
    return out


def check_weights(
    own: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    source: str | os.PathLike,
    *,
    allow_missing: bool = False,
) -> None:
    """Raise :class:`HubError` (naming ``source``) unless ``state`` has exactly the tensors of
    ``own``, with the same shapes and float-ness. Either side may hold meta tensors. With
    ``allow_missing``, ``state`` may lack some of ``own``'s tensors (but nothing else)."""
    missing = [] if allow_missing else [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]!r}")
        raise HubError(f"{source}: weights do not match the config: " + "; ".join(parts))
    for k, v in own.items():
        if k not in state:
            continue
        w = state[k]
        if tuple(w.shape) != tuple(v.shape):
            raise HubError(
                f"{source}: tensor {k!r} has shape {tuple(w.shape)}, the config needs {tuple(v.shape)}"
            )
        if v.is_floating_point() != w.is_floating_point():
            raise HubError(f"{source}: tensor {k!r} has dtype {w.dtype}, the model needs {v.dtype}")


def load_weights_into(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str | os.PathLike,
    *,
    grow: bool = False,
) -> list[str]:
    """Copy ``state`` into ``model`` after checking names and shapes; errors name ``source``.

    With ``grow``, ``model`` may have tensors that ``state`` lacks (layers added to a trained
    model, e.g. a deeper middle block): they keep their initial values. Returns their names
    (empty without ``grow``)."""
    own = model.state_dict()
    check_weights(own, state, source, allow_missing=grow)
    new = [k for k in own if k not in state]
    with torch.no_grad():
        for k, v in own.items():
            if k in state:
                v.copy_(state[k].to(v.dtype))
    return new


#: the in-place random fills of a tensor (weight initialisation's, besides ``torch.nn.init``'s own)
_RANDOM_FILLS = frozenset(
    ("normal_", "uniform_", "random_", "bernoulli_", "exponential_", "geometric_",
     "log_normal_", "cauchy_")
)  # fmt: skip


class _NoMetaFills(TorchFunctionMode):
    """Weight initialisation's fills (``torch.nn.init``'s functions, a tensor's random fills)
    do nothing to meta tensors: they hold no data, and torch fills them by its Python
    decompositions, whose first use imports the compiler stack (a second or more on a small
    CPU). A torch function mode, so it holds for this thread alone (a server loading in
    another thread initialises as usual)."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        fill = name in _RANDOM_FILLS or (
            getattr(func, "__module__", None) == "torch.nn.init" and name.endswith("_")
        )
        target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes tensor=
        if fill and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


def meta_model(build: Callable[..., M], *args: Any, **kwargs: Any) -> M:
    """``build(*args, **kwargs)`` on the meta device, e.g. ``meta_model(UNet, config)``: the
    model's names, shapes and dtypes with no memory and no initialisation (its weights hold
    no data until assigned, e.g. by ``load_state_dict(..., assign=True)``). The skipped
    initialisation (:class:`_NoMetaFills`) holds for this thread alone: a model built in
    another thread meanwhile is initialised as usual."""
    with torch.device("meta"), _NoMetaFills():
        return build(*args, **kwargs)


def from_pretrained(
    path: str | os.PathLike,
    *,
    weights: Literal["auto", "model", "ema"] = "auto",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    allow_legacy: bool = False,
) -> nn.Module:
    """Rebuild a model from a folder written by :func:`save_pretrained`, in eval mode.

    ``weights="auto"`` uses ``ema.safetensors`` when present (the weights to sample with),
    ``"model"`` the raw weights, ``"ema"`` insists on the EMA weights.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
        # refuse unsafe pickles with the explanation before complaining about the layout
        load_state_dict(path, allow_legacy=allow_legacy)
    if not path.is_dir():
        raise HubError(f"{path}: not a model folder (expected a directory with {CONFIG_NAME})")
    config = load_config(path)
    cls = model_class(config.type_name)
    file = path / WEIGHTS_NAME
    if weights in ("auto", "ema") and (path / EMA_NAME).exists():
        file = path / EMA_NAME
    elif weights == "ema":
        raise HubError(f"{path}: no {EMA_NAME} in this folder")
    if not file.exists():
        legacy = [p for p in sorted(path.iterdir()) if p.suffix.lower() in PICKLE_SUFFIXES]
        if legacy and allow_legacy:
            file = legacy[0]
        elif legacy:
            load_state_dict(legacy[0])  # raises UnsafeWeightsError
        else:
            raise HubError(f"{path}: no {WEIGHTS_NAME} in this folder")
    # Build the model on the meta device first (no memory) and check it against the weights
    # file's header, so that a config.json declaring a huge model fails here with a message
    # instead of allocating (and perhaps exhausting) memory before the weights are compared.
    try:
        skeleton = meta_model(cls, config)
    except (ValueError, TypeError, AssertionError, RuntimeError) as e:
        raise HubError(
            f"{path / CONFIG_NAME}: the config does not describe a model ({e})"
        ) from None
    if file.suffix.lower() == ".safetensors":
        check_weights(skeleton.state_dict(), _header_tensors(file), file)
    del skeleton
    model = cls(config)
    load_weights_into(model, load_state_dict(file, allow_legacy=allow_legacy), file)
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model.eval()
