"""The mining contract's vocabulary and the static checks done at the API boundary.

The integer codes mirror ``csrc/include/fastmine/strategies.h``; they are part of
the ``fastmine::mine_select`` op schema.  Everything here is shape/dtype logic
that is safe to trace (no data-dependent control flow): value checks that need
the data (NaN/Inf, zero norms for cosine) run inside the op, see
``check_finite``.
"""
from __future__ import annotations

from typing import Optional

import torch

POS_STRATEGIES = {"easy": 0, "hard": 1}
NEG_STRATEGIES = {"hard": 0, "semihard": 1, "easy": 2}
DISTANCES = {"euclidean": 0, "squared_euclidean": 1, "cosine": 2}
BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {sorted(options)}, got {value!r}")


def check_strategy(pos_strategy: str, neg_strategy: str, distance: str,
                   margin: Optional[float]) -> None:
    _choice("pos_strategy", pos_strategy, POS_STRATEGIES)
    _choice("neg_strategy", neg_strategy, NEG_STRATEGIES)
    _choice("distance", distance, DISTANCES)
    if margin is not None:
        if neg_strategy != "semihard":
            raise ValueError(
                f"margin is only used by neg_strategy='semihard'; got margin={margin!r} "
                f"with neg_strategy={neg_strategy!r}")
        if not isinstance(margin, (int, float)) or isinstance(margin, bool):
            raise TypeError(f"margin must be a float, got {type(margin).__name__}")
        if not margin >= 0:  # also rejects NaN
            raise ValueError(f"margin must be >= 0, got {margin!r}")


def check_embeddings(name: str, emb) -> None:
    if not isinstance(emb, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(emb).__name__}")
    if emb.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(emb.shape)}")
    if emb.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16/bfloat16/float32/float64, got {emb.dtype}")


def check_index_vector(name: str, vec, n: int, owner: str, device) -> None:
    if not isinstance(vec, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(vec).__name__}")
    if vec.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(vec.shape)}")
    if vec.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must have an integer dtype, got {vec.dtype}")
    if vec.shape[0] != n:
        raise ValueError(f"{name} has length {vec.shape[0]} but {owner} has {n} rows")
    if vec.device != device:
        raise ValueError(f"{name} is on {vec.device} but embeddings are on {device}")


def check_finite(name: str, emb: torch.Tensor, distance: str) -> None:
    """Data-dependent checks, run eagerly inside the op (never traced).

    Reductions only, no [N, D] temporaries (the fused backends promise O(N)
    extra memory): min and max are finite iff no element is NaN or +-Inf
    (both propagate NaN), and a row is zero iff its inf-norm is 0.
    """
    if emb.numel() == 0:
        return
    lo, hi = torch.aminmax(emb)
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        raise ValueError(f"{name} contains NaN or Inf")
    if distance == "cosine":
        # Mining and the exact distances use |x|^2 in the compute dtype: a row
        # whose squared norm underflows there is as undefined as a zero row.
        norm = torch.linalg.vector_norm(emb, dim=1, dtype=compute_dtype(emb.dtype))
        zero = (norm * norm == 0).nonzero()
        if zero.numel():
            raise ValueError(
                f"cosine distance is undefined for zero vectors: {name} row "
                f"{int(zero[0, 0])} has norm 0 (or a norm whose square underflows in "
                f"{compute_dtype(emb.dtype)})")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
