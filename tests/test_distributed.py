"""fastmine.distributed: gather and DistributedLoss under a real 2-process gloo group.

One spawn of two CPU processes in a gloo group (tests/_gloo.py) runs every
distributed scenario; each rank writes its results to a file, and
the tests below compare them with one process on the concatenated batch.

The global batch has 13 rows, rank 0 owns rows 0..4 and rank 1 rows 5..12
(unequal sizes), and class 4 has a single sample (row 11, an anchor with no
positive).  Everything is float64, so "exact" means agreement to ~1e-10.
"""
import pytest
import torch
import torch.distributed as dist
from torch import nn

import fastmine
from _gloo import WORLD, run_ranks
from fastmine import losses
from fastmine.distributed import DistributedLoss, gather

SIZES = (5, 8)
SLICES = (slice(0, 5), slice(5, 13))
LABELS = torch.tensor([0, 1, 2, 0, 3, 1, 2, 0, 1, 2, 3, 4, 1])  # class 4: singleton (row 11)
TOL = dict(atol=1e-10, rtol=1e-10)


def _inputs():
    """Global model inputs [13, 6] float64, labels [13]; plus a variant where row 12
    is the same dataset sample as row 2 (same input, label and id) on the other rank."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(13, 6, generator=g, dtype=torch.float64)
    x_dup, y_dup = x.clone(), LABELS.clone()
    x_dup[12], y_dup[12] = x[2], LABELS[2]
    ids_dup = torch.arange(13)
    ids_dup[12] = 2
    return x, x_dup, y_dup, ids_dup


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double()


class _WithLoss(nn.Module):
    """A model that owns its loss (and so its learnable beta) under one DDP."""

    def __init__(self, loss):
        super().__init__()
        self.model, self.loss = _model(), loss

    def forward(self, x, y, ids=None):
        if isinstance(self.loss, DistributedLoss):
            return self.loss(self.model(x), y, ids)
        return self.loss(self.model(x), y, query_ids=ids)


# name -> (loss factory, data: "plain" or "dup", layout: "ddp_model" | "ddp_both" | "ddp_separate")
CONFIGS = {
    "triplet_easy_hard_mean": (lambda: losses.TripletMarginLoss(
        margin=0.3, pos_strategy="easy", neg_strategy="hard", backend="cpu"), "plain", "ddp_model"),
    "triplet_semihard_nonzero_cosine": (lambda: losses.TripletMarginLoss(
        margin=0.2, pos_strategy="easy", neg_strategy="semihard", distance="cosine",
        average_nonzero=True, backend="cpu"), "plain", "ddp_model"),
    "triplet_hard_sum_sqeuclid": (lambda: losses.TripletMarginLoss(
        margin=0.5, pos_strategy="hard", neg_strategy="hard", distance="squared_euclidean",
        reduction="sum", backend="torch"), "plain", "ddp_model"),
    "margin_perclass_beta_in_ddp": (lambda: losses.MarginLoss(
        margin=0.2, beta=0.6, learn_beta=True, num_classes=5, nu=0.1, neg_strategy="hard",
        backend="cpu"), "plain", "ddp_both"),
    "margin_global_beta_own_ddp": (lambda: losses.MarginLoss(
        margin=0.2, beta=0.6, learn_beta=True, nu=0.1, neg_strategy="hard",
        backend="cpu"), "plain", "ddp_separate"),
    "triplet_dup_with_ids": (lambda: losses.TripletMarginLoss(
        margin=0.3, pos_strategy="easy", neg_strategy="hard", backend="cpu"), "dup", "ddp_model"),
    # top-k: the counts are triplets, and the per-class regulariser runs per triplet
    "triplet_topk_nonzero": (lambda: losses.TripletMarginLoss(
        margin=0.3, pos_strategy="hard", neg_strategy="hard", k_pos=2, k_neg=3,
        average_nonzero=True), "plain", "ddp_model"),
    "margin_topk_perclass_beta": (lambda: losses.MarginLoss(
        margin=0.2, beta=0.6, learn_beta=True, num_classes=5, nu=0.1, neg_strategy="easy",
        k_pos=3, k_neg=2), "plain", "ddp_both"),
}


def _params(layout, model_or_combined, loss):
    """Parameters in a fixed order: the model's, then the loss's."""
    if layout == "ddp_both":
        return list(model_or_combined.model.parameters()) + list(model_or_combined.loss.parameters())
    return list(model_or_combined.parameters()) + list(loss.parameters())


def _err(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test inspects type and message
        return f"{type(e).__name__}: {e}"
    return None


def _worker(rank):
    """One rank (in the gloo group of tests/_gloo.py): every scenario's results."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    sl = SLICES[rank]
    x, x_dup, y_dup, ids_dup = _inputs()
    out = {}

    # --- gather: order, values, dtypes, default ids
    e = torch.randn(13, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    lab32 = LABELS.to(torch.int32)
    out["gather_ids"] = gather(e[sl], lab32[sl], ids_dup[sl])
    out["gather_noids"] = gather(e[sl], lab32[sl])

    # --- gather backward: each rank weights the global rows differently; the owner
    # must receive the sum of every rank's gradient for its rows
    xl = e[sl].clone().requires_grad_()
    c = torch.randn(13, 4, generator=torch.Generator().manual_seed(100 + rank), dtype=torch.float64)
    (gather(xl, LABELS[sl]).embeddings * c).sum().backward()
    out["gather_grad"] = xl.grad

    # --- a rank with zero rows
    xl = (e[sl] if rank == 0 else e[:0]).clone().requires_grad_()
    g0 = gather(xl, LABELS[sl] if rank == 0 else LABELS[:0])
    (g0.embeddings * c[:5]).sum().backward()
    out["gather_empty"] = (g0.embeddings.detach(), g0.labels, g0.ids, g0.local, xl.grad)

    # --- errors are raised on every rank (no rank left waiting in a collective)
    out["err_dim"] = _err(lambda: gather(e[sl, : 3 + rank], LABELS[sl]))
    out["err_labels"] = _err(lambda: gather(e[sl], LABELS[sl][: 4 if rank == 1 else None]))
    out["err_ids"] = _err(lambda: gather(e[sl], LABELS[sl], ids_dup[sl] if rank == 0 else None))

    # --- mining on the gathered batch: what each local anchor selects (global indices)
    with torch.no_grad():
        emb = _model()(x_dup)
    for key, ids in (("mine_ids", ids_dup[sl]), ("mine_noids", None)):
        g = gather(emb[sl], y_dup[sl], ids)
        res = fastmine.mine(emb[sl], y_dup[sl], g.embeddings, g.labels, query_ids=g.ids[g.local],
                            ref_ids=g.ids, pos_strategy="easy", neg_strategy="hard")
        out[key] = (res.pos_idx, res.neg_idx, g.ids)

    # --- DDP training step: loss value and parameter gradients
    for name, (make_loss, data, layout) in CONFIGS.items():
        xs, ys, ids = (x, LABELS, None) if data == "plain" else (x_dup, y_dup, ids_dup)
        loss = DistributedLoss(make_loss().double())
        # keep the DDP wrappers alive until backward: their reducers average the gradients
        if layout == "ddp_both":
            net = _WithLoss(loss)
            ddp = DDP(net)
            value = ddp(xs[sl], ys[sl], None if ids is None else ids[sl])
        else:
            net = _model()
            ddp, loss_mod = DDP(net), DDP(loss) if layout == "ddp_separate" else loss
            value = loss_mod(ddp(xs[sl]), ys[sl], None if ids is None else ids[sl])
        value.backward()
        out[name] = (value.detach(), [p.grad.clone() for p in _params(layout, net, loss)])
        del ddp

    # --- PML-style baseline (other ranks' rows detached): must NOT be exact, which
    # shows that the comparison above can tell the difference
    net = DDP(_model())
    emb = net(x[sl])
    g = gather(emb.detach(), LABELS[sl])
    refs = torch.cat([g.embeddings[: g.local.start], emb, g.embeddings[g.local.stop:]])
    tl = losses.TripletMarginLoss(margin=0.3, pos_strategy="easy", neg_strategy="hard")
    tl(emb, LABELS[sl], refs, g.labels, query_ids=g.ids[g.local], ref_ids=g.ids).backward()
    out["pml_style"] = [p.grad.clone() for p in net.module.parameters()]

    return out


@pytest.fixture(scope="module")
def ranks():
    """Run the two ranks once; [result dict of rank 0, of rank 1]."""
    return run_ranks(_worker)


def _single(name):
    """One process on the concatenated batch: (loss value, parameter gradients)."""
    make_loss, data, layout = CONFIGS[name]
    x, x_dup, y_dup, ids_dup = _inputs()
    xs, ys, ids = (x, LABELS, None) if data == "plain" else (x_dup, y_dup, ids_dup)
    loss = make_loss().double()
    if layout == "ddp_both":
        net = _WithLoss(loss)
        value = net(xs, ys, ids)
    else:
        net = _model()
        value = loss(net(xs), ys, query_ids=ids)
    value.backward()
    return value.detach(), [p.grad.clone() for p in _params(layout, net, loss)]


# ----------------------------------------------------------------------------- gather


def test_gather_order_values_and_ids(ranks):
    e = torch.randn(13, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _, _, _, ids_dup = _inputs()
    for r, res in enumerate(ranks):
        for key, ids in (("gather_ids", ids_dup), ("gather_noids", torch.arange(13))):
            g = res[key]
            assert torch.equal(g.embeddings, e)  # rank 0's rows, then rank 1's, unpadded
            assert g.labels.dtype == torch.int32 and torch.equal(g.labels, LABELS.to(torch.int32))
            assert g.ids.dtype == torch.int64 and torch.equal(g.ids, ids)
            assert g.local == SLICES[r]


def test_gather_backward_sums_every_ranks_gradient_into_the_owner(ranks):
    c = [torch.randn(13, 4, generator=torch.Generator().manual_seed(100 + r), dtype=torch.float64)
         for r in range(WORLD)]
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["gather_grad"], (c[0] + c[1])[SLICES[r]], atol=1e-14, rtol=0)
        assert not torch.equal(res["gather_grad"], c[r][SLICES[r]])  # not only its own


def test_gather_with_an_empty_rank(ranks):
    e = torch.randn(13, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    c = [torch.randn(13, 4, generator=torch.Generator().manual_seed(100 + r), dtype=torch.float64)
         for r in range(WORLD)]
    for r, res in enumerate(ranks):
        emb, lab, ids, local, grad = res["gather_empty"]
        assert torch.equal(emb, e[:5]) and torch.equal(lab, LABELS[:5])
        assert torch.equal(ids, torch.arange(5))
        assert local == (slice(0, 5) if r == 0 else slice(5, 5))
        assert grad.shape == ((5, 4) if r == 0 else (0, 4))
    torch.testing.assert_close(ranks[0]["gather_empty"][4], c[0][:5] + c[1][:5], atol=1e-14, rtol=0)


def test_gather_errors_are_raised_on_every_rank(ranks):
    for r in range(WORLD):
        assert ranks[r]["err_dim"].startswith("ValueError") and "same dim" in ranks[r]["err_dim"]
        assert ranks[r]["err_ids"].startswith("ValueError")
        assert "ids must be given on every rank or on none" in ranks[r]["err_ids"]
    # rank 1 passed labels of the wrong length: it names the argument, rank 0 names rank 1
    assert ranks[1]["err_labels"].startswith("ValueError") and "labels has length 4" in ranks[1]["err_labels"]
    assert "rank(s) [1]" in ranks[0]["err_labels"]


def test_mining_on_the_gathered_batch_never_picks_the_anchor_or_its_copy(ranks):
    _, x_dup, y_dup, ids_dup = _inputs()
    with torch.no_grad():
        emb = _model()(x_dup)
    for key, qids in (("mine_ids", ids_dup), ("mine_noids", None)):
        single = fastmine.mine(emb, y_dup, query_ids=qids, pos_strategy="easy", neg_strategy="hard")
        for r, res in enumerate(ranks):
            pos, neg, gids = res[key]
            # global indices into the gathered batch = indices into the concatenation
            assert torch.equal(pos, single.pos_idx[SLICES[r]])
            assert torch.equal(neg, single.neg_idx[SLICES[r]])
            own = gids[SLICES[r]]
            for sel in (pos, neg):
                ok = sel >= 0
                assert (gids[sel[ok]] != own[ok]).all()
            if r == 1:
                assert pos[11 - 5] == -1  # the singleton (row 11) has no positive
    # row 2 (rank 0) and row 12 (rank 1) are one sample: with dataset ids neither picks the
    # other; with default ids each is the other's distance-0 easy positive
    assert ranks[0]["mine_ids"][0][2] != 12 and ranks[1]["mine_ids"][0][12 - 5] != 2
    assert ranks[0]["mine_noids"][0][2] == 12 and ranks[1]["mine_noids"][0][12 - 5] == 2


# ----------------------------------------------------------------------------- DistributedLoss


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ddp_gradients_equal_one_process_on_the_concatenated_batch(ranks, name):
    value, grads = _single(name)
    assert value > 0 and all(gr.abs().sum() > 0 for gr in grads)  # a non-trivial case
    for res in ranks:
        v, g = res[name]
        torch.testing.assert_close(v, value, atol=1e-12, rtol=1e-12)  # forward value: global loss
        assert len(g) == len(grads)
        for a, b in zip(g, grads):
            torch.testing.assert_close(a, b, **TOL)


def test_the_singleton_anchor_is_invalid():
    x, *_ = _inputs()
    with torch.no_grad():
        _, valid = CONFIGS["triplet_easy_hard_mean"][0]().per_anchor(_model()(x), LABELS)
    assert not valid[11] and valid.sum() == 12


def test_detaching_other_ranks_rows_is_not_exact(ranks):
    """The PML-style gather (other ranks' rows detached) loses gradient terms."""
    _, grads = _single("triplet_easy_hard_mean")
    diff = max((a - b).abs().max().item() for a, b in zip(ranks[0]["pml_style"], grads))
    assert diff > 1e-4


# ----------------------------------------------------------------------------- in-process


def test_errors_without_a_process_group():
    assert not dist.is_initialized()
    x, y = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(RuntimeError, match="init_process_group"):
        gather(x, y)
    with pytest.raises(RuntimeError, match="process group is not initialised"):
        DistributedLoss(losses.TripletMarginLoss())(x, y)


def test_distributed_loss_rejects_what_it_cannot_normalise():
    with pytest.raises(TypeError, match="loss must be an nn.Module with per_anchor"):
        DistributedLoss(nn.Linear(2, 2))

    class WithReg(losses.TripletMarginLoss):
        def regularizer(self, labels, valid):
            return torch.zeros(())

    with pytest.raises(TypeError, match="regularizer"):
        DistributedLoss(WithReg())
    bad = losses.TripletMarginLoss()
    bad.reduction = "max"
    with pytest.raises(ValueError, match="loss.reduction"):
        DistributedLoss(bad)
    assert fastmine.distributed.DistributedLoss is DistributedLoss
