"""Benchmark providers: everything ``benchmarks.mine`` can time on the same data.

A provider turns ``(x [N, D], labels [N], r [M, D] or None, ref_labels [M] or None)``
into ``(pos_dist [N'], neg_dist [N'])``, differentiable w.r.t. ``x`` (N' <= N:
PML returns only anchors with a valid triplet).  ``r is None`` means the
references are the batch itself (self-pairs excluded).  Every provider mines
with the plain (unnormalised) Euclidean distance so that all of them solve the
same problem: PML normalises embeddings by default, so its miners are built
with ``LpDistance(normalize_embeddings=False)`` (p=2, not squared), which is
exactly fastmine's ``distance="euclidean"``.

The "matmul (blocked floor)" provider is the bare Gram product ``X @ R.T`` in
the same dtype/precision, computed in row blocks so memory stays bounded: no
exact mining method can beat it, so ``t / t_floor`` says how close a provider
is to the hardware limit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

import fastmine

FLOOR = "matmul (blocked floor)"
PML_EASY_HARD = "pml BatchEasyHardMiner"
PML_BATCH_HARD = "pml BatchHardMiner"
KEOPS = "keops"

# Elements of one floor block (rows x M), enough to run the GEMM at full speed
# while keeping memory independent of N: 2**22 (16 MiB fp32, fastest of
# 2**20/2**22/2**24 measured at N=8192, D=128 on the 2-core CPU) on CPU; 2**28
# (1 GiB fp32) on GPU, so that even a 1M-row bank gets 256-row blocks.
FLOOR_BLOCK_ELEMS = {"cpu": 1 << 22, "cuda": 1 << 28}


@dataclass
class Provider:
    """One timed implementation.

    name: label in tables and plots.
    run: (x, labels, r, ref_labels, pos_strategy, neg_strategy) -> (pos_dist, neg_dist),
        or None for the floor (which has nothing to differentiate).
    unsupported: (device, strategy, mode, has_refs) -> "" if the cell can run, else why not.
    bytes_per_pair: rough peak extra memory per (query, reference) pair, in units of the
        element size, used by the memory cap ("skipped (est. X GB)"); 0 = O((N+M) D).
    """
    name: str
    run: Callable
    unsupported: Callable[[torch.device, str, str, bool], str]
    bytes_per_pair: float = 0.0

    def estimate_bytes(self, n: int, m: int, d: int, elem: int) -> float:
        """Estimated peak extra memory of one call on [n, d] x [m, d] inputs."""
        rows = (n + m) * d * elem * 4  # inputs' copies, gradients, gathered rows
        return rows + self.bytes_per_pair * n * m * max(elem, 4)


def _always(device, strategy, mode, has_refs) -> str:
    return ""


# ---------------------------------------------------------------- fastmine
def _fastmine_provider(backend: str) -> Provider:
    def run(x, labels, r, ref_labels, pos, neg):
        res = fastmine.mine(x, labels, r, ref_labels, pos_strategy=pos, neg_strategy=neg,
                            distance="euclidean", backend=backend)
        return res.pos_dist, res.neg_dist
    # The torch reference materialises the distance matrix plus masks (~4 N*M
    # compute-dtype buffers and a few bool ones); the fused backends are O((N+M) D).
    per_pair = 6.0 if backend == "torch" else 0.0
    return Provider(f"fastmine {backend}", run, _always, per_pair)


# ---------------------------------------------------------------- PML
def _pml_available() -> str:
    try:
        import pytorch_metric_learning  # noqa: F401
    except ImportError as e:
        return f"pytorch-metric-learning is not importable ({e})"
    return ""


def _pml_triplet_dists(x, r, a, p, n):
    """Euclidean distances of PML's mined (anchor, positive, negative) triplets."""
    refs = x if r is None else r
    return (x[a] - refs[p]).norm(dim=1), (x[a] - refs[n]).norm(dim=1)


def _pml_easy_hard() -> Provider:
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.miners import BatchEasyHardMiner
    miners: Dict[Tuple[str, str], object] = {}

    def run(x, labels, r, ref_labels, pos, neg):
        key = (pos, neg)
        if key not in miners:
            miners[key] = BatchEasyHardMiner(pos_strategy=pos, neg_strategy=neg,
                                             distance=LpDistance(normalize_embeddings=False))
        a, p, _a, n = miners[key](x, labels, r, ref_labels)  # (a, p, a, n): one triplet per anchor
        return _pml_triplet_dists(x, r, a, p, n)
    # N*M distance matrix, the N*M label-equality mask, and the int64 (anchor,
    # ref) index pairs of every negative pair from get_all_pairs_indices
    # (16 bytes per pair), plus masked copies in get_positives/get_negatives.
    return Provider(PML_EASY_HARD, run, _always, 12.0)


def _pml_batch_hard() -> Provider:
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.miners import BatchHardMiner
    miner = BatchHardMiner(distance=LpDistance(normalize_embeddings=False))

    def run(x, labels, r, ref_labels, pos, neg):
        a, p, n = miner(x, labels, r, ref_labels)
        return _pml_triplet_dists(x, r, a, p, n)

    def unsupported(device, strategy, mode, has_refs):
        return "" if strategy == "hard/hard" else "BatchHardMiner only mines hard/hard"
    return Provider(PML_BATCH_HARD, run, unsupported, 6.0)


# ---------------------------------------------------------------- KeOps
def _keops_available() -> str:
    try:
        import pykeops  # noqa: F401
    except ImportError as e:
        return f"pykeops is not importable ({e})"
    return ""


def _keops() -> Provider:
    """Symbolic (never materialised) N x M reductions with KeOps LazyTensors.

    Masks are folded into the reduced quantity: key = d^2 +/- BIG * (1 - allowed),
    with allowed built from exact float comparisons of labels and sample ids
    ((a - b)^2).sign() is 0 iff a == b (labels < 2^24 are exact in fp32).
    """
    from pykeops.torch import LazyTensor
    big = 1e30

    def run(x, labels, r, ref_labels, pos, neg):
        self_refs = r is None
        refs, rlab = (x, labels) if self_refs else (r, ref_labels)
        xc, rc = x.float().contiguous(), refs.float().contiguous()
        xi, rj = LazyTensor(xc[:, None, :]), LazyTensor(rc[None, :, :])
        li = LazyTensor(labels.float()[:, None, None])
        lj = LazyTensor(rlab.float()[None, :, None])
        d2 = ((xi - rj) ** 2).sum(-1)
        differ = ((li - lj) ** 2).sign()          # 1 where labels differ, 0 where equal
        same = 1 - differ
        if self_refs:                             # exclude (i, i)
            ii = LazyTensor(torch.arange(x.shape[0], device=x.device, dtype=torch.float32)[:, None, None])
            jj = LazyTensor(torch.arange(refs.shape[0], device=x.device, dtype=torch.float32)[None, :, None])
            same = same * ((ii - jj) ** 2).sign()
        if pos == "easy":
            p_idx = (d2 + big * (1 - same)).argmin(dim=1).view(-1)
        else:
            p_idx = (d2 - big * (1 - same)).argmax(dim=1).view(-1)
        if neg == "hard":
            n_idx = (d2 + big * (1 - differ)).argmin(dim=1).view(-1)
        else:
            n_idx = (d2 - big * (1 - differ)).argmax(dim=1).view(-1)
        return (x - refs[p_idx.long()]).norm(dim=1), (x - refs[n_idx.long()]).norm(dim=1)

    def unsupported(device, strategy, mode, has_refs):
        return "" if strategy.split("/")[1] in ("hard", "easy") else "semihard not implemented for KeOps"
    return Provider(KEOPS, run, unsupported, 0.0)


# ---------------------------------------------------------------- floor
def blocked_matmul(x: Tensor, r: Tensor, block_elems: Optional[int] = None) -> None:
    """X @ R.T in row blocks of at most ``block_elems`` outputs; results discarded.

    x: [N, D], r: [M, D], same dtype and device.  Runs at the current float32
    matmul precision, like mining does.  block_elems defaults per device type
    (FLOOR_BLOCK_ELEMS).
    """
    if block_elems is None:
        block_elems = FLOOR_BLOCK_ELEMS.get(x.device.type, FLOOR_BLOCK_ELEMS["cpu"])
    m = max(r.shape[0], 1)
    rows = min(max(1, block_elems // m), max(x.shape[0], 1))
    rt = r.T
    # One output buffer reused by every block (as the fused kernels reuse
    # theirs): a fresh allocation per block would time page faults, not FLOPs.
    buf = torch.empty(rows, r.shape[0], dtype=x.dtype, device=x.device)
    for i in range(0, x.shape[0], rows):
        xb = x[i:i + rows]
        torch.mm(xb, rt, out=buf[:xb.shape[0]])


def _floor() -> Provider:
    def run(x, labels, r, ref_labels, pos, neg):
        blocked_matmul(x.detach(), (x if r is None else r).detach())
        return None

    def unsupported(device, strategy, mode, has_refs):
        # The floor is mode- and strategy-independent; it is measured once per
        # size (forward mode, first strategy) and every provider is compared with it.
        return "" if mode == "forward" else "floor is measured in forward mode only"
    return Provider(FLOOR, run, unsupported, 0.0)


# ---------------------------------------------------------------- registry
def all_providers(device: torch.device) -> Tuple[List[Provider], Dict[str, str]]:
    """(providers usable on ``device``, {name: reason} for the ones that are not).

    fastmine backends come from ``fastmine.available_backends(device)``; the
    triton backend is listed only for CUDA tensors (never the CPU interpreter,
    whose timings are meaningless).
    """
    providers: List[Provider] = []
    missing: Dict[str, str] = {}
    for b in fastmine.available_backends(device):
        if b == "triton" and device.type != "cuda":
            missing["fastmine triton"] = "triton is benchmarked on CUDA tensors only"
            continue
        providers.append(_fastmine_provider(b))
    why = _pml_available()
    if why:
        missing[PML_EASY_HARD] = missing[PML_BATCH_HARD] = why
    else:
        providers += [_pml_easy_hard(), _pml_batch_hard()]
    why = _keops_available()
    if why:
        missing[KEOPS] = why
    else:
        providers.append(_keops())
    providers.append(_floor())
    return providers, missing


def select(providers: List[Provider], wanted: Optional[List[str]]) -> List[Provider]:
    """Filter by name; ``wanted`` entries match a full name or a word of it
    (e.g. "cpu", "torch", "pml", "floor").  None keeps everything."""
    if not wanted:
        return providers
    out = []
    for p in providers:
        words = p.name.lower().replace("(", " ").replace(")", " ").split()
        if any(w.lower() == p.name.lower() or w.lower() in words for w in wanted):
            out.append(p)
    return out
