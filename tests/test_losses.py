"""Loss values and gradients vs. a straightforward full-matrix implementation."""
import itertools

import pytest
import torch

import fastmine
from fastmine import losses

POS = ("easy", "hard")
NEG = ("hard", "semihard", "easy")
DIST = ("euclidean", "squared_euclidean", "cosine")


def _full_dist(x, r, distance):
    if distance == "cosine":
        return 1 - torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(r, dim=1).T
    d2 = ((x[:, None, :] - r[None, :, :]) ** 2).sum(-1)
    return d2 if distance == "squared_euclidean" else d2.sqrt()


def _pair_dist(a, b, distance):
    if distance == "cosine":
        return 1 - (torch.nn.functional.normalize(a, dim=1) * torch.nn.functional.normalize(b, dim=1)).sum(1)
    d2 = ((a - b) ** 2).sum(1)
    # clamp only guards invalid (self) pairs, whose terms are masked out
    return d2 if distance == "squared_euclidean" else d2.clamp_min(1e-300).sqrt()


def _naive_pairs(x, labels, distance, pos, neg):
    """Full-matrix mining (self-pairs excluded): returns d_ap, d_an, valid (differentiable)."""
    d = _full_dist(x.detach(), x.detach(), distance)
    n = x.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    same = (labels[:, None] == labels[None, :]) & ~eye
    diff = labels[:, None] != labels[None, :]
    inf = torch.tensor(float("inf"), dtype=x.dtype)
    dd = d.detach()
    if pos == "easy":
        pi = torch.where(same, dd, inf).argmin(1)
    else:
        pi = torch.where(same, dd, -inf).argmax(1)
    has_p = same.any(1)
    d_ap = _pair_dist(x, x[pi], distance)
    if neg == "hard":
        cand = diff
        ni = torch.where(cand, dd, inf).argmin(1)
    elif neg == "semihard":
        cand = diff & (dd > d_ap.detach()[:, None]) & has_p[:, None]
        ni = torch.where(cand, dd, inf).argmin(1)
    else:
        cand = diff
        ni = torch.where(cand, dd, -inf).argmax(1)
    d_an = _pair_dist(x, x[ni], distance)
    valid = has_p & cand.any(1)
    return d_ap, d_an, valid


def _data(n=24, d=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


@pytest.mark.parametrize("pos,neg,distance", list(itertools.product(POS, NEG, DIST)))
def test_triplet_value_and_grad(pos, neg, distance):
    x, y = _data(seed=hash((pos, neg, distance)) % 1000)
    w = torch.rand(x.shape[0], dtype=torch.float64) * 3 + 0.5  # upstream grad != 1
    loss_fn = losses.TripletMarginLoss(margin=0.3, distance=distance, pos_strategy=pos,
                                       neg_strategy=neg, reduction="none", backend="cpu")
    x1 = x.clone().requires_grad_()
    terms = loss_fn(x1, y)
    (terms * w).sum().backward()

    x2 = x.clone().requires_grad_()
    d_ap, d_an, valid = _naive_pairs(x2, y, distance, pos, neg)
    ref = torch.where(valid, torch.relu(d_ap - d_an + 0.3), torch.zeros_like(d_ap))
    (ref * w).sum().backward()
    torch.testing.assert_close(terms, ref)
    torch.testing.assert_close(x1.grad, x2.grad)

    # mean over valid anchors, scaled upstream
    x3 = x.clone().requires_grad_()
    m = losses.TripletMarginLoss(margin=0.3, distance=distance, pos_strategy=pos,
                                 neg_strategy=neg, backend="cpu")(x3, y)
    (m * 3.7).backward()
    x4 = x.clone().requires_grad_()
    d_ap, d_an, valid = _naive_pairs(x4, y, distance, pos, neg)
    r = torch.relu(d_ap - d_an + 0.3)[valid].mean()
    (r * 3.7).backward()
    torch.testing.assert_close(m, r)
    torch.testing.assert_close(x3.grad, x4.grad)


@pytest.mark.parametrize("pos,neg,distance", [("easy", "semihard", "euclidean"),
                                              ("hard", "hard", "cosine"),
                                              ("easy", "easy", "squared_euclidean")])
@pytest.mark.parametrize("num_classes", [None, 4])
def test_margin_loss_value_and_grad(pos, neg, distance, num_classes):
    x, y = _data(seed=7)
    kw = dict(margin=0.2, beta=0.9, learn_beta=True, num_classes=num_classes, nu=0.05,
              pos_strategy=pos, neg_strategy=neg, distance=distance, backend="cpu")
    fn = losses.MarginLoss(**kw).double()
    with torch.no_grad():  # distinct per-class betas
        fn.beta.add_(torch.rand(fn.beta.shape, dtype=fn.beta.dtype) * 0.5)
    x1 = x.clone().requires_grad_()
    out = fn(x1, y)
    (out * 3.7).backward()

    beta = fn.beta.detach().clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    d_ap, d_an, valid = _naive_pairs(x2, y, distance, pos, neg)
    b = beta[y] if num_classes else beta.expand(len(y))
    t = torch.relu(d_ap - b + 0.2) + torch.relu(b - d_an + 0.2)
    ref = t[valid].mean() + (0.05 * b[valid].mean() if num_classes else 0.05 * beta.sum())
    (ref * 3.7).backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(fn.beta.grad, beta.grad)


def test_average_nonzero_and_sum():
    x, y = _data(seed=3)
    t, v = losses.TripletMarginLoss(margin=0.05, backend="cpu").per_anchor(x, y)
    assert (t[~v] == 0).all()
    nz = losses.reduce_terms(t, v, "mean", average_nonzero=True)
    assert torch.allclose(nz, t[t > 0].mean())
    assert torch.allclose(losses.reduce_terms(t, v, "sum"), t.sum())
    assert torch.allclose(losses.reduce_terms(t, v, "mean"), t[v].mean())
    f = losses.triplet_margin_loss(x, y, margin=0.05, backend="cpu")
    assert torch.allclose(f, t[v].mean())


@pytest.mark.parametrize("cls", [losses.TripletMarginLoss, losses.MarginLoss])
@pytest.mark.parametrize("avg", [False, True])
def test_no_valid_anchor_is_zero_with_graph(cls, avg):
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.arange(5)  # no positives anywhere
    out = cls(backend="cpu", average_nonzero=avg)(x, y)
    assert out.requires_grad and out.item() == 0.0
    out.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="reduction"):
        losses.TripletMarginLoss(reduction="avg")
    with pytest.raises(ValueError, match="distance"):
        losses.MarginLoss(distance="l1")


def test_loss_multiblock_batch_with_grad():
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(300, 8, requires_grad=True)
        y = torch.randint(0, 20, (300,))
        losses.TripletMarginLoss(backend="cpu")(x, y).backward()
    finally:
        torch.set_num_threads(prev)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("distance", DIST)
def test_triplet_with_refs_and_ids(distance):
    """Separate references with sample ids: grads reach both inputs; same-id pairs excluded."""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(10, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=g)
    r = torch.randn(14, 5, generator=g, dtype=torch.float64)
    ry = torch.randint(0, 3, (14,), generator=g)
    qid, rid = torch.arange(10), torch.randint(0, 10, (14,), generator=g)
    x1, r1 = x.clone().requires_grad_(), r.clone().requires_grad_()
    fn = losses.TripletMarginLoss(margin=0.4, distance=distance, neg_strategy="hard", backend="cpu")
    (fn(x1, y, r1, ry, query_ids=qid, ref_ids=rid) * 2.3).backward()

    x2, r2 = x.clone().requires_grad_(), r.clone().requires_grad_()
    d = _full_dist(x, r, distance)
    inf = torch.tensor(float("inf"), dtype=x.dtype)
    same = (y[:, None] == ry[None, :]) & (qid[:, None] != rid[None, :])
    diff = (y[:, None] != ry[None, :]) & (qid[:, None] != rid[None, :])
    pi = torch.where(same, d, inf).argmin(1)
    ni = torch.where(diff, d, inf).argmin(1)
    valid = same.any(1) & diff.any(1)
    t = torch.relu(_pair_dist(x2, r2[pi], distance) - _pair_dist(x2, r2[ni], distance) + 0.4)
    (t[valid].mean() * 2.3).backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(r1.grad, r2.grad)


# --- constructors validate their arguments (issue: errors at the first forward) -----

@pytest.mark.parametrize("make,exc,match", [
    (lambda: losses.TripletMarginLoss(neg_strategy="hard", semihard_margin=0.2), ValueError,
     "semihard_margin is only used by neg_strategy='semihard'"),
    (lambda: losses.TripletMarginLoss(semihard_margin=-0.1), ValueError, "semihard_margin must be > 0"),
    (lambda: losses.TripletMarginLoss(margin=float("nan")), ValueError, "margin must be finite"),
    (lambda: losses.TripletMarginLoss(margin=-1), ValueError, "margin must be >= 0"),
    (lambda: losses.TripletMarginLoss(margin="0.1"), TypeError, "margin must be a real number"),
    (lambda: losses.TripletMarginLoss(pos_strategy="medium"), ValueError, "pos_strategy must be one of"),
    (lambda: losses.TripletMarginLoss(neg_strategy=["hard"]), ValueError, "neg_strategy must be one of"),
    (lambda: losses.TripletMarginLoss(backend="metal"), ValueError, "unknown backend 'metal'"),
    (lambda: losses.TripletMarginLoss(reduction="avg"), ValueError, "reduction must be one of"),
    (lambda: losses.MarginLoss(num_classes=2.5), TypeError, "num_classes must be an integer"),
    (lambda: losses.MarginLoss(num_classes=0), ValueError, "num_classes must be >= 1"),
    (lambda: losses.MarginLoss(num_classes=True), TypeError, "num_classes must be an integer"),
    (lambda: losses.MarginLoss(margin=-0.2), ValueError, "margin must be >= 0"),
    (lambda: losses.MarginLoss(beta=float("inf")), ValueError, "beta must be finite"),
    (lambda: losses.MarginLoss(nu=-1.0), ValueError, "nu must be >= 0"),
    (lambda: losses.MarginLoss(distance="manhattan"), ValueError, "distance must be one of"),
    (lambda: fastmine.miners.BatchEasyHardMiner(backend="metal"), ValueError, "unknown backend"),
    (lambda: fastmine.miners.BatchEasyHardMiner(pos_strategy=["easy"]), ValueError, "pos_strategy"),
])
def test_constructors_validate(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_constructors_accept_numpy_and_tensor_numbers():
    import numpy as np
    loss = losses.TripletMarginLoss(margin=np.float32(0.2), semihard_margin=torch.tensor(0.5))
    assert isinstance(loss.margin, float) and loss.semihard_margin == 0.5
    assert losses.MarginLoss(num_classes=np.int64(3)).beta.shape == (3,)


@pytest.mark.parametrize("bad", [-1, 3])
def test_margin_loss_per_class_beta_checks_label_range(bad):
    loss = losses.MarginLoss(num_classes=3, backend="torch")
    x = torch.randn(6, 4)
    y = torch.tensor([0, 0, 1, 1, bad, bad])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes\) = \[0, 3\).*"
                                         f"got label {bad}"):
        loss(x, y)
