"""Hand-computed expected tables on 1-D embeddings, checked on every backend.

    index   0   1   2   3   4
    x       0   1   3   6  10
    label   0   0   1   0   1

Euclidean distances are |x_i - x_j|.  E.g. anchor 2 (x=3, label 1): its only
positive is 4 (d=7); its negatives are 0 (d=3), 1 (d=2), 3 (d=3), so the hard
negative is 1 and the easy (farthest) negative is the tie 0/3 -> 0 (smallest
index); no negative is farther than d_ap=7, so it has no semi-hard negative.
"""
import pytest
import torch

import fastmine

BACKENDS = fastmine.available_backends()
X = torch.tensor([[0.], [1.], [3.], [6.], [10.]], dtype=torch.float64)
Y = torch.tensor([0, 0, 1, 0, 1])

TABLE = [  # pos, neg, margin, expected pos_idx, expected neg_idx
    ("easy", "hard", None, [1, 0, 4, 1, 2], [2, 2, 1, 2, 3]),
    ("hard", "hard", None, [3, 3, 4, 0, 2], [2, 2, 1, 2, 3]),
    ("easy", "easy", None, [1, 0, 4, 1, 2], [4, 4, 0, 4, 0]),
    ("easy", "semihard", None, [1, 0, 4, 1, 2], [2, 2, -1, -1, 1]),
    ("easy", "semihard", 1.5, [1, 0, 4, 1, 2], [-1, 2, -1, -1, -1]),
    ("hard", "semihard", None, [3, 3, 4, 0, 2], [4, 4, -1, -1, 1]),
    ("hard", "semihard", 3.5, [3, 3, 4, 0, 2], [-1, -1, -1, -1, 1]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pos,neg,margin,want_pos,want_neg", TABLE)
def test_hand_table(backend, dtype, pos, neg, margin, want_pos, want_neg):
    res = fastmine.mine(X.to(dtype), Y, pos_strategy=pos, neg_strategy=neg, margin=margin,
                        backend=backend)
    assert res.pos_idx.tolist() == want_pos
    assert res.neg_idx.tolist() == want_neg
    assert res.valid.tolist() == [p >= 0 and n >= 0 for p, n in zip(want_pos, want_neg)]
    want_pd = [abs(X[i, 0] - X[j, 0]).item() if j >= 0 else 0.0 for i, j in enumerate(want_pos)]
    want_nd = [abs(X[i, 0] - X[j, 0]).item() if j >= 0 else 0.0 for i, j in enumerate(want_neg)]
    assert res.pos_dist.tolist() == want_pd
    assert res.neg_dist.tolist() == want_nd


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_squared_and_cosine(backend):
    sq = fastmine.mine(X, Y, distance="squared_euclidean", backend=backend)
    assert sq.pos_dist.tolist() == [1.0, 1.0, 49.0, 25.0, 49.0]
    # Cosine on 2-D unit-ish vectors at 0, 10, 80, 100 degrees; labels 0 0 1 1.
    ang = torch.tensor([0.0, 10.0, 80.0, 100.0], dtype=torch.float64).deg2rad()
    v = torch.stack([ang.cos(), ang.sin()], 1) * torch.tensor([[1.], [2.], [3.], [0.5]],
                                                              dtype=torch.float64)
    lab = torch.tensor([0, 0, 1, 1])
    cos = fastmine.mine(v, lab, distance="cosine", backend=backend)
    assert cos.pos_idx.tolist() == [1, 0, 3, 2]
    assert cos.neg_idx.tolist() == [2, 2, 1, 1]  # 80 deg is nearest to both 0 and 10
    want = 1 - torch.tensor([10.0, 10.0, 20.0, 20.0], dtype=torch.float64).deg2rad().cos()
    torch.testing.assert_close(cos.pos_dist, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_memory_bank_with_ids(backend):
    """Query x=0 (id 7) against a bank holding its own copy (id 7), a same-class
    sample at 2 and a different-class sample at 5."""
    q, ql, qid = torch.tensor([[0.]]), torch.tensor([0]), torch.tensor([7])
    bank = torch.tensor([[0.], [2.], [5.]])
    bl, bid = torch.tensor([0, 0, 1]), torch.tensor([7, 8, 9])
    with_ids = fastmine.mine(q, ql, bank, bl, query_ids=qid, ref_ids=bid, backend=backend)
    assert with_ids.pos_idx.tolist() == [1] and with_ids.pos_dist.tolist() == [2.0]
    no_ids = fastmine.mine(q, ql, bank, bl, backend=backend)  # PML's bug, by request
    assert no_ids.pos_idx.tolist() == [0] and no_ids.pos_dist.tolist() == [0.0]
