"""The mining contract's vocabulary and the static checks done at the API boundary.

The integer codes mirror ``csrc/include/fastmine/strategies.h``; they are part of
the ``fastmine::mine_select`` op schema.  Everything here is shape/dtype logic
that is safe to trace (no data-dependent control flow): value checks that need
the data (NaN/Inf, norm bounds) run inside the op, see ``check_finite``.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

POS_STRATEGIES = {"easy": 0, "hard": 1}
# "distance_weighted" (code 3) is the random rule of issue #17: it needs a seed
# and cutoffs, so it is mined by the op fastmine::mine_topk (fastmine.mine
# routes it there with k = 1); the kernels of fastmine::mine reject code 3.
NEG_STRATEGIES = {"hard": 0, "semihard": 1, "easy": 2, "distance_weighted": 3}
DISTANCE_WEIGHTED = "distance_weighted"
# Its default cutoffs (PML's DistanceWeightedMiner and Wu et al. 2017): the
# distance clamp and the distance from which the weight is 0.
DW_CUTOFF = 0.5
DW_NONZERO_LOSS_CUTOFF = 1.4
DISTANCES = {"euclidean": 0, "squared_euclidean": 1, "cosine": 2}

# Label and id dtypes: uint16/uint32 are widened to int64 at the boundary
# (``widen_index_vector``); uint64 and bool are rejected (values >= 2^63 have no
# int64 form, and a bool is not a class label).
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16,
               torch.uint32)
_WIDENED_DTYPES = (torch.uint16, torch.uint32)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_choice(name: str, value, options) -> None:
    """``value`` must be a str among ``options`` (never hashes a non-str)."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {sorted(options)}, got {value!r}")


def check_bool(name: str, value) -> bool:
    """A flag: a Python bool, a numpy bool or a 0-d bool tensor (never a
    truthy string, number or list, which ``bool()`` would silently accept).
    Returns a Python bool."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool, got a tensor of shape "
                            f"{tuple(value.shape)} and dtype {value.dtype}")
        return bool(value.item())
    if isinstance(value, bool) or (type(value).__module__ == "numpy"
                                   and type(value).__name__ in ("bool", "bool_")):  # numpy.bool_
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} "
                    f"({value!r})")


def check_real(name: str, value, *, minimum: Optional[float] = None,
               positive: bool = False) -> float:
    """A finite real number: int, float, numpy scalar (numbers.Real) or 0-d real tensor.

    bool, NaN, +-Inf and tensors that require grad (a learnable value read
    once would be frozen without a word) are rejected; ``minimum`` (inclusive)
    or ``positive`` (> 0) bound it.  Returns it as a Python float.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number or a 0-d real tensor, got a tensor "
                            f"of shape {tuple(value.shape)} and dtype {value.dtype}")
        if value.requires_grad:  # e.g. an nn.Parameter: its value would be frozen silently
            raise TypeError(f"{name} is a tensor that requires grad, but it is read once as a "
                            f"constant (no gradient reaches it); pass float({name}) or a "
                            "detached tensor")
        value = value.item()
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


def check_positive_int(name: str, value) -> int:
    """An integer >= 1 (Python or numpy int, or a 0-d integer tensor; not bool, not 2.5)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return int(value)


def check_backend_name(backend, known) -> None:
    """``backend`` must be "auto" or a registered backend name (availability is checked later)."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in known):
        raise ValueError(f"unknown backend {backend!r}; backend must be one of "
                         f"{['auto', *sorted(known)]}")


def check_strategy(pos_strategy: str, neg_strategy: str, distance: str,
                   margin: Optional[float]) -> None:
    """Strategy names, distance, and the margin's and distance_weighted's rules."""
    check_choice("pos_strategy", pos_strategy, POS_STRATEGIES)
    check_choice("neg_strategy", neg_strategy, NEG_STRATEGIES)
    check_choice("distance", distance, DISTANCES)
    if margin is not None:
        if neg_strategy != "semihard":
            raise ValueError(
                f"margin is only used by neg_strategy='semihard'; got margin={margin!r} "
                f"with neg_strategy={neg_strategy!r}")
        check_semihard_margin("margin", margin)
    if neg_strategy == DISTANCE_WEIGHTED and distance != "euclidean":
        raise ValueError(f"neg_strategy='distance_weighted' needs distance='euclidean', "
                         f"got distance={distance!r}")


def check_semihard_margin(name: str, margin) -> float:
    """The semi-hard window's upper margin: a finite real > 0.  At 0 the window
    (d_ap, d_ap + margin) is empty and nothing would ever be mined; no upper
    bound is spelled None, not a large number."""
    return check_real(name, margin, positive=True)


def check_seed(seed) -> Optional[int]:
    """``seed``: None, or an integer in [0, 2^64) (Python/numpy int, or a 0-d integer
    tensor; not bool, not float).  Returns None or a Python int."""
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.is_floating_point() or seed.is_complex() \
                or seed.dtype == torch.bool:
            raise TypeError(f"seed must be None or an integer, got a tensor of shape "
                            f"{tuple(seed.shape)} and dtype {seed.dtype}")
        seed = seed.item()
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be None or an integer, got {type(seed).__name__} ({seed!r})")
    if not 0 <= int(seed) < 2 ** 64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {int(seed)}")
    return int(seed)


def seed_as_int64(seed: int) -> int:
    """The op schemas' ``int seed`` (a signed int64) carrying a seed in [0, 2^64):
    its two's-complement bit pattern (seeds >= 2^63 become seed - 2^64).  C++
    reads it back as ``uint64_t(seed)``; Python as ``seed_from_int64``."""
    return seed - 2 ** 64 if seed >= 2 ** 63 else seed


def seed_from_int64(seed: int) -> int:
    """Inverse of ``seed_as_int64``: the op's int64 argument -> the seed in [0, 2^64)."""
    return int(seed) & (2 ** 64 - 1)


def check_topk_args(k_pos, k_neg, pos_strategy, neg_strategy, distance, margin, cutoff,
                    nonzero_loss_cutoff, seed):
    """The argument checks of ``mine_topk`` and of ``mine`` with distance_weighted
    (static: no data access; each error names its argument).

    k_pos, k_neg: integers >= 1; strategies, distance and margin as
    ``check_strategy`` (distance_weighted: euclidean only, no margin);
    cutoff, nonzero_loss_cutoff: finite reals > 0 (checked for every strategy,
    so that the op always receives valid floats; only distance_weighted uses
    them); seed: ``check_seed``.
    Returns (k_pos, k_neg, margin, cutoff, nonzero_loss_cutoff, seed) as
    Python int/float/None values.
    """
    k_pos = check_positive_int("k_pos", k_pos)
    k_neg = check_positive_int("k_neg", k_neg)
    check_strategy(pos_strategy, neg_strategy, distance, margin)
    margin = None if margin is None else check_semihard_margin("margin", margin)
    return (k_pos, k_neg, margin) + check_sampling_args(cutoff, nonzero_loss_cutoff, seed)


def check_sampling_args(cutoff, nonzero_loss_cutoff, seed):
    """cutoff, nonzero_loss_cutoff: finite reals > 0 with cutoff below both
    nonzero_loss_cutoff and 2; seed: ``check_seed``.

    The weight is 0 at every clamped distance max(d, cutoff) >= min(
    nonzero_loss_cutoff, 2) (docs/contract.md, "Random sampling"), so a cutoff
    at or above that bound gives every reference weight 0 and nothing would
    ever be sampled: rejected rather than mined as all -1.
    Returns (cutoff, nonzero_loss_cutoff, seed) as float, float, int/None."""
    cutoff = check_real("cutoff", cutoff, positive=True)
    nonzero_loss_cutoff = check_real("nonzero_loss_cutoff", nonzero_loss_cutoff, positive=True)
    bound = min(nonzero_loss_cutoff, 2.0)
    if not cutoff < bound:
        raise ValueError(
            f"cutoff must be < min(nonzero_loss_cutoff, 2) = {bound:g} (at or above it every "
            f"distance-weighted weight is 0 and nothing is sampled), got cutoff={cutoff!r} "
            f"with nonzero_loss_cutoff={nonzero_loss_cutoff!r}")
    return cutoff, nonzero_loss_cutoff, check_seed(seed)


def _check_dense(name: str, t: torch.Tensor) -> None:
    if t.is_nested or t.layout != torch.strided:
        kind = "a nested tensor" if t.is_nested else f"a {t.layout} tensor"
        raise TypeError(f"{name} must be a dense (strided) tensor, got {kind}")


def check_embeddings(name: str, emb) -> None:
    if not isinstance(emb, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(emb).__name__}")
    _check_dense(name, emb)
    if emb.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(emb.shape)}")
    if emb.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {emb.dtype}")


def l2_normalized(name: str, emb) -> torch.Tensor:
    """``emb`` [rows, D] with unit rows (F.normalize), after ``check_embeddings``, so
    that a wrong input gets the contract's named error rather than one from
    F.normalize.  The normalisation of the miners' and losses'
    ``normalize_embeddings``."""
    check_embeddings(name, emb)
    return F.normalize(emb, dim=1)


def check_not_indices_tuple(who: str, ref_emb) -> None:
    """TypeError when ``ref_emb`` is a tuple or list: a pytorch-metric-learning
    ``indices_tuple`` passed positionally (PML calls ``loss(embeddings, labels,
    indices_tuple, ref_emb, ref_labels)``), where fastmine's third argument is
    ``ref_emb``.  ``who`` names the refusing losses."""
    if isinstance(ref_emb, (tuple, list)):
        raise TypeError(f"{who} take no PML indices_tuple: the third argument is ref_emb "
                        f"(reference embeddings [M, D] with ref_labels [M], or None), got a "
                        f"{type(ref_emb).__name__}; fastmine's losses select their own pairs")


def check_index_vector(name: str, vec, n: int, owner: str, device) -> None:
    if not isinstance(vec, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(vec).__name__}")
    _check_dense(name, vec)
    if vec.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(vec.shape)}")
    if vec.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must have an integer dtype ({_dtype_names(_INT_DTYPES)}), "
                        f"got {vec.dtype}")
    if vec.shape[0] != n:
        raise ValueError(f"{name} has length {vec.shape[0]} but {owner} has {n} rows")
    if vec.device != device:
        raise ValueError(f"{name} is on {vec.device} but embeddings are on {device}")


def widen_index_vector(vec: torch.Tensor) -> torch.Tensor:
    """uint16/uint32 labels or ids as int64 (lossless); any other accepted dtype as is."""
    return vec.to(torch.int64) if vec.dtype in _WIDENED_DTYPES else vec


def sqnorm_bounds(dtype: torch.dtype, distance: str):
    """(lo, hi): the admissible range of a row's squared norm |x|^2 in the compute dtype.

    hi = max / 8 for every distance: then |a|^2, |b|^2, 2|a.b| <= max/4 by
    Cauchy-Schwarz, so every Gram term |a|^2 + |b|^2 - 2 a.b, every partial dot
    product and every direct difference |a - b|^2 <= 4 max(|a|^2, |b|^2) is
    finite (float32/bfloat16: |x| <= 6.5e18; float64: |x| <= 4.7e153).  Beyond
    it the mining values overflow to inf and no ranking is defined.

    lo (cosine only) = tiny / eps, the smallest normal number divided by the
    machine epsilon (float32: |x|^2 >= 9.9e-32, i.e. |x| >= 3.1e-16;
    float64: |x| >= 1.1e-146): products a_k b_k that round in the subnormal
    range then perturb a.b / (|a| |b|) by at most D * 2^-47 (float32), far
    below the mining precision.  Smaller rows, zero rows and D = 0 have no
    defined direction.  lo = 0 for the other distances (zero rows are fine).
    """
    cdt = compute_dtype(dtype)
    fi = torch.finfo(cdt)
    lo = fi.tiny / fi.eps if distance == "cosine" else 0.0
    return lo, fi.max / 8


def check_finite(name: str, emb: torch.Tensor, distance: str) -> None:
    """The contract's data checks on ``emb`` [N, D] ("Admissible rows"), inside the op.

    CPU tensors: eager, a ValueError naming ``name`` and the first bad row.
    Other devices: no host synchronisation -- the same conditions are reduced
    on the device into one flag and asserted asynchronously
    (``torch._assert_async``): a bad input fails the next synchronising call
    with a device-side assertion whose message names ``name`` and the rule.
    """
    if emb.device.type == "cpu":
        _check_finite_eager(name, emb, distance)
    else:
        check_finite_async(name, emb, distance)


def checked_references(embeddings: torch.Tensor, labels: torch.Tensor,
                       ref_emb: Optional[torch.Tensor], ref_labels: Optional[torch.Tensor],
                       query_ids: Optional[torch.Tensor], ref_ids: Optional[torch.Tensor],
                       distance: str):
    """The data checks (``check_finite``) on both row sets, then the explicit
    reference set of the full-matrix implementations.

    Returns ``(ref_emb [M, D], ref_labels [M], query_ids, ref_ids)``.  When
    ``ref_emb`` is None the references are the batch, and each row is its own
    sample unless ``query_ids`` are given: ids become ``arange(N)`` (the fused
    kernels use a flag instead).  Otherwise the ids pass through (None: no
    same-sample exclusion).
    """
    check_finite("embeddings", embeddings, distance)
    if ref_emb is None:
        if query_ids is None:
            query_ids = torch.arange(embeddings.shape[0], device=embeddings.device)
        return embeddings, labels, query_ids, query_ids
    check_finite("ref_emb", ref_emb, distance)
    return ref_emb, ref_labels, query_ids, ref_ids


def check_finite_async(name: str, emb: torch.Tensor, distance: str) -> None:
    """check_finite without a host sync (see there)."""
    if emb.shape[0] == 0:
        return
    cdt = compute_dtype(emb.dtype)
    sq_lo, sq_hi = sqnorm_bounds(emb.dtype, distance)
    norm = torch.linalg.vector_norm(emb, dim=1, dtype=cdt)  # NaN/Inf propagate into it
    ok = (norm <= math.sqrt(sq_hi)) & (norm >= math.sqrt(sq_lo))  # NaN fails both
    torch._assert_async(ok.all(), f"fastmine: {name} contains NaN or Inf, or a row whose norm "
                        "is outside the admissible range (docs/contract.md, 'Admissible rows')")


def _check_finite_eager(name: str, emb: torch.Tensor, distance: str) -> None:
    """Data-dependent checks, run eagerly (CPU tensors).

    1. No NaN or +-Inf.
    2. Every row's squared norm, in the compute dtype, lies within
       ``sqnorm_bounds`` (too large: the Gram terms overflow; cosine and too
       small, zero or D = 0: the direction is undefined).
    Reductions only, no [N, D] temporaries (the fused backends promise O(N)
    extra memory): min and max are finite iff no element is NaN or +-Inf
    (both propagate NaN), and the norms come from ``vector_norm``, compared
    as |x| against sqrt(bound) so that the check itself cannot overflow.
    """
    if emb.shape[0] == 0:
        return
    if emb.numel():
        lo, hi = torch.aminmax(emb)
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            raise ValueError(f"{name} contains NaN or Inf")
    cdt = compute_dtype(emb.dtype)
    sq_lo, sq_hi = sqnorm_bounds(emb.dtype, distance)
    norm = torch.linalg.vector_norm(emb, dim=1, dtype=cdt)  # [N]; 0 when D = 0
    big = (norm > math.sqrt(sq_hi)).nonzero()
    if big.numel():
        i = int(big[0, 0])
        raise ValueError(
            f"{name} row {i} has norm {float(norm[i]):.3g}, above the largest norm that "
            f"{cdt} mining can rank ({math.sqrt(sq_hi):.3g}: squared distances would overflow); "
            "scale the embeddings down (e.g. L2-normalise them)")
    if sq_lo > 0:
        small = (norm < math.sqrt(sq_lo)).nonzero()
        if small.numel():
            i = int(small[0, 0])
            raise ValueError(
                f"cosine distance needs rows with a direction: {name} row {i} has norm "
                f"{float(norm[i]):.3g} (zero, D = 0, or a squared norm below "
                f"{sq_lo:.3g}, where {cdt} products lose their precision)")


def semihard_window(v_ap: torch.Tensor, has_pos: torch.Tensor, margin: Optional[float],
                    distance: str):
    """The semi-hard window on the *mining value* v (Python form of strategies.h).

    v is the value mining ranks: the squared distance for "euclidean" and
    "squared_euclidean", 1 - cos for "cosine".  Given the positive's v_ap [N],
    a negative is admissible iff lo < v_an < hi with lo = v_ap and
    hi = (sqrt(v_ap) + margin)^2 (Euclidean) | v_ap + margin (others) | +inf
    (no margin), computed in float64 and rounded to v's dtype.  Anchors
    without a positive get lo = hi = +inf (nothing admissible).
    Returns (lo, hi), each [N] in v_ap's dtype.
    """
    inf = torch.full_like(v_ap, float("inf"))
    lo = torch.where(has_pos, v_ap, inf)
    if margin is None:
        return lo, inf
    v64 = v_ap.double()
    hi64 = (v64.sqrt() + margin).square() if distance == "euclidean" else v64 + margin
    return lo, torch.where(has_pos, hi64.to(v_ap.dtype), inf)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
