"""The full-matrix references of the contrastive losses against pytorch-metric-learning.

fastmine's losses with backend="torch" (fastmine.reference_contrastive) must give
PML's loss values and gradients (float64, relative 1e-8) on batches with
singletons, one-class batches, repeated ids and a reference set; the mapping
of same-sample ids onto PML (an explicit indices_tuple) is docs/contrastive.md,
"Where PML and fastmine differ".
"""
import math

import pytest
import torch

from fastmine import contrastive as C
from fastmine._contract import checked_references
from fastmine.reference_contrastive import pair_masks

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")

F64 = torch.float64
LOSSES = {  # name -> (fastmine class, PML class, constructor kwargs used by both)
    "supcon": (C.SupConLoss, "SupConLoss", {}),
    "supcon_t": (C.SupConLoss, "SupConLoss", {"temperature": 0.5}),
    "ntxent": (C.NTXentLoss, "NTXentLoss", {}),
    "ntxent_t": (C.NTXentLoss, "NTXentLoss", {"temperature": 0.3}),
    "ms": (C.MultiSimilarityLoss, "MultiSimilarityLoss", {}),
    "ms_args": (C.MultiSimilarityLoss, "MultiSimilarityLoss", {"alpha": 1.5, "beta": 7.0,
                                                               "base": 0.2}),
}


def _batch(labels, d=5, m_labels=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(labels)
    emb = torch.randn(len(labels), d, dtype=F64, generator=g)
    if m_labels is None:
        return emb, y, None, None
    return emb, y, torch.randn(len(m_labels), d, dtype=F64, generator=g), torch.tensor(m_labels)


# Label patterns: classes of several sizes with singletons; one class; all singletons;
# two classes; pairs (each class twice).
PATTERNS = {
    "mixed": [0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5],
    "one_class": [7] * 6,
    "singletons": list(range(7)),
    "two_classes": [1, 0, 1, 0, 0, 1, 1, 0],
    "pairs": [0, 0, 1, 1, 2, 2, 3, 3, 4, 4],
}
BANK = [0, 1, 1, 2, 5, 6, 3, 3, 0]  # reference labels for the ref_emb cases


def _indices_tuple(labels, ref_labels, query_ids, ref_ids, n):
    """(a1, p, a2, n): fastmine's positive / negative pairs as PML's explicit pairs
    (the ids resolved as fastmine resolves them)."""
    if ref_labels is None:
        ref_labels = labels
        query_ids = torch.arange(n) if query_ids is None else query_ids
        ref_ids = query_ids
    pos, neg = pair_masks(labels, ref_labels, query_ids, ref_ids)
    return (*torch.where(pos), *torch.where(neg))


def _run_ours(cls, kw, emb, y, ref, ry, qid=None, rid=None, backend="torch"):
    emb = emb.clone().requires_grad_()
    ref = None if ref is None else ref.clone().requires_grad_()
    loss = cls(**kw, backend=backend)(emb, y, ref, ry, qid, rid)
    grads = torch.autograd.grad(loss, [emb] + ([] if ref is None else [ref]), allow_unused=True)
    return loss, grads


def _run_pml(pml, emb, y, ref, ry, indices_tuple=None):
    emb = emb.clone().requires_grad_()
    ref = None if ref is None else ref.clone().requires_grad_()
    loss = pml(emb, y, indices_tuple, ref, ry)
    ins = [emb] + ([] if ref is None else [ref])
    if not loss.requires_grad:  # PML's zero loss may be detached from a non-grad path
        return loss, [torch.zeros_like(t) for t in ins]
    grads = torch.autograd.grad(loss, ins, allow_unused=True)
    return loss, [torch.zeros_like(t) if g is None else g for t, g in zip(ins, grads)]


def _assert_same(ours, theirs, rel=1e-8):
    (lo, go), (lt, gt) = ours, theirs
    assert torch.isfinite(lo) and all(torch.isfinite(g).all() for g in go)
    assert float(lo.detach()) == pytest.approx(float(lt.detach()), rel=rel, abs=1e-12)
    for a, b in zip(go, gt):
        if b.numel():
            assert float((a - b).abs().max()) <= rel * float(b.abs().max()) + 1e-14


def _pml_loss(name):
    cls, pml_name, kw = LOSSES[name]
    return cls, kw, getattr(pml_losses, pml_name)(**kw)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_batch_equals_pml(name, pattern):
    cls, kw, pml = _pml_loss(name)
    emb, y, _, _ = _batch(PATTERNS[pattern])
    _assert_same(_run_ours(cls, kw, emb, y, None, None), _run_pml(pml, emb, y, None, None))


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("pattern", ["mixed", "one_class", "pairs"])
def test_ref_emb_equals_pml(name, pattern):
    """ref_emb without ids: no pair is excluded, as in PML."""
    cls, kw, pml = _pml_loss(name)
    emb, y, ref, ry = _batch(PATTERNS[pattern], m_labels=BANK, seed=1)
    _assert_same(_run_ours(cls, kw, emb, y, ref, ry), _run_pml(pml, emb, y, ref, ry))


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("pattern", ["mixed", "two_classes"])
def test_indices_tuple_mapping_is_pmls_own(name, pattern):
    """The explicit indices_tuple the ids tests use reproduces PML's label-derived
    loss where PML has no ids (so the ids tests compare like with like)."""
    _, _, pml = _pml_loss(name)
    emb, y, ref, ry = _batch(PATTERNS[pattern], m_labels=BANK, seed=2)
    for r, rl in ((None, None), (ref, ry)):
        t = _indices_tuple(y, rl, None, None, len(y)) if r is not None else \
            _indices_tuple(y, None, None, None, len(y))
        _assert_same(_run_pml(pml, emb, y, r, rl, t), _run_pml(pml, emb, y, r, rl), rel=1e-12)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_repeated_query_ids_equal_pml(name):
    """Views of one sample (repeated query_ids) never pair with each other."""
    cls, kw, pml = _pml_loss(name)
    emb, y, _, _ = _batch([0, 0, 0, 0, 1, 1, 2, 2, 2, 3])
    qid = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 5])  # ids 0, 1: two views each of class 0
    t = _indices_tuple(y, None, qid, None, len(y))
    ours = _run_ours(cls, kw, emb, y, None, None, qid)
    _assert_same(ours, _run_pml(pml, emb, y, None, None, t))
    # and the exclusion matters: the id-less loss differs
    without = _run_ours(cls, kw, emb, y, None, None)[0]
    assert float(ours[0].detach()) != pytest.approx(float(without.detach()))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_memory_bank_ids_equal_pml(name):
    """A bank holding copies of batch rows: a row never pairs with its stored copy."""
    cls, kw, pml = _pml_loss(name)
    emb, y, ref, ry = _batch(PATTERNS["mixed"], m_labels=BANK, seed=3)
    ref = torch.cat([emb[:4] + 1e-3, ref])  # rows 0..3 are stored again (ids 0..3)
    ry = torch.cat([y[:4], ry])
    qid = torch.arange(len(y))
    rid = torch.cat([torch.arange(4), torch.arange(100, 100 + len(BANK))])
    t = _indices_tuple(y, ry, qid, rid, len(y))
    _assert_same(_run_ours(cls, kw, emb, y, ref, ry, qid, rid),
                 _run_pml(pml, emb, y, ref, ry, t))


@pytest.mark.parametrize("epsilon", [0.1, 0.5])
@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("pattern", ["mixed", "two_classes", "one_class"])
def test_ms_fused_miner_equals_pml_miner(epsilon, with_ref, pattern):
    emb, y, ref, ry = _batch(PATTERNS[pattern], d=3, m_labels=BANK if with_ref else None,
                             seed=4)
    miner = pml_miners.MultiSimilarityMiner(epsilon=epsilon)
    t = miner(emb, y, ref, ry)
    if pattern != "one_class":  # a non-trivial selection is compared (one class: none)
        assert len(t[0]) > 0 and len(t[2]) > 0
    pml = pml_losses.MultiSimilarityLoss()
    _assert_same(_run_ours(C.MultiSimilarityLoss, {"miner_epsilon": epsilon}, emb, y, ref, ry),
                 _run_pml(pml, emb, y, ref, ry, t))


def test_ms_fused_miner_selects_a_strict_subset():
    emb, y, _, _ = _batch(PATTERNS["mixed"], d=3, seed=4)
    full = C.MultiSimilarityLoss(backend="torch")(emb, y)
    mined = C.MultiSimilarityLoss(miner_epsilon=0.1, backend="torch")(emb, y)
    assert float(mined) < float(full)


def test_pml_single_pair_guard_differs():
    """PML returns 0 when a1, p, a2, n all have <= 1 entry (docs/contrastive.md);
    fastmine computes the definition: one anchor, one positive, one negative."""
    emb, y, ref, ry = _batch([0], m_labels=[0, 1], seed=5)
    for cls, pml_name in ((C.SupConLoss, "SupConLoss"), (C.NTXentLoss, "NTXentLoss"),
                          (C.MultiSimilarityLoss, "MultiSimilarityLoss")):
        assert float(getattr(pml_losses, pml_name)()(emb, y, None, ref, ry)) == 0.0
        ours = float(cls(backend="torch")(emb, y, ref, ry))
        assert ours > 0
    # SupCon there: -log softmax of the positive among {positive, negative}
    q = torch.nn.functional.normalize(emb, dim=1)
    r = torch.nn.functional.normalize(ref, dim=1)
    s = (q @ r.T)[0] / 0.1
    expect = float(torch.logsumexp(s, 0) - s[0])
    assert float(C.SupConLoss(backend="torch")(emb, y, ref, ry)) == pytest.approx(expect, rel=1e-12)


@pytest.mark.parametrize("cls", [C.SupConLoss, C.NTXentLoss, C.MultiSimilarityLoss])
@pytest.mark.parametrize("labels", [[3], list(range(5)), [2] * 5], ids=["one_row", "singletons",
                                                                           "one_class"])
def test_no_valid_pair_is_zero_not_nan(cls, labels):
    """Without positives (singletons) or negatives (one class), SupCon / NT-Xent are 0
    with a zero, finite gradient; MS is the mean of what remains, finite."""
    emb = torch.randn(len(labels), 4, dtype=F64, requires_grad=True)
    loss = cls(backend="torch")(emb, torch.tensor(labels))
    (g,) = torch.autograd.grad(loss, emb)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    if cls is not C.MultiSimilarityLoss:
        assert float(loss.detach()) == 0.0 and not g.any()


@pytest.mark.parametrize("cls", [C.SupConLoss, C.NTXentLoss, C.MultiSimilarityLoss])
def test_empty_batch_is_zero(cls):
    emb = torch.zeros(0, 4, dtype=F64, requires_grad=True)
    loss = cls(backend="torch")(emb, torch.zeros(0, dtype=torch.int64))
    assert float(loss.detach()) == 0.0
    loss.backward()


@pytest.mark.parametrize("cls", [C.SupConLoss, C.NTXentLoss])
def test_small_temperature_finite_in_fp32(cls):
    emb64, y, _, _ = _batch(PATTERNS["mixed"], d=8, seed=6)
    expect = cls(temperature=0.01, backend="torch")(emb64, y)
    emb = emb64.float().requires_grad_()
    loss = cls(temperature=0.01, backend="torch")(emb, y)
    (g,) = torch.autograd.grad(loss, emb)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(g).all()
    assert float(loss.detach()) == pytest.approx(float(expect), rel=1e-4)


@pytest.mark.parametrize("name", ["supcon", "ntxent", "ms"])
def test_gradcheck(name):
    cls, _, kw = LOSSES[name]
    emb, y, ref, ry = _batch([0, 0, 1, 1, 1, 2], d=3, m_labels=[0, 1, 2, 2], seed=7)
    loss = cls(**kw, backend="torch")
    emb.requires_grad_()
    ref.requires_grad_()
    assert torch.autograd.gradcheck(lambda e: loss(e, y), (emb,))
    assert torch.autograd.gradcheck(lambda e, r: loss(e, y, r, ry), (emb, ref))


def test_reference_masks_exclude_same_sample_negatives():
    """A same-sample pair is neither a positive nor a negative, even across labels."""
    y = torch.tensor([0, 1])
    pos, neg = pair_masks(y, y, torch.tensor([5, 5]), torch.tensor([5, 5]))
    assert not pos.any() and not neg.any()
    pos, neg = pair_masks(y, y, None, None)
    assert pos.tolist() == [[True, False], [False, True]] and neg.tolist() == [[False, True],
                                                                              [True, False]]


def test_checked_references_resolves_self_ids():
    emb, y, _, _ = _batch([0, 1, 0])
    _, _, qid, rid = checked_references(emb, y, None, None, None, None, "cosine")
    assert qid.tolist() == rid.tolist() == [0, 1, 2]


def test_ntxent_fp32_pml_caps_at_minus_log_tiny():
    """PML's -log(ratio + tiny) caps a pair term at -log(tiny) = 87.3 in float32;
    fastmine computes softplus(N_i - s_ap/tau) without the cap (docs/contrastive.md)."""
    emb = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.01]])  # anchor, its positive, a negative
    y = torch.tensor([0, 0, 1])
    t = 0.01
    theirs = float(pml_losses.NTXentLoss(temperature=t)(emb, y))
    ours = float(C.NTXentLoss(temperature=t, backend="torch")(emb, y))
    exact = float(C.NTXentLoss(temperature=t, backend="torch")(emb.double(), y))
    # pairs (0, 1) and (1, 0): the first is ~200 (PML caps it at -log tiny), the
    # second ~log 2 (anchor 1's negative is as far as its positive)
    q = torch.nn.functional.normalize(emb.double(), dim=1)
    s = q @ q.T / t
    second = float(torch.logaddexp(s[1, 0], s[1, 2]) - s[1, 0])
    assert exact > 100 and ours == pytest.approx(exact, rel=1e-5)
    cap = -math.log(torch.finfo(torch.float32).tiny)
    assert theirs == pytest.approx((cap + second) / 2, rel=1e-4)
