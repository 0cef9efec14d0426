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
