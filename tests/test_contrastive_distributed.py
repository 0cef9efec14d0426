"""The contrastive losses under fastmine.distributed.DistributedLoss (2-process gloo).

SupConLoss and MultiSimilarityLoss expose ``per_anchor`` (their reductions are
means over anchors), NTXentLoss ``per_anchor`` with pair counts (its mean is
over positive pairs: DistributedLoss divides by the global pair count), so
DistributedLoss gives, under DDP gradient averaging, exactly the loss and
parameter gradients of one process on the concatenated batch (float64, 1e-10).
Also: ``per_anchor`` reproduces ``forward``.
"""
import pytest
import torch
from torch import nn

from _gloo import WORLD, run_ranks, single_process_group
from fastmine import contrastive as C
from fastmine.distributed import DistributedLoss

SLICES = (slice(0, 5), slice(5, 13))  # unequal local batches
LABELS = torch.tensor([0, 1, 2, 0, 3, 1, 2, 0, 1, 2, 3, 4, 1])  # class 4: a singleton
TOL = dict(atol=1e-10, rtol=1e-10)
CONFIGS = {  # name -> loss factory (each backend the machine has)
    "supcon_cpu": lambda: C.SupConLoss(temperature=0.5, backend="auto"),
    "supcon_chunked": lambda: C.SupConLoss(temperature=0.5, backend="chunked", block_size=3),
    "ms_mined": lambda: C.MultiSimilarityLoss(miner_epsilon=0.3, backend="auto", block_size=4),
    "ntxent_cpu": lambda: C.NTXentLoss(temperature=0.3, backend="auto"),
    "ntxent_chunked": lambda: C.NTXentLoss(temperature=0.3, backend="chunked", block_size=3),
}


def _inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randn(13, 6, generator=g, dtype=torch.float64)


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()


def _worker(rank):
    """One rank (in the gloo group of tests/_gloo.py): each config's value and gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    sl, x, out = SLICES[rank], _inputs(), {}
    for name, make in CONFIGS.items():
        net = DDP(_model())
        value = DistributedLoss(make())(net(x[sl]), LABELS[sl])
        value.backward()
        out[name] = (value.detach(), [p.grad.clone() for p in net.module.parameters()])
        del net
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_worker)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ddp_equals_one_process_on_the_concatenated_batch(ranks, name):
    net = _model()
    value = CONFIGS[name]()(net(_inputs()), LABELS)
    value.backward()
    assert float(value.detach()) > 0
    for r in range(WORLD):
        got_value, got_grads = ranks[r][name]
        torch.testing.assert_close(got_value, value.detach(), **TOL)
        for a, b in zip(got_grads, net.parameters()):
            torch.testing.assert_close(a, b.grad, **TOL)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_per_anchor_reproduces_forward(name):
    """The mean of the kept per-anchor terms (valid, and > 0 for SupCon) is forward,
    value and gradient; with a bank and ids too."""
    loss = CONFIGS[name]()
    g = torch.Generator().manual_seed(2)
    for args in ((LABELS,), (LABELS, torch.randn(7, 4, generator=g, dtype=torch.float64),
                             torch.tensor([0, 1, 1, 2, 5, 4, 0]))):
        emb = torch.randn(13, 4, generator=g, dtype=torch.float64, requires_grad=True)
        terms, valid, *counts = loss.per_anchor(emb, *args)
        keep = valid & (terms > 0) if loss.average_nonzero else valid
        # NT-Xent: the mean over pairs, the kept anchors' pair counts
        count = torch.where(keep, counts[0], 0).sum() if counts else keep.sum()
        mean = torch.where(keep, terms, torch.zeros_like(terms)).sum() / count.clamp_min(1)
        value = loss(emb, *args)
        torch.testing.assert_close(mean, value, **TOL)
        for a, b in zip(torch.autograd.grad(mean, emb), torch.autograd.grad(value, emb)):
            torch.testing.assert_close(a, b, **TOL)


def test_per_anchor_supcon_one_class_batch_is_invalid():
    """PML's batch-level condition: no negative pair -> no valid anchor (loss 0)."""
    emb = torch.randn(5, 3, dtype=torch.float64)
    terms, valid = C.SupConLoss().per_anchor(emb, torch.zeros(5, dtype=torch.int64))
    assert not valid.any() and not terms.any()


def test_ntxent_per_anchor_counts_are_the_positive_pairs():
    """counts = each anchor's positives (against a bank with ids too), so that the
    global denominator is the number of positive pairs; one-class and no-positive
    batches give loss 0 through the counts and terms alone (no batch-level flag)."""
    loss = C.NTXentLoss(temperature=0.3)
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(13, 4, generator=g, dtype=torch.float64)
    ref = torch.randn(7, 4, generator=g, dtype=torch.float64)
    ref_y = torch.tensor([0, 1, 1, 2, 5, 4, 0])
    qid, rid = torch.arange(13), torch.tensor([0, 3, 20, 21, 22, 23, 7])
    terms, valid, counts = loss.per_anchor(emb, LABELS, ref, ref_y, query_ids=qid, ref_ids=rid)
    same = (LABELS[:, None] == ref_y[None, :]) & (qid[:, None] != rid[None, :])
    assert torch.equal(counts, same.sum(dim=1)) and torch.equal(valid, counts > 0)
    assert bool((terms[~valid] == 0).all()) and bool((terms[valid] > 0).all())
    one_class = loss.per_anchor(emb[:4], torch.zeros(4, dtype=torch.int64))
    assert not one_class[0].any() and one_class[2].sum() == 12  # positives, no negative: 0
    singletons = loss.per_anchor(emb[:4], torch.arange(4))
    assert not singletons[0].any() and not singletons[1].any()


def test_distributed_loss_refuses_a_bad_per_anchor_tuple():
    class Bad(nn.Module):
        reduction = "mean"

        def per_anchor(self, embeddings, labels, ref_emb, ref_labels, *, query_ids, ref_ids):
            return embeddings.sum(dim=1), labels >= 0, labels, labels

    with single_process_group():
        with pytest.raises(TypeError, match="per_anchor must return"):
            DistributedLoss(Bad())(torch.randn(3, 2), torch.arange(3))
