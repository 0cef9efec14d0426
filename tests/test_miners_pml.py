"""fastmine.miners as a drop-in for pytorch-metric-learning's batch miners."""
import pytest
import torch

from fastmine import miners

pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_dist = pytest.importorskip("pytorch_metric_learning.distances")


def _data(seed, n=40, d=8, classes=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def _pml_distance(name):
    return pml_dist.LpDistance() if name == "euclidean" else pml_dist.CosineSimilarity()


def _pair_d(dist, x, r, a, b):
    return dist(x, r)[a, b]


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("pos,neg", [("easy", "hard"), ("easy", "semihard"), ("hard", "hard"),
                                     ("hard", "easy"), ("easy", "easy")])
@pytest.mark.parametrize("refs", [False, True])
def test_easy_hard_matches_pml(distance, pos, neg, refs):
    x, y = _data(hash((distance, pos, neg, refs)) % 997)
    r, ry = (_data(5, n=30)) if refs else (None, None)
    ours = miners.BatchEasyHardMiner(pos, neg, distance=distance, backend="cpu")(x, y, r, ry)
    theirs = pml_miners.BatchEasyHardMiner(pos, neg, distance=_pml_distance(distance))(x, y, r, ry)
    dist = _pml_distance(distance)
    ref = x if r is None else r
    # same anchors (validity has no near-ties), same distances
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[2], theirs[2])
    torch.testing.assert_close(_pair_d(dist, x, ref, ours[0], ours[1]), _pair_d(dist, x, ref, theirs[0], theirs[1]))
    torch.testing.assert_close(_pair_d(dist, x, ref, ours[2], ours[3]), _pair_d(dist, x, ref, theirs[2], theirs[3]))
    # fed to PML losses: identical loss values
    for loss in (pml_losses.TripletMarginLoss(margin=0.2, distance=_pml_distance(distance)),
                 pml_losses.MarginLoss(distance=_pml_distance(distance))):
        torch.testing.assert_close(loss(x, y, ours, r, ry), loss(x, y, theirs, r, ry))


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_batch_hard_matches_pml(distance):
    x, y = _data(11)
    ours = miners.BatchHardMiner(distance=distance, backend="cpu")(x, y)
    theirs = pml_miners.BatchHardMiner(distance=_pml_distance(distance))(x, y)
    assert len(ours) == 3 and torch.equal(ours[0], theirs[0])
    dist = _pml_distance(distance)
    for k in (1, 2):
        torch.testing.assert_close(_pair_d(dist, x, x, ours[0], ours[k]), _pair_d(dist, x, x, theirs[0], theirs[k]))
    loss = pml_losses.TripletMarginLoss(distance=_pml_distance(distance))
    torch.testing.assert_close(loss(x, y, ours), loss(x, y, theirs))


def test_unsupported_options_raise():
    with pytest.raises(ValueError, match="all"):
        miners.BatchEasyHardMiner(neg_strategy="all")
    with pytest.raises(ValueError, match="semihard"):
        miners.BatchEasyHardMiner(pos_strategy="semihard", neg_strategy="hard")
    with pytest.raises(ValueError, match="allowed_pos_range"):
        miners.BatchEasyHardMiner(allowed_pos_range=(0, 1))
    with pytest.raises(ValueError, match="distance"):
        miners.BatchHardMiner(distance="dot")


def test_fastmine_does_not_import_pml():
    import subprocess, sys
    code = ("import sys, fastmine, fastmine.miners, fastmine.losses, fastmine.memory;"
            "assert 'pytorch_metric_learning' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- DistanceWeightedMiner (issue #17) ----------------------------------------------------

import torch.nn.functional as F  # noqa: E402

import fastmine  # noqa: E402
from fastmine import _backends, losses  # noqa: E402
from test_topk_reference import _chi2_pvalue  # noqa: E402  (the one chi-square helper)

DW = [b for b in fastmine.available_backends()
      if "distance_weighted" in _backends.get(b).rules]
SEED = 424242


def _unit(seed, n=30, d=4, classes=4):
    x, y = _data(seed, n=n, d=d, classes=classes)
    return F.normalize(x, dim=1), y


def _combos(res):
    """Every (i, p, n) of mine_topk's filled slots, anchor, then p slot, then n slot."""
    return [(i, p, n) for i in range(res.pos_idx.shape[0]) for p in res.pos_idx[i].tolist()
            for n in res.neg_idx[i].tolist() if p >= 0 and n >= 0]


@pytest.mark.parametrize("backend", DW)
@pytest.mark.parametrize("refs", [False, True])
@pytest.mark.parametrize("k_pos,k_neg", [(1, 1), (2, 3)])
def test_dw_miner_triplets_respect_labels_self_and_format(backend, refs, k_pos, k_neg):
    x, y = _data(31, n=30, d=4, classes=4)  # not normalised: the miner normalises
    r, ry = _data(32, n=25, d=4, classes=4) if refs else (None, None)
    miner = miners.DistanceWeightedMiner(k_pos=k_pos, k_neg=k_neg, seed=SEED, backend=backend)
    a, p, n = miner(x, y, r, ry)
    assert a.dtype == p.dtype == n.dtype == torch.int64 and len(a) == len(p) == len(n) > 0
    ref, rlab = (x, y) if r is None else (r, ry)
    assert (y[a] == rlab[p]).all() and (y[a] != rlab[n]).all()
    if not refs:
        assert (a != p).all()
    # w > 0 only below the nonzero-loss cutoff (on the normalised rows)
    xn, rn = F.normalize(x, dim=1), F.normalize(ref, dim=1)
    assert ((xn[a] - rn[n]).norm(dim=1) < 1.4).all()
    # exactly the combinations of mine_topk's picks on the normalised rows
    res = fastmine.mine_topk(xn, y, None if r is None else rn, ry, k_pos=k_pos, k_neg=k_neg,
                             neg_strategy="distance_weighted", seed=SEED, backend=backend)
    assert list(zip(a.tolist(), p.tolist(), n.tolist())) == _combos(res)
    if k_neg > 1:  # drawn without replacement
        assert bool((res.neg_idx[:, 0] != res.neg_idx[:, 1]).all() | (res.neg_idx[:, 1] < 0).all())


@pytest.mark.parametrize("backend", DW)
def test_dw_miner_excludes_same_sample_pairs_with_ids(backend):
    x, y = _data(33, n=20, d=4, classes=3)
    ids = torch.arange(20) % 10  # rows i and i + 10 are one sample
    a, p, n = miners.DistanceWeightedMiner(k_pos=3, k_neg=2, seed=SEED, backend=backend)(
        x, y, x, y, query_ids=ids, ref_ids=ids)
    assert len(a) > 0 and (ids[a] != ids[p]).all() and (ids[a] != ids[n]).all()


def _dw_problem(d=4, per_anchor=(0.3, 0.7, 0.9, 1.1, 1.3, 1.6)):
    """Two unit anchors (class 0); for each, references of class 1 at the chord
    distances ``per_anchor`` from it (below the cutoff 0.5, between, and beyond
    the nonzero-loss cutoff 1.4), plus one class-0 positive each."""
    g = torch.Generator().manual_seed(7)
    anchors = F.normalize(torch.randn(2, d, generator=g, dtype=torch.float64), dim=1)
    refs = []
    for a in anchors:
        for dist in per_anchor + (0.2,):  # the last: the positive
            u = torch.randn(d, generator=g, dtype=torch.float64)
            u = F.normalize(u - (u @ a) * a, dim=0)
            theta = 2 * torch.asin(torch.tensor(dist / 2, dtype=torch.float64))
            refs.append(torch.cos(theta) * a + torch.sin(theta) * u)
    refs = torch.stack(refs)
    k = len(per_anchor) + 1
    ref_labels = torch.tensor(([1] * (k - 1) + [0]) * 2)
    return anchors, refs, ref_labels


def _dw_law(anchors, refs, ref_labels, dim, clamp=True, zero_far=True, cutoff=0.5, nzlc=1.4):
    """P(negative = j | anchor), written from Wu et al.'s density:
    w = d^(2 - dim) (1 - d^2/4)^((3 - dim)/2), d clamped below at the cutoff,
    w = 0 at d >= nonzero_loss_cutoff; other-class references only."""
    d = torch.cdist(anchors, refs)
    dc = d.clamp_min(cutoff) if clamp else d
    w = dc ** (2 - dim) * (1 - dc ** 2 / 4) ** ((3 - dim) / 2)
    if zero_far:
        w = torch.where(d < nzlc, w, torch.zeros_like(w))
    w = torch.where(ref_labels[None, :] != 0, w, torch.zeros_like(w))
    return w / w.sum(1, keepdim=True)


@pytest.mark.parametrize("backend", DW)
def test_dw_miner_negative_law_matches_the_weights(backend):
    """R copies of each anchor are R independent draws (the noise is counted by
    anchor row), so one call samples the law R times.  Chi-square per anchor
    against the exact law (p > 1e-3), and the same counts must reject the law
    with exponent D + 1, without the cutoff clamp and without the
    nonzero-loss cutoff (so the test can fail)."""
    D, R = 4, 3000
    anchors, refs, ref_labels = _dw_problem(D)
    x = anchors.repeat(R, 1)  # row q is a copy of anchor q % 2
    miner = miners.DistanceWeightedMiner(k_neg=2, seed=SEED, backend=backend)
    a, p, n = miner(x, torch.zeros(2 * R, dtype=torch.long), refs, ref_labels)
    assert len(a) == 2 * 2 * R  # every copy: one positive, two negatives of positive weight
    first, second = n[0::2], n[1::2]  # slot order: the first draw, then the second
    assert torch.equal(a[0::2], torch.arange(2 * R)) and bool((first != second).all())
    m = refs.shape[0]
    law = _dw_law(anchors, refs, ref_labels, D)
    for q in range(2):
        counts = torch.bincount(first[q::2], minlength=m)
        assert int(counts[law[q] == 0].sum()) == 0  # never beyond the cutoff, never a positive
        assert _chi2_pvalue(counts, R * law[q])[0] > 1e-3
        for wrong in (dict(dim=D + 1), dict(dim=D, clamp=False), dict(dim=D, zero_far=False)):
            bad = _dw_law(anchors, refs, ref_labels, **wrong)
            assert _chi2_pvalue(counts, R * bad[q])[0] < 1e-6, wrong
        # the ordered pair: successive sampling without replacement, p_a p_b / (1 - p_a)
        pair = law[q][:, None] * law[q][None, :] / (1 - law[q][:, None]).clamp_min(1e-300)
        pair.fill_diagonal_(0)
        pc = torch.bincount(first[q::2] * m + second[q::2], minlength=m * m)
        assert _chi2_pvalue(pc, R * pair.flatten())[0] > 1e-3


@pytest.mark.parametrize("backend", DW)
def test_pml_losses_on_the_dw_miner_output(backend):
    """PML's TripletMarginLoss (AvgNonZeroReducer, normalised LpDistance) on the
    miner's triplets equals fastmine's TripletMarginLoss with the same sampler,
    seed and k, average_nonzero=True; PML's MarginLoss runs on them."""
    x, y = _data(35, n=40, d=6, classes=5)
    kw = dict(k_pos=2, k_neg=3, seed=SEED, backend=backend)
    trip = miners.DistanceWeightedMiner(**kw)(x, y)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    theirs = pml_losses.TripletMarginLoss(margin=0.2)(x1, y, trip)
    ours = losses.TripletMarginLoss(margin=0.2, neg_strategy="distance_weighted",
                                    normalize_embeddings=True, average_nonzero=True, **kw)(x2, y)
    assert theirs > 0
    theirs.backward()
    ours.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-8, atol=1e-10)
    margin = pml_losses.MarginLoss()(x, y, trip)
    assert torch.isfinite(margin) and margin > 0


@pytest.mark.parametrize("backend", DW)
def test_dw_miner_seed_none_follows_torch_manual_seed(backend):
    x, y = _unit(36)
    miner = miners.DistanceWeightedMiner(k_neg=2, backend=backend)
    torch.manual_seed(3)
    first = miner(x, y)
    torch.manual_seed(3)
    again = miner(x, y)
    other = miner(x, y)
    assert all(torch.equal(u, v) for u, v in zip(first, again))
    assert not all(torch.equal(u, v) for u, v in zip(first, other))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(distance="cosine"), ValueError, "distance"),
    (dict(k_neg=0), ValueError, "k_neg"),
    (dict(k_pos=2.0), TypeError, "k_pos"),
    (dict(cutoff=0), ValueError, "cutoff"),
    (dict(nonzero_loss_cutoff=float("nan")), ValueError, "nonzero_loss_cutoff"),
    (dict(seed=2 ** 64), ValueError, "seed"),
    (dict(pos_strategy="semihard"), ValueError, "pos_strategy"),
    (dict(t_per_anchor=3), ValueError, "t_per_anchor"),
    (dict(backend="nope"), ValueError, "backend"),
])
def test_dw_miner_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        miners.DistanceWeightedMiner(**kw)
