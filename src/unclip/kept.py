"""Tensors derived from a module's weights alone, kept between sampling runs while the weights
are unchanged.

A sampling run prepares tensors from a network's weights once (Winograd's transformed kernels,
the ResBlocks' stacked embedding projections); without this the next run of the same network
would make them again (about 20 ms of a one-image emoji-small ``generate`` on 2 CPU cores).
:func:`kept` returns what ``make`` built at the last call for the same module, name and
weights. "The same weights" means the same tensor objects, at the same addresses, with the same
version counters: every in-place change through the tensors themselves (an optimizer step,
``load_state_dict``, ``copy_``) bumps the counter, and ``.to()`` or assigning ``.data`` gives
another tensor or address (the entry holds the weights' storage, so an address cannot be
reused while it stands). Writes through ``.data`` (``p.data.copy_(w)``) bypass the version
counter and are not seen: call :func:`forget` after them. Only weights on the CPU are kept
for (a run that moves its networks to a GPU and back would otherwise hold device memory), and
nothing for tensors without a version counter (made under ``torch.inference_mode``), fake or
meta tensors, or while torch.compile traces.

The entries live beside the module, not in it (a ``weakref`` map: copying or pickling the
module copies none of them), until :func:`forget` or the module's end; they cost memory beside
the weights (4× the 3×3 kernels for Winograd).

:func:`memoised` is the same idea within one sampling run, for what its steps derive from
unchanged inputs (the conditioning a sampler passes at every step).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")

_PLAIN = (torch.Tensor, nn.Parameter)
#: module -> {name: (key, value, the weights' detached aliases)}
_STORE: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple]] = weakref.WeakKeyDictionary()


def version_key(tensors: Sequence[object]) -> tuple | None:
    """What identifies the tensors' current values (object, address, version counter; None
    entries stay None), or None where one is neither a plain tensor (or parameter) nor None
    (a fake or traced tensor subclass), sits on the meta device, or has no version counter
    (an inference tensor), or while torch.compile traces."""
    if torch.compiler.is_compiling() or not all(
        t is None or (type(t) in _PLAIN and t.device.type != "meta")  # type: ignore[union-attr]
        for t in tensors
    ):
        return None
    try:
        return tuple(None if t is None else (id(t), t.data_ptr(), t._version) for t in tensors)  # type: ignore[union-attr]
    except RuntimeError:
        return None


def kept(
    module: nn.Module, name: str, weights: Sequence[torch.Tensor | None], make: Callable[[], T]
) -> T:
    """``make()``, or what it returned at the last call with this module and name if
    ``weights`` are unchanged since (module docstring)."""
    key = version_key(weights)
    if key is None or any(w is not None and w.device.type != "cpu" for w in weights):
        return make()
    store = _STORE.setdefault(module, {})
    hit = store.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = make()
    store[name] = (key, value, [None if w is None else w.detach() for w in weights])
    return value


def forget(module: nn.Module) -> None:
    """Drop what :func:`kept` holds for ``module`` and its submodules."""
    for m in module.modules():
        _STORE.pop(m, None)


def memoised(
    memo: dict | None,
    module: nn.Module,
    inputs: Sequence[object],
    device: torch.device | str,
    make: Callable[[], T],
    extra: tuple = (),
) -> T:
    """``make()``, or what it returned at this thread's last call with the same ``memo``, the
    same ``inputs``, unchanged (:func:`version_key`), the same ``extra`` (other arguments,
    compared by value) and the same autocast state of ``device``'s type. Only where ``memo`` is a dict (a sampling run's), ``module`` is in
    eval mode, autograd is off and nothing is being compiled; elsewhere ``make()``. One entry
    per thread, holding its inputs, so their ids stay theirs."""
    if memo is None or module.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return make()
    tensors = version_key(inputs)
    if tensors is None:
        return make()
    kind = torch.device(device).type
    key = (tensors, extra, kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
    thread = threading.get_ident()
    last = memo.get(thread)  # (key, inputs, value)
    if last is not None and last[0] == key:
        return last[2]
    value = make()
    memo[thread] = (key, list(inputs), value)
    return value
