"""Property-based tests (hypothesis): exact agreement with the reference on
integer-valued embeddings, where every Euclidean distance is exact in float64
and ties are genuine, so indices (not just distances) must match."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import fastmine

BACKENDS = [b for b in fastmine.available_backends() if b != "torch"]
EXAMPLES = {"triton": 8}  # the Triton interpreter is slow


@st.composite
def problems(draw):
    n = draw(st.integers(0, 24))
    m = draw(st.integers(0, 20))
    d = draw(st.integers(1, 5))
    classes = draw(st.integers(1, 4))
    lo, hi = -3, 3
    x = torch.tensor(draw(st.lists(st.integers(lo, hi), min_size=n * d, max_size=n * d)),
                     dtype=torch.float64).reshape(n, d)
    y = torch.tensor(draw(st.lists(st.integers(0, classes - 1), min_size=n, max_size=n)),
                     dtype=torch.int64)
    use_refs = draw(st.booleans())
    kw = {}
    if use_refs:
        r = torch.tensor(draw(st.lists(st.integers(lo, hi), min_size=m * d, max_size=m * d)),
                         dtype=torch.float64).reshape(m, d)
        ry = torch.tensor(draw(st.lists(st.integers(0, classes - 1), min_size=m, max_size=m)),
                          dtype=torch.int64)
        if draw(st.booleans()):  # ids drawn from a small range: some pairs are "the same sample"
            kw["query_ids"] = torch.tensor(draw(st.lists(st.integers(0, 6), min_size=n, max_size=n)),
                                           dtype=torch.int64)
            kw["ref_ids"] = torch.tensor(draw(st.lists(st.integers(0, 6), min_size=m, max_size=m)),
                                         dtype=torch.int64)
    else:
        r = ry = None
    kw["distance"] = draw(st.sampled_from(["euclidean", "squared_euclidean"]))
    kw["pos_strategy"] = draw(st.sampled_from(["easy", "hard"]))
    kw["neg_strategy"] = draw(st.sampled_from(["hard", "semihard", "easy"]))
    if kw["neg_strategy"] == "semihard" and draw(st.booleans()):
        kw["margin"] = draw(st.sampled_from([0.5, 1.5, 4.5]))  # never hits an integer boundary
    return x, y, r, ry, kw


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_embeddings_match_reference_exactly(backend):
    @settings(max_examples=EXAMPLES.get(backend, 150), deadline=None)
    @given(problems())
    def check(p):
        x, y, r, ry, kw = p
        want = fastmine.mine(x, y, r, ry, backend="torch", **kw)
        for dtype in (torch.float64, torch.float32):  # small integers are exact in fp32 too
            got = fastmine.mine(x.to(dtype), y, None if r is None else r.to(dtype), ry,
                                backend=backend, **kw)
            assert torch.equal(got.pos_idx, want.pos_idx), (dtype, kw)
            assert torch.equal(got.neg_idx, want.neg_idx), (dtype, kw)
            torch.testing.assert_close(got.pos_dist.double(), want.pos_dist)
            torch.testing.assert_close(got.neg_dist.double(), want.neg_dist)

    check()
