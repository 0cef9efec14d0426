"""Backend registry: per backend, a *selection* function and a *backward* function.

selection(x, labels, r, ref_labels, query_ids, ref_ids, pos, neg, distance, margin)
    -> (pos_idx, neg_idx)          int64 [N], -1 where none exists
backward(grad_pos, grad_neg, x, r, pos_idx, neg_idx, distance)
    -> (grad_x [N, D], grad_r [M, D])
pair_distance(x, r, idx, distance) -> [N]   (optional; default fastmine._pairs.pair_distance)

Exact pair distances follow one definition (fastmine._pairs, the direct
difference); backends differ in how they select and may supply a fused
backward and a fused pair-distance kernel computing that same definition.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from . import _extension, _pairs, reference
from ._contract import DISTANCES, NEG_STRATEGIES, POS_STRATEGIES


@dataclass(frozen=True)
class Backend:
    name: str
    select: Callable
    backward: Callable
    # Returns "" if usable for tensors on `device`, else the reason it is not.
    unavailable: Callable[[torch.device], str]
    # Exact distances of the selected pairs; None: fastmine._pairs.pair_distance.
    pair_distance: Optional[Callable] = None


def _compiled_select(x, labels, r, ref_labels, query_ids, ref_ids, pos, neg, distance, margin):
    return _extension.select_op()(
        x, labels, r, ref_labels, query_ids, ref_ids,
        POS_STRATEGIES[pos], NEG_STRATEGIES[neg], DISTANCES[distance], margin)


def _torch_unavailable(device: torch.device) -> str:
    return ""


def _cpu_unavailable(device: torch.device) -> str:
    if device.type != "cpu":
        return f"backend 'cpu' needs CPU tensors, got tensors on {device}"
    return _extension.why_missing()


def _cuda_unavailable(device: torch.device) -> str:
    if device.type != "cuda":
        return f"backend 'cuda' needs CUDA tensors, got tensors on {device}"
    if not _extension.has_cuda_kernels():
        return _extension.cuda_why_missing() or _extension.why_missing()
    return ""


_REGISTRY: Dict[str, Backend] = {
    "torch": Backend("torch", reference.select, _pairs.pair_distance_backward, _torch_unavailable),
    "cpu": Backend("cpu", _compiled_select, _pairs.pair_distance_backward, _cpu_unavailable),
    "cuda": Backend("cuda", _compiled_select, _pairs.pair_distance_backward, _cuda_unavailable),
}


def register(backend: Backend) -> None:
    """Add a backend (used by optional backends such as triton at import)."""
    _REGISTRY[backend.name] = backend


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; choose from {['auto', *sorted(_REGISTRY)]}") from None


def resolve(name: str, device: torch.device) -> str:
    """Turn 'auto' into a concrete backend and check that the named one can run here.

    auto: CPU tensors -> 'cpu' if the extension is built, else 'torch';
          CUDA tensors -> 'triton' if available, else 'cuda', else 'torch'.
    """
    if name == "auto":
        order = ("cpu", "torch") if device.type == "cpu" else ("triton", "cuda", "torch")
        for cand in order:
            if cand in _REGISTRY and not _REGISTRY[cand].unavailable(device):
                return cand
        return "torch"
    reason = get(name).unavailable(device)
    if reason:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    return name


def available(device: Optional[torch.device] = None) -> list:
    """Names of the backends usable for tensors on `device` (default: CPU)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    return [n for n, b in sorted(_REGISTRY.items()) if not b.unavailable(device)]
