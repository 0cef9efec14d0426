"""Backends: which implementation of ``fastmine::mine`` runs, and whether it can.

Every call goes through the one op ``fastmine::mine`` (C++, csrc/fastmine_ops.cpp):
its autograd and its fake implementation are registered once, and its CPU /
CUDA kernel runs the implementation named by ``backend``:

* ``cpu``: the compiled CPU kernels (csrc/cpu), run directly;
* ``cuda``: the compiled CUDA kernels, the C++ ops ``fastmine::mine_cuda`` and
  ``fastmine::mine_backward_cuda`` (csrc/cuda/mine_cuda.cu);
* any other name X: the op ``fastmine::mine_X`` -- the Python backends
  (``torch``, the readable reference; ``triton``) register theirs here with
  :func:`register_python`, from a selection, a backward and a pair-distance
  function.

This module keeps, per name, only *whether* the backend can run on a device
(``unavailable``); asking never builds anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Optional, Tuple

import torch
from torch import Tensor

from . import _extension
from ._contract import (DISTANCE_WEIGHTED, DISTANCES, NEG_STRATEGIES, POS_STRATEGIES,
                        checked_references, seed_from_int64)

_POS_NAMES = {v: k for k, v in POS_STRATEGIES.items()}
_NEG_NAMES = {v: k for k, v in NEG_STRATEGIES.items()}
_DISTANCE_NAMES = {v: k for k, v in DISTANCES.items()}


# The rules a backend may implement beyond fastmine::mine's k = 1 deterministic
# strategies (which every backend implements):
#   "topk":              the op fastmine::mine_topk_<name> (k per anchor, the
#                        deterministic strategies);
#   "distance_weighted": its mine_topk_<name> also samples neg_strategy
#                        "distance_weighted" (fastmine.mine with it is k = 1 of
#                        mine_topk).
# `backend="auto"` picks only a backend that has the rules a call needs, and an
# explicit backend without them raises NotImplementedError naming it; so the
# kernels can be added one by one (docs/ops.md).
RULES = ("topk", "distance_weighted")


@dataclass(frozen=True)
class Backend:
    name: str
    # Returns "" if usable for tensors on `device`, else the reason it is not.
    unavailable: Callable[[torch.device], str]
    # The RULES it implements (see above).
    rules: FrozenSet[str] = frozenset()


def rules_needed(neg_strategy: str, topk: bool) -> FrozenSet[str]:
    """The RULES a call needs: ``topk`` (a fastmine.mine_topk call, or fastmine.mine
    with distance_weighted, which runs as mine_topk with k = 1) and the negative
    strategy name."""
    if neg_strategy == DISTANCE_WEIGHTED:
        return frozenset(("topk", "distance_weighted"))
    return frozenset(("topk",)) if topk else frozenset()


def _cpu_unavailable(device: torch.device) -> str:
    if device.type != "cpu":
        return f"backend 'cpu' needs CPU tensors, got tensors on {device}"
    return _extension.why_missing()


def _cuda_unavailable(device: torch.device) -> str:
    if device.type != "cuda":
        return f"backend 'cuda' needs CUDA tensors, got tensors on {device}"
    return _extension.cuda_why_missing()


def _compiled_rules(op_name: str) -> FrozenSet[str]:
    """RULES of a compiled backend whose top-k kernel is the C++ op
    fastmine::<op_name>: all of them when the loaded extension registers that op
    (csrc/cpu/mine_topk_cpu.cpp samples distance_weighted too), none otherwise,
    so an extension built before the kernel existed does not claim them.  Asks
    torch's op registry only (builds nothing)."""
    return frozenset(RULES) if hasattr(torch.ops.fastmine, op_name) else frozenset()


_REGISTRY: Dict[str, Backend] = {
    "torch": Backend("torch", lambda device: ""),
    "cpu": Backend("cpu", _cpu_unavailable, _compiled_rules("mine_topk_cpu")),
    "cuda": Backend("cuda", _cuda_unavailable),
}


def register(backend: Backend) -> None:
    """Add a backend name (its op fastmine::mine_<name> must exist when it is used)."""
    _REGISTRY[backend.name] = backend


def _select_and_measure(select: Callable, exact: Callable, embeddings: Tensor, labels: Tensor,
                        ref_emb: Optional[Tensor], ref_labels: Optional[Tensor],
                        query_ids: Optional[Tensor], ref_ids: Optional[Tensor],
                        distance: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The body of a Python backend's forward op: the data checks and the explicit
    reference set (``checked_references``), then ``select(x, labels, r, ref_labels,
    query_ids, ref_ids, distance_name) -> (pos_idx, neg_idx)`` without gradient,
    then the exact distances ``exact(x, r, idx, distance_name)`` of the picks."""
    dist = _DISTANCE_NAMES[distance]
    ref_emb, ref_labels, query_ids, ref_ids = checked_references(
        embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids, dist)
    with torch.no_grad():
        pos_idx, neg_idx = select(embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids,
                                  dist)
        return (pos_idx, neg_idx, exact(embeddings, ref_emb, pos_idx, dist),
                exact(embeddings, ref_emb, neg_idx, dist))


def register_python(name: str, select: Callable, backward: Callable,
                    unavailable: Callable[[torch.device], str],
                    pair_distance: Optional[Callable] = None) -> None:
    """Register a backend written in Python as the ops fastmine::mine_<name> and
    fastmine::mine_backward_<name> (the implementation ops of schema.h).

    select(x, labels, r, ref_labels, query_ids, ref_ids, pos, neg, distance, margin)
        -> (pos_idx, neg_idx)      int64 [N], -1 where none exists; strategy and
        distance names as in fastmine.mine; ids None: no exclusion.
    backward(grad_pos, grad_neg, x, r, pos_idx, neg_idx, distance)
        -> (grad_x [N, D], grad_r [M, D])
    pair_distance(x, r, idx, distance) -> [N] (default fastmine._pairs.pair_distance)

    The op runs the data checks (fastmine._contract.check_finite) first and
    expands the batch-as-references case (ref_emb None: r = x, ids arange(N)
    unless query_ids are given).
    """
    from ._pairs import pair_distance as default_pair_distance

    exact = pair_distance or default_pair_distance
    op_name = name.replace("-", "_")

    @torch.library.custom_op(f"fastmine::mine_{op_name}", mutates_args=())
    def mine_impl(embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
                  ref_labels: Optional[Tensor], query_ids: Optional[Tensor],
                  ref_ids: Optional[Tensor], pos_strategy: int, neg_strategy: int,
                  distance: int, margin: Optional[float]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        return _select_and_measure(
            lambda x, y, r, ry, qid, rid, dist: select(
                x, y, r, ry, qid, rid, _POS_NAMES[pos_strategy], _NEG_NAMES[neg_strategy], dist,
                margin),
            exact, embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids, distance)

    @torch.library.custom_op(f"fastmine::mine_backward_{op_name}", mutates_args=())
    def mine_backward_impl(grad_pos_dist: Tensor, grad_neg_dist: Tensor, embeddings: Tensor,
                           ref_emb: Optional[Tensor], pos_idx: Tensor, neg_idx: Tensor,
                           distance: int, ref_emb_grad: bool) -> Tuple[Tensor, Tensor]:
        r = embeddings if ref_emb is None else ref_emb
        grad_x, grad_r = backward(grad_pos_dist, grad_neg_dist, embeddings, r, pos_idx, neg_idx,
                                  _DISTANCE_NAMES[distance])
        empty = embeddings.new_empty((0, embeddings.shape[1]))
        if ref_emb is None:
            return grad_x + grad_r, empty
        return grad_x, (grad_r if ref_emb_grad else empty)

    register(Backend(name, unavailable, _REGISTRY[name].rules if name in _REGISTRY else frozenset()))


def register_python_topk(name: str, select_topk: Callable, distance_weighted: bool,
                         pair_distances: Optional[Callable] = None) -> None:
    """Register a Python implementation of top-k as the op fastmine::mine_topk_<name>
    (FASTMINE_MINE_TOPK_IMPL_SCHEMA of schema.h) and add "topk" (and, when
    ``distance_weighted``, "distance_weighted") to the rules of the backend
    ``name``, which must be registered already (``register_python``).

    select_topk(x, labels, r, ref_labels, query_ids, ref_ids, k_pos, k_neg, pos, neg,
                distance, margin, cutoff, nonzero_loss_cutoff, seed)
        -> (pos_idx int64 [N, k_pos], neg_idx int64 [N, k_neg]), trailing -1;
        strategy and distance names as in fastmine.mine_topk; seed an int in
        [0, 2^64); ids None: no exclusion (``fastmine.reference_topk.select_topk``).
    pair_distances(x, r, idx [N, k], distance) -> [N, k] (default
        ``fastmine.reference_topk.pair_distances``).

    The op runs the data checks and expands ref_emb = None as register_python
    does; its gradient is the C++ autograd of fastmine::mine_topk
    (fastmine::mine_backward of the backend, per pair).
    """
    from .reference_topk import pair_distances as default_pair_distances

    exact = pair_distances or default_pair_distances
    op_name = name.replace("-", "_")

    @torch.library.custom_op(f"fastmine::mine_topk_{op_name}", mutates_args=())
    def mine_topk_impl(embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
                       ref_labels: Optional[Tensor], query_ids: Optional[Tensor],
                       ref_ids: Optional[Tensor], k_pos: int, k_neg: int, pos_strategy: int,
                       neg_strategy: int, distance: int, margin: Optional[float], cutoff: float,
                       nonzero_loss_cutoff: float,
                       seed: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        neg = _NEG_NAMES[neg_strategy]
        if neg == DISTANCE_WEIGHTED and not distance_weighted:
            raise NotImplementedError(f"fastmine::mine_topk_{op_name}: backend {name!r} does not "
                                      "implement neg_strategy='distance_weighted'")
        return _select_and_measure(
            lambda x, y, r, ry, qid, rid, dist: select_topk(
                x, y, r, ry, qid, rid, k_pos, k_neg, _POS_NAMES[pos_strategy], neg, dist, margin,
                cutoff, nonzero_loss_cutoff, seed_from_int64(seed)),
            exact, embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids, distance)

    new_rules = {"topk"} | ({"distance_weighted"} if distance_weighted else set())
    old = get(name)
    register(Backend(old.name, old.unavailable, old.rules | frozenset(new_rules)))


def _op_registered(qualname: str) -> bool:
    """Whether the dispatcher knows the op ``qualname`` (e.g. "fastmine::mine_topk_cuda")."""
    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
        return True
    except RuntimeError:
        return False


def _refresh_cuda_rules() -> None:
    """'cuda' has the top-k rules once the loaded CUDA kernels register
    fastmine::mine_topk_cuda (csrc/cuda/mine_topk_cuda.cu): a build without that
    file, or no CUDA build at all, does not claim them.  The CUDA kernels may be
    loaded after import (the opt-in JIT build), so a miss is looked up again."""
    cuda = _REGISTRY.get("cuda")
    if cuda is not None and not cuda.rules and _op_registered("fastmine::mine_topk_cuda"):
        _REGISTRY["cuda"] = Backend(cuda.name, cuda.unavailable, frozenset(RULES))


def get(name: str) -> Backend:
    if name == "cuda":
        _refresh_cuda_rules()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown backend {name!r}; choose from {['auto', *sorted(_REGISTRY)]}") from None


def resolve(name: str, device: torch.device, needs: FrozenSet[str] = frozenset()) -> str:
    """Turn 'auto' into a concrete backend and check that the named one can run here
    and implements the RULES ``needs`` (``rules_needed``).

    auto: CPU tensors -> 'cpu' if the extension is built, else 'torch';
          CUDA tensors -> 'triton' if available, else 'cuda', else 'torch';
          skipping the backends without ``needs`` ('torch' has every rule).
    An explicit backend without ``needs`` raises NotImplementedError naming it.
    """
    if name == "auto":
        order = ("cpu", "torch") if device.type == "cpu" else ("triton", "cuda", "torch")
        for cand in order:
            if cand in _REGISTRY and (not needs or needs <= get(cand).rules) \
                    and not _REGISTRY[cand].unavailable(device):
                return cand
        return "torch"
    missing = needs - get(name).rules
    if missing:
        what = "distance_weighted sampling" if "distance_weighted" in missing else "top-k mining"
        _refresh_cuda_rules()
        able = sorted(n for n, b in _REGISTRY.items() if needs <= b.rules)
        raise NotImplementedError(f"backend {name!r} does not implement {what} yet; backends "
                                  f"that do: {able} (backend='auto' picks one)")
    if name == "cuda" and device.type == "cuda" and _extension.jit_enabled():
        _extension.ensure_cuda_kernels()  # FASTMINE_JIT=1: build once on an explicit request
    reason = get(name).unavailable(device)
    if reason:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    return name


def available(device: Optional[torch.device] = None) -> list:
    """Names of the backends usable for tensors on `device` (default: CPU)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    return [n for n, b in sorted(_REGISTRY.items()) if not b.unavailable(device)]


def _register_builtin() -> None:
    from . import _pairs, reference

    from . import reference_topk

    register_python("torch", reference.select, _pairs.pair_distance_backward, lambda device: "")
    # The readable full-matrix top-k and distance-weighted sampler (issue #17).
    register_python_topk("torch", reference_topk.select_topk, distance_weighted=True)
    # "cuda" needs no Python: csrc/cuda/mine_cuda.cu registers the C++ ops
    # fastmine::mine_cuda and fastmine::mine_backward_cuda (forward, exact
    # distances, data checks and backward on the device, without host syncs),
    # and csrc/cuda/mine_topk_cuda.cu fastmine::mine_topk_cuda, whose presence
    # gives "cuda" the top-k rules (_refresh_cuda_rules, on lookup).


_register_builtin()
