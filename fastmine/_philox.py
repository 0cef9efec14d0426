"""The random noise of distance-weighted sampling, defined once (docs/contract.md,
"Random sampling (distance-weighted)").

Counter-based Philox4x32-10 (Salmon et al., SC11, "Parallel random numbers: as
easy as 1, 2, 3"; the Random123 algorithm), keyed by a 64-bit ``seed`` and
counted by (anchor row i, reference row j):

    key     = (k0, k1)             = (seed mod 2^32, seed >> 32)
    counter = (c0, c1, c2, c3)     = (j >> 2, i, 0, 0)
    x_ij    = word (j & 3) of Philox4x32-10(counter, key)      (a uint32)

One Philox call yields four words, used by four consecutive reference rows
4q .. 4q+3 of one anchor (a quarter of the Philox work per pair).  This layout
is exactly what Triton's built-ins compute: ``tl.philox(seed, j >> 2, i, 0, 0)``
(counters as uint32) and ``tl.randint4x(seed, (i << 32) | (j >> 2))`` (int64
offset: low word -> c0, high word -> c1) both return the four words of the
counter above under the key (seed_lo, seed_hi).  Triton applies the Weyl key
bump after every round (the last bump is unused), Random123 before rounds 2..10:
the same function.

uint32 -> uniform, exact in float32, never 0 or 1 (the top 23 bits, centred):

    U = ((x >> 9) + 1/2) * 2^-23 = (2 (x >> 9) + 1) * 2^-24  in [2^-24, 1 - 2^-24]

(2 (x >> 9) + 1 < 2^24, so every U is a float32 and so is 1 - U).  Gumbel noise:

    g = -log(-log U)                  in [G_MIN, G_MAX] ~ [-2.81, 16.64]

Every function here is vectorised torch arithmetic (int64 tensors holding uint32
values, on any device), with no loop over elements: the round loop is the
only Python loop.  It is the executable form of the definition, used by the
``torch`` reference (``fastmine.reference_topk``) and by the tests that pin
the C++/CUDA/Triton implementations to it.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["PHILOX_M0", "PHILOX_M1", "PHILOX_W0", "PHILOX_W1", "PHILOX_ROUNDS", "U_MIN",
           "U_MAX", "G_MIN", "G_MAX", "split_seed", "draw_seed", "philox4x32", "pair_bits",
           "uniform_from_bits",
           "gumbel_from_uniform", "pair_uniform", "pair_gumbel"]

# Random123's constants: the two round multipliers and the Weyl key increments
# (golden ratio and sqrt(3) - 1, times 2^32).
PHILOX_M0 = 0xD2511F53  # multiplies c0
PHILOX_M1 = 0xCD9E8D57  # multiplies c2
PHILOX_W0 = 0x9E3779B9  # bumps k0
PHILOX_W1 = 0xBB67AE85  # bumps k1
PHILOX_ROUNDS = 10

_MASK32 = 0xFFFFFFFF
_U_BITS = 23  # U keeps the top 23 bits of x (x >> 9)
_U_SCALE = 2.0 ** -_U_BITS

# The range of the uniform and of the Gumbel noise (exact in float32).
U_MIN = 2.0 ** -24
U_MAX = 1.0 - 2.0 ** -24
# g = -log(-log U) is increasing in U, so g lies in [-2.81154, 16.63553] exactly
# (-log(-log 2^-24), -log(-log(1 - 2^-24))).  The bounds below are rounded
# outwards by >= 4e-3, far more than the few float32 ulps (~2e-6 at 16) by which
# a kernel's evaluation can miss the exact value: every computed g lies inside
# them.  A kernel may therefore skip the noise of a reference whose
# log-weight + G_MAX is below its current k-th key without changing any pick
# (docs/topk.md).
G_MIN = -2.82
G_MAX = 16.64

IntLike = Union[int, Tensor]


def split_seed(seed: int) -> Tuple[int, int]:
    """The Philox key of a 64-bit seed: (k0, k1) = (seed mod 2^32, seed >> 32).

    ``seed`` is a Python int in [0, 2^64) (a numpy/0-d tensor integer is
    accepted through ``int()``).  This is the split ``tl.philox`` does
    (``seed_lo``, ``seed_hi``).
    """
    seed = int(seed)
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}")
    return seed & _MASK32, seed >> 32


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """One 64-bit seed from ``generator`` (default: torch's default CPU generator).

    What ``seed=None`` means: two 32-bit draws, lo | hi << 32, so
    ``torch.manual_seed`` makes the sampling reproducible.  CPU only: it never
    touches (or synchronises) an accelerator.
    """
    lo, hi = torch.randint(0, 2 ** 32, (2,), dtype=torch.int64, generator=generator).tolist()
    return lo | (hi << 32)


def _mulhilo32(a: int, b: Tensor) -> Tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a * b, in int64 without overflow.

    a is a uint32 constant, b an int64 tensor of uint32 values.  With
    b = bh 2^16 + bl (bh, bl < 2^16):  a b = ph 2^16 + pl, ph = a bh < 2^48,
    pl = a bl < 2^48, so
        hi = floor((ph + floor(pl / 2^16)) / 2^16)      (< 2^32, no overflow)
        lo = (((ph mod 2^16) << 16) + pl) mod 2^32.
    """
    bh, bl = b >> 16, b & 0xFFFF
    ph, pl = a * bh, a * bl
    hi = (ph + (pl >> 16)) >> 16
    lo = (((ph & 0xFFFF) << 16) + pl) & _MASK32
    return hi, lo


def philox4x32(c0: IntLike, c1: IntLike, c2: IntLike, c3: IntLike, k0: IntLike, k1: IntLike,
               rounds: int = PHILOX_ROUNDS) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-``rounds`` of counter (c0, c1, c2, c3) under key (k0, k1).

    Every argument is a Python int or an int64 tensor of values in [0, 2^32);
    they broadcast together (e.g. counters [N, M] and keys [S, 1, 1] for S
    seeds at once).  Returns the four output words as int64 tensors of the
    broadcast shape, values in [0, 2^32), on the tensors' device (CPU when all
    are ints).  One round (Random123's philox4x32round; Triton's philox_impl):
        (hi0, lo0) = mulhilo(M0, c0),  (hi1, lo1) = mulhilo(M1, c2)
        c <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
    and the key is bumped by (W0, W1) mod 2^32 between rounds.
    """
    tensors = [t for t in (c0, c1, c2, c3, k0, k1) if isinstance(t, Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")

    def as_t(v: IntLike) -> Tensor:
        if isinstance(v, Tensor):
            if v.dtype != torch.int64:
                raise TypeError(f"philox4x32 takes int64 tensors, got {v.dtype}")
            return v
        return torch.tensor(int(v), dtype=torch.int64, device=device)

    c0, c1, c2, c3, k0, k1 = (as_t(v) for v in (c0, c1, c2, c3, k0, k1))
    c0, c1, c2, c3, k0, k1 = torch.broadcast_tensors(c0, c1, c2, c3, k0, k1)
    for r in range(rounds):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def pair_bits(seed_key: Tuple[IntLike, IntLike], rows: Tensor, cols: Tensor) -> Tensor:
    """x_ij: the uint32 word of pair (anchor row i, reference row j).

    seed_key: (k0, k1) from ``split_seed`` (ints, or int64 tensors that
        broadcast against rows/cols, e.g. [S, 1, 1] for S seeds).
    rows, cols: int64 tensors of row indices i, j >= 0 (< 2^32), broadcastable
        (e.g. [N, 1] and [1, M]).
    Returns int64, values in [0, 2^32), of the broadcast shape:
    word (j & 3) of Philox4x32-10((j >> 2, i, 0, 0), key).
    """
    k0, k1 = seed_key
    words = philox4x32(cols >> 2, rows, 0, 0, k0, k1)
    lane = (cols & 3).expand(torch.broadcast_shapes(words[0].shape, cols.shape))
    w = torch.stack(words, dim=-1)  # [..., 4]
    return w.gather(-1, lane.unsqueeze(-1).expand(*w.shape[:-1], 1)).squeeze(-1)


def uniform_from_bits(x: Tensor) -> Tensor:
    """U = ((x >> 9) + 1/2) 2^-23: uint32 values (int64 tensor) -> float32 in (0, 1).

    Exact: (x >> 9) < 2^23 converts exactly, + 1/2 and * 2^-23 are exact, so
    U = (2 (x >> 9) + 1) 2^-24 with U in [2^-24, 1 - 2^-24] (never 0 or 1,
    symmetric: 1 - U is also such a value).  Same shape as x.
    """
    return ((x >> 9).to(torch.float32) + 0.5) * _U_SCALE


def gumbel_from_uniform(u: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """g = -log(-log U), evaluated in ``dtype`` (float32: what the kernels do;
    float64: the reference's oracle).  U is exact in either, so the two differ
    only by the float32 rounding of the two logs (a few ulps).  Same shape as u.
    """
    u = u.to(dtype)
    return -torch.log(-torch.log(u))


def pair_uniform(seed: int, rows: Tensor, cols: Tensor) -> Tensor:
    """U_ij (float32, broadcast shape of rows and cols) for one seed; see pair_bits."""
    return uniform_from_bits(pair_bits(split_seed(seed), rows, cols))


def pair_gumbel(seed: int, rows: Tensor, cols: Tensor,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """g_ij = -log(-log U_ij) in ``dtype`` for one seed; see pair_bits."""
    return gumbel_from_uniform(pair_uniform(seed, rows, cols), dtype)
