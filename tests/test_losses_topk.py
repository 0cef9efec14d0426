"""Top-k and distance-weighted losses (issue #17): TripletMarginLoss / MarginLoss with
k_pos x k_neg triplets per anchor and neg_strategy="distance_weighted".

The expected values are computed here from the picks of the readable reference
(``fastmine.reference_topk.mine_topk``) by an explicit loop over each anchor's
triplets, with distances written out per pair; float64 values and gradients
must agree.  k = 1 must equal the one-triplet-per-anchor loss written from
``fastmine.mine``'s outputs bit for bit.  Backends: every available backend
whose rules include "topk" (and "distance_weighted" for the sampler), so new
kernels join automatically.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastmine
from fastmine import _backends, _philox, losses
from fastmine import reference_topk as rt

TOPK = [b for b in fastmine.available_backends() if "topk" in _backends.get(b).rules]
DW = [b for b in TOPK if "distance_weighted" in _backends.get(b).rules]
ALL = fastmine.available_backends()

# (pos, neg, distance, semihard_margin): every rule, each distance at least once
RULES = [("easy", "hard", "euclidean", None), ("hard", "easy", "squared_euclidean", None),
         ("easy", "semihard", "cosine", None), ("hard", "semihard", "euclidean", 0.4),
         ("easy", "distance_weighted", "euclidean", None),
         ("hard", "distance_weighted", "euclidean", None)]
KS = [(2, 3), (4, 1), (1, 5)]
SEED = 20261203
CUTOFF, NZLC = 0.6, 1.5  # not the defaults: the loss must pass its own settings through
MARGIN = 0.3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems: one intra-op thread, so a loaded machine's OpenMP
    contention cannot dominate (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(n=16, d=4, classes=4, seed=0, m=None):
    """Unit rows (the sampler's domain; the deterministic rules do not care),
    few classes so that k_pos > a row's positives leaves -1 slots."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, classes, (n,), generator=g)
    if m is None:
        return x, y, None, None
    r = F.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    return x, y, r, torch.randint(0, classes, (m,), generator=g)


def _settings(pos, neg, distance, shm, k_pos, k_neg):
    kw = dict(pos_strategy=pos, neg_strategy=neg, distance=distance, k_pos=k_pos, k_neg=k_neg)
    if neg == "distance_weighted":
        kw.update(cutoff=CUTOFF, nonzero_loss_cutoff=NZLC, seed=SEED)
    return kw


def _picks(x, y, r, ry, pos, neg, distance, shm, k_pos, k_neg):
    """The reference's indices (no gradient), for the explicit formulas below."""
    kw = _settings(pos, neg, distance, shm, k_pos, k_neg)
    res = rt.mine_topk(x.detach(), y, None if r is None else r.detach(), ry, margin=shm, **kw)
    return res.pos_idx, res.neg_idx


def _d(a, b, distance):
    """One pair's distance, written out (differentiable, float64)."""
    if distance == "cosine":
        return 1 - (a * b).sum() / (a.norm() * b.norm())
    d2 = ((a - b) ** 2).sum()
    return d2 if distance == "squared_euclidean" else d2.sqrt()


def _triplets(x, refs, pos_idx, neg_idx):
    """Every (i, p, n) with both slots filled, anchor by anchor, slot by slot."""
    out = []
    for i in range(x.shape[0]):
        for p in pos_idx[i].tolist():
            for n in neg_idx[i].tolist():
                if p >= 0 and n >= 0:
                    out.append((i, p, n))
    return out


def _reduce(terms, reduction, average_nonzero):
    t = torch.stack(terms)
    if reduction == "sum":
        return t.sum()
    if average_nonzero:
        nz = t[t > 0]
        return nz.sum() / max(nz.numel(), 1)
    return t.mean()


def _explicit_triplet_loss(x, refs, pos_idx, neg_idx, distance, reduction, average_nonzero):
    terms = [torch.relu(_d(x[i], refs[p], distance) - _d(x[i], refs[n], distance) + MARGIN)
             for i, p, n in _triplets(x, refs, pos_idx, neg_idx)]
    return _reduce(terms, reduction, average_nonzero)


@pytest.mark.parametrize("backend", TOPK)
@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r[0]}-{r[1]}-{r[2]}-{r[3]}")
@pytest.mark.parametrize("k_pos,k_neg", KS)
@pytest.mark.parametrize("reduction,average_nonzero", [("mean", False), ("mean", True),
                                                       ("sum", False)])
@pytest.mark.parametrize("refs", [False, True])
def test_triplet_value_and_grad_against_explicit_triplets(backend, rule, k_pos, k_neg,
                                                          reduction, average_nonzero, refs):
    pos, neg, distance, shm = rule
    if neg == "distance_weighted" and backend not in DW:
        pytest.skip(f"{backend} has top-k but not distance_weighted")
    x, y, r, ry = _data(seed=k_pos * 10 + k_neg, m=11 if refs else None)
    pos_idx, neg_idx = _picks(x, y, r, ry, pos, neg, distance, shm, k_pos, k_neg)
    loss = losses.TripletMarginLoss(margin=MARGIN, semihard_margin=shm, reduction=reduction,
                                    average_nonzero=average_nonzero, backend=backend,
                                    **_settings(pos, neg, distance, shm, k_pos, k_neg))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    r1 = r2 = None
    if refs:
        r1, r2 = r.clone().requires_grad_(), r.clone().requires_grad_()
    out = loss(x1, y, r1, ry)
    exp = _explicit_triplet_loss(x2, x2 if r2 is None else r2, pos_idx, neg_idx, distance,
                                 reduction, average_nonzero)
    assert exp > 0
    (out * 1.7).backward()
    (exp * 1.7).backward()
    torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-13)
    if refs:
        torch.testing.assert_close(r1.grad, r2.grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("backend", TOPK)
@pytest.mark.parametrize("rule", [("easy", "hard", "euclidean", None),
                                  ("hard", "semihard", "cosine", None), RULES[4]],
                         ids=lambda r: f"{r[0]}-{r[1]}-{r[2]}")
@pytest.mark.parametrize("num_classes", [None, 4])
@pytest.mark.parametrize("average_nonzero", [False, True])
def test_margin_value_and_grad_against_explicit_triplets(backend, rule, num_classes,
                                                         average_nonzero):
    pos, neg, distance, shm = rule
    if neg == "distance_weighted" and backend not in DW:
        pytest.skip(f"{backend} has top-k but not distance_weighted")
    k_pos, k_neg = 2, 3
    x, y, _, _ = _data(seed=5)
    pos_idx, neg_idx = _picks(x, y, None, None, pos, neg, distance, shm, k_pos, k_neg)
    fn = losses.MarginLoss(margin=0.2, beta=0.9, learn_beta=True, num_classes=num_classes,
                           nu=0.05, average_nonzero=average_nonzero, backend=backend,
                           **_settings(pos, neg, distance, shm, k_pos, k_neg)).double()
    with torch.no_grad():  # distinct per-class betas
        fn.beta.add_(torch.linspace(0, 0.5, fn.beta.numel(), dtype=torch.float64))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = fn(x1, y)
    (out * 3.1).backward()

    beta = fn.beta.detach().clone().requires_grad_()
    trip = _triplets(x2, x2, pos_idx, neg_idx)
    terms, betas = [], []
    for i, p, n in trip:
        b = beta[y[i]] if num_classes else beta[0]
        betas.append(b)
        terms.append(torch.relu(_d(x2[i], x2[p], distance) - b + 0.2)
                     + torch.relu(b - _d(x2[i], x2[n], distance) + 0.2))
    exp = _reduce(terms, "mean", average_nonzero)
    # regulariser: nu * beta (global), or nu * mean of beta[label] over the triplets
    exp = exp + 0.05 * (torch.stack(betas).mean() if num_classes else beta.sum())
    (exp * 3.1).backward()
    torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(fn.beta.grad, beta.grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("backend", TOPK)
@pytest.mark.parametrize("cls", [losses.TripletMarginLoss, losses.MarginLoss])
def test_per_anchor_and_reduction_none_are_per_triplet(backend, cls):
    x, y, _, _ = _data(seed=9, classes=5)
    loss = cls(neg_strategy="hard", k_pos=3, k_neg=2, backend=backend)
    terms, valid = loss.per_anchor(x, y)
    assert terms.shape == valid.shape == (16, 3, 2) and valid.dtype == torch.bool
    res = fastmine.mine_topk(x, y, k_pos=3, k_neg=2, neg_strategy="hard", backend=backend)
    assert torch.equal(valid, (res.pos_idx >= 0)[:, :, None] & (res.neg_idx >= 0)[:, None, :])
    assert bool((~valid).any()) and bool((terms[~valid] == 0).all())
    none = cls(neg_strategy="hard", k_pos=3, k_neg=2, backend=backend, reduction="none")(x, y)
    assert torch.equal(none, terms)
    # "mean" counts valid triplets; "sum" adds them
    assert torch.equal(cls(neg_strategy="hard", k_pos=3, k_neg=2, backend=backend)(x, y),
                       terms.sum() / valid.sum())
    assert torch.equal(cls(neg_strategy="hard", k_pos=3, k_neg=2, backend=backend,
                           reduction="sum")(x, y), terms.sum())


# --- k = 1 is today's loss, bit for bit --------------------------------------------

def _old_triplet(x, y, backend, pos, neg, distance, shm, reduction, average_nonzero):
    """The one-triplet-per-anchor loss as it was written before top-k: from
    fastmine.mine's [N] outputs."""
    res = fastmine.mine(x, y, pos_strategy=pos, neg_strategy=neg, distance=distance,
                        margin=shm, backend=backend)
    terms = torch.where(res.valid, F.relu(res.pos_dist - res.neg_dist + MARGIN),
                        torch.zeros_like(res.pos_dist))
    return losses.reduce_terms(terms, res.valid, reduction, average_nonzero)


def _old_margin(x, y, backend, pos, neg, beta, nu):
    res = fastmine.mine(x, y, pos_strategy=pos, neg_strategy=neg, backend=backend)
    b = beta[y]  # gathered once for the terms, once for the regulariser, as before
    t = F.relu(res.pos_dist - b + 0.2) + F.relu(b - res.neg_dist + 0.2)
    terms = torch.where(res.valid, t, torch.zeros_like(t))
    out = losses.reduce_terms(terms, res.valid, "mean", False)
    b = beta[y]
    bv = torch.where(res.valid, b, torch.zeros_like(b))
    return out + nu * bv.sum() / res.valid.sum().clamp_min(1).to(b.dtype)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("rule", RULES[:4], ids=lambda r: f"{r[0]}-{r[1]}-{r[2]}-{r[3]}")
@pytest.mark.parametrize("reduction,average_nonzero", [("mean", False), ("mean", True),
                                                       ("sum", False)])
def test_k1_equals_the_one_triplet_loss_bit_for_bit(backend, rule, reduction, average_nonzero):
    pos, neg, distance, shm = rule
    x, y, _, _ = _data(n=24, seed=3)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = losses.TripletMarginLoss(margin=MARGIN, pos_strategy=pos, neg_strategy=neg,
                                   distance=distance, semihard_margin=shm, reduction=reduction,
                                   average_nonzero=average_nonzero, backend=backend, k_pos=1,
                                   k_neg=1)(x1, y)
    old = _old_triplet(x2, y, backend, pos, neg, distance, shm, reduction, average_nonzero)
    w = torch.tensor(1.3, dtype=torch.float64)
    (out * w).backward()
    (old * w).backward()
    assert torch.equal(out, old) and torch.equal(x1.grad, x2.grad)
    terms, valid = losses.TripletMarginLoss(margin=MARGIN, pos_strategy=pos, neg_strategy=neg,
                                            distance=distance, semihard_margin=shm,
                                            backend=backend).per_anchor(x, y)
    assert terms.shape == valid.shape == (24,)


@pytest.mark.parametrize("backend", ALL)
def test_k1_margin_loss_with_per_class_beta_bit_for_bit(backend):
    x, y, _, _ = _data(n=24, seed=4)
    fn = losses.MarginLoss(margin=0.2, beta=0.8, learn_beta=True, num_classes=4, nu=0.1,
                           pos_strategy="hard", neg_strategy="hard", backend=backend).double()
    beta = fn.beta.detach().clone().requires_grad_()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, old = fn(x1, y), _old_margin(x2, y, backend, "hard", "hard", beta, 0.1)
    out.backward()
    old.backward()
    assert torch.equal(out, old) and torch.equal(x1.grad, x2.grad)
    assert torch.equal(fn.beta.grad, beta.grad)


@pytest.mark.parametrize("backend", DW)
def test_k1_distance_weighted_is_mine_with_its_seed(backend):
    x, y, _, _ = _data(n=24, seed=6)
    res = fastmine.mine(x, y, neg_strategy="distance_weighted", cutoff=CUTOFF,
                        nonzero_loss_cutoff=NZLC, seed=SEED, backend=backend)
    terms = torch.where(res.valid, F.relu(res.pos_dist - res.neg_dist + MARGIN),
                        torch.zeros_like(res.pos_dist))
    t, v = losses.TripletMarginLoss(margin=MARGIN, neg_strategy="distance_weighted",
                                    cutoff=CUTOFF, nonzero_loss_cutoff=NZLC, seed=SEED,
                                    backend=backend).per_anchor(x, y)
    assert torch.equal(t, terms) and torch.equal(v, res.valid)


# --- the sampler's seed -----------------------------------------------------------

@pytest.mark.parametrize("backend", DW)
@pytest.mark.parametrize("cls", [losses.TripletMarginLoss, losses.MarginLoss])
def test_distance_weighted_seed_rules(backend, cls):
    x, y, _, _ = _data(n=24, seed=8, classes=3)
    kw = dict(neg_strategy="distance_weighted", k_pos=2, k_neg=3, reduction="none",
              backend=backend)
    # a fixed seed: the same noise at every call
    fixed = cls(seed=SEED, **kw)
    assert torch.equal(fixed(x, y), fixed(x, y))
    # seed=None: one seed per call from torch's default generator
    free = cls(**kw)
    torch.manual_seed(1)
    a = free(x, y)
    torch.manual_seed(1)
    b = free(x, y)
    torch.manual_seed(1)
    drawn = _philox.draw_seed()
    assert torch.equal(a, b) and torch.equal(a, cls(seed=drawn, **kw)(x, y))
    c = free(x, y)  # the generator moved on: other draws
    assert not torch.equal(a, c)
    picks = [fastmine.mine_topk(x, y, k_pos=2, k_neg=3, neg_strategy="distance_weighted",
                                seed=s, backend=backend).neg_idx for s in (1, 2)]
    assert not torch.equal(*picks)  # seeds matter (so the checks above can fail)


# --- arguments ------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [losses.TripletMarginLoss, losses.MarginLoss])
@pytest.mark.parametrize("kw,exc,match", [
    (dict(k_pos=0), ValueError, "k_pos"),
    (dict(k_neg=1.5), TypeError, "k_neg"),
    (dict(k_pos=True), TypeError, "k_pos"),
    (dict(neg_strategy="distance_weighted", distance="cosine"), ValueError, "distance"),
    (dict(neg_strategy="distance_weighted", cutoff=-0.1), ValueError, "cutoff"),
    (dict(neg_strategy="distance_weighted", nonzero_loss_cutoff=float("inf")), ValueError,
     "nonzero_loss_cutoff"),
    (dict(neg_strategy="distance_weighted", seed=-1), ValueError, "seed"),
    (dict(neg_strategy="distance_weighted", seed=0.5), TypeError, "seed"),
])
def test_bad_topk_arguments_name_the_argument(cls, kw, exc, match):
    with pytest.raises(exc, match=match):
        cls(**kw)


def test_topk_on_a_backend_without_the_rule_raises():
    without = [b for b in ALL if b not in TOPK]
    if not without:
        pytest.skip("every available backend has top-k")
    x, y, _, _ = _data()
    with pytest.raises(NotImplementedError, match="top-k"):
        losses.TripletMarginLoss(k_neg=2, backend=without[0])(x, y)


@pytest.mark.parametrize("cls", [losses.TripletMarginLoss, losses.MarginLoss])
def test_no_valid_triplet_is_zero_with_graph(cls):
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    out = cls(k_pos=2, k_neg=2, average_nonzero=True)(x, torch.arange(5))  # no positives
    out.backward()
    assert out.item() == 0 and bool((x.grad == 0).all())
