"""CrossBatchMemory: same-sample exclusion, ring buffer, degenerate batches."""
import torch

import fastmine
from fastmine import CrossBatchMemory, _backends, losses

TOPK_BACKENDS = [b for b in fastmine.available_backends() if "topk" in _backends.get(b).rules]
DW_BACKENDS = [b for b in TOPK_BACKENDS if "distance_weighted" in _backends.get(b).rules]


class _Spy(losses.TripletMarginLoss):
    """Records the mined indices and the ids it was given."""

    def per_anchor(self, embeddings, labels, ref_emb=None, ref_labels=None, *, query_ids=None, ref_ids=None):
        res = fastmine.mine(embeddings, labels, ref_emb, ref_labels, pos_strategy=self.pos_strategy,
                            neg_strategy=self.neg_strategy, query_ids=query_ids, ref_ids=ref_ids,
                            backend=self.backend)
        self.seen = (res, query_ids, ref_ids, ref_labels, labels)
        return super().per_anchor(embeddings, labels, ref_emb, ref_labels, query_ids=query_ids, ref_ids=ref_ids)


def test_never_selects_same_id_and_ring_buffer():
    g = torch.Generator().manual_seed(0)
    spy = _Spy(pos_strategy="easy", neg_strategy="hard", backend="cpu")
    xbm = CrossBatchMemory(spy, embedding_size=4, memory_size=20)
    base = torch.randn(12, 4, generator=g, dtype=torch.float64)
    ylab = torch.randint(0, 3, (12,), generator=g)
    for step in range(4):
        idx = torch.randperm(12, generator=g)[:8]
        # the same dataset samples reappear with tiny drift: their stored copy
        # would be the nearest "positive" without id exclusion
        x = (base[idx] + 1e-3 * torch.randn(8, 4, generator=g, dtype=torch.float64)).requires_grad_()
        out = xbm(x, ylab[idx], ids=idx)
        out.backward()
        res, qid, rid, rlab, lab = spy.seen
        assert rid.shape[0] == 8 + min(8 * step, 20)
        for sel in (res.pos_idx, res.neg_idx):
            ok = sel >= 0
            assert (qid[ok] != rid[sel[ok]]).all()
        ok = res.pos_idx >= 0
        assert (rlab[res.pos_idx[ok]] == lab[ok]).all()
        assert torch.isfinite(x.grad).all()
    assert xbm.filled == 20 and xbm.queue_idx == 32 % 20
    assert torch.equal(xbm.label_memory[(xbm.queue_idx - 8 + torch.arange(8)) % 20], ylab[idx])


def test_default_ids_exclude_only_self():
    spy = _Spy(backend="cpu")
    xbm = CrossBatchMemory(spy, embedding_size=3, memory_size=16)
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    xbm(x, y)
    xbm(x, y)  # same rows again: stored copies have fresh ids, so they are eligible
    res, qid, rid, _, _ = spy.seen
    assert len(set(rid.tolist())) == 12
    ok = res.pos_idx >= 0
    assert (qid[ok] != rid[res.pos_idx[ok]]).all()
    # the exact stored copy (distance 0) is the easy positive
    assert torch.allclose(res.pos_dist[ok], torch.zeros_like(res.pos_dist[ok]))


def test_zero_valid_anchors():
    xbm = CrossBatchMemory(losses.MarginLoss(backend="cpu"), embedding_size=3, memory_size=8)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    out = xbm(x, torch.arange(4), ids=torch.arange(4))
    assert out.item() == 0.0 and not torch.isnan(out)
    out.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    # again with the same ids: the stored copies are the same samples, still no positive
    x2 = x.detach().clone().requires_grad_()
    out = xbm(x2, torch.arange(4), ids=torch.arange(4))
    out.backward()
    assert out.item() == 0.0 and torch.equal(x2.grad, torch.zeros_like(x2))


def test_bad_inputs():
    import pytest
    xbm = CrossBatchMemory(losses.TripletMarginLoss(), embedding_size=3, memory_size=4)
    with pytest.raises(ValueError, match="embeddings"):
        xbm(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="memory_size"):
        xbm(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))


def test_batch_larger_than_memory_message():
    import pytest
    xbm = CrossBatchMemory(losses.TripletMarginLoss(), embedding_size=3, memory_size=16)
    with pytest.raises(ValueError, match=r"^batch size 17 exceeds memory_size 16$"):
        xbm(torch.randn(17, 3), torch.arange(17) % 4)
    assert xbm.filled == 0 and xbm.queue_idx == 0  # checked before anything is stored


# --- validation before anything is stored --------------------------------------

import subprocess
import sys
import textwrap

import pytest


@pytest.mark.parametrize("labels,ids,exc,match", [
    (torch.tensor([0.2, 0.7, 1.5, 1.9]), None, TypeError, "labels must have an integer dtype"),
    (torch.tensor([True, False, True, False]), None, TypeError, "labels must have an integer dtype"),
    (torch.tensor([0, 0, 1]), None, ValueError, "labels has length 3 but embeddings has 4"),
    (torch.tensor([0, 0, 1, 1]), torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError,
     "ids must have an integer dtype"),
    (torch.tensor([0, 0, 1, 1]), torch.tensor([True, False, True, True]), TypeError,
     "ids must have an integer dtype"),
    (torch.tensor([0, 0, 1, 1]), torch.arange(3), ValueError, "ids has length 3"),
])
def test_memory_validates_like_mine_before_storing(labels, ids, exc, match):
    xbm = CrossBatchMemory(losses.TripletMarginLoss(backend="torch"), embedding_size=3, memory_size=8)
    with pytest.raises(exc, match=match):
        xbm(torch.randn(4, 3), labels, ids)
    assert xbm.filled == 0 and xbm.queue_idx == 0 and (xbm.label_memory == 0).all()


def test_memory_rejects_bad_constructor_arguments():
    with pytest.raises(TypeError, match="memory_size must be an integer"):
        CrossBatchMemory(losses.TripletMarginLoss(), embedding_size=3, memory_size=2.5)
    with pytest.raises(ValueError, match="embedding_size must be >= 1"):
        CrossBatchMemory(losses.TripletMarginLoss(), embedding_size=0, memory_size=4)
    with pytest.raises(TypeError, match="loss must be a fastmine loss .* or a pytorch-metric-learning loss"):
        CrossBatchMemory(torch.nn.MSELoss(), embedding_size=3)
    with pytest.raises(ValueError, match="miner is only used with pytorch-metric-learning losses"):
        CrossBatchMemory(losses.TripletMarginLoss(), embedding_size=3,
                         miner=fastmine.miners.BatchHardMiner())


# --- a checkpoint restores everything --------------------------------------------

_CHECKPOINT_SCRIPT = textwrap.dedent("""
    import sys, torch, fastmine
    from fastmine import CrossBatchMemory, losses
    mode, path, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, dtype=torch.bfloat16), torch.randint(0, 3, (4,))) for _ in range(6)]
    def make():
        if kind == "topk_dw":  # k_pos x k_neg triplets, negatives sampled (seed=None)
            loss = losses.MarginLoss(learn_beta=True, nu=0.1, neg_strategy="distance_weighted",
                                     k_pos=2, k_neg=3, normalize_embeddings=True)
        else:
            loss = losses.MarginLoss(learn_beta=True, nu=0.1, neg_strategy="hard", backend="cpu")
        return CrossBatchMemory(loss, embedding_size=3, memory_size=10)
    xbm = make()
    if mode == "save":
        for x, y in batches[:3]:
            xbm(x, y)
        torch.save(xbm.state_dict(), path)
    else:
        xbm.load_state_dict(torch.load(path))
        assert xbm.embedding_memory.dtype == torch.bfloat16
    torch.manual_seed(1)  # the sampler's seeds come from torch's generator, the user's state
    if mode in ("save", "load"):
        print([xbm(x, y).double().item().hex() for x, y in batches[3:]])
""")


@pytest.mark.parametrize("kind", ["margin", "topk_dw"])
def test_checkpoint_round_trip_in_a_new_process(tmp_path, kind):
    if kind == "topk_dw" and not DW_BACKENDS:
        pytest.skip("no backend samples distance_weighted")
    script = tmp_path / "xbm.py"
    script.write_text(_CHECKPOINT_SCRIPT)
    ckpt = str(tmp_path / "xbm.pt")
    run = lambda mode: subprocess.run([sys.executable, str(script), mode, ckpt, kind], check=True,
                                      capture_output=True, text=True).stdout.strip()
    before = run("save")
    after = run("load")
    assert before == after, (before, after)
    state = torch.load(ckpt)
    assert state["_extra_state"] == {"queue_idx": 2, "filled": 10, "next_id": 12}


def test_checkpoint_with_wrong_memory_size_is_refused():
    a = CrossBatchMemory(losses.TripletMarginLoss(), embedding_size=3, memory_size=8)
    b = CrossBatchMemory(losses.TripletMarginLoss(), embedding_size=3, memory_size=4)
    with pytest.raises(RuntimeError, match="size mismatch"):
        b.load_state_dict(a.state_dict())


# --- PML losses: the class is a one-line swap for PML's CrossBatchMemory ----------

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")


def _batches(steps=4, n=8, d=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d, generator=g, dtype=torch.float64),
             torch.randint(0, classes, (n,), generator=g)) for _ in range(steps)]


@pytest.mark.parametrize("make_loss", [lambda: pml_losses.ContrastiveLoss(),
                                       lambda: pml_losses.TripletMarginLoss(margin=0.2)])
def test_pml_loss_all_pairs_matches_pml_crossbatchmemory(make_loss):
    """miner=None: every pair, as PML; with fresh samples each step (no repeated
    ids) the losses and gradients equal PML's own CrossBatchMemory."""
    ours = CrossBatchMemory(make_loss(), embedding_size=5, memory_size=12)
    theirs = pml_losses.CrossBatchMemory(make_loss(), embedding_size=5, memory_size=12)
    for x, y in _batches():
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        la, lb = ours(xa, y), theirs(xb, y)
        la.backward()
        lb.backward()
        torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("make_miner", [
    pytest.param(lambda: fastmine.miners.BatchEasyHardMiner(pos_strategy="easy",
                                                            neg_strategy="hard"), id="easy_hard"),
    pytest.param(lambda: fastmine.miners.DistanceWeightedMiner(k_pos=2, k_neg=2,
                                                               nonzero_loss_cutoff=2.0),
                 id="distance_weighted",
                 marks=pytest.mark.skipif(not DW_BACKENDS, reason="no distance_weighted"))])
def test_pml_loss_with_fastmine_miner_never_pairs_a_sample_with_its_stored_copy(make_miner):
    seen = []

    class Spy(pml_losses.TripletMarginLoss):
        def forward(self, embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None):
            seen.append(indices_tuple)
            return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    xbm = CrossBatchMemory(Spy(margin=0.2), embedding_size=5, memory_size=16,
                           miner=make_miner())
    g = torch.Generator().manual_seed(3)
    base = torch.randn(10, 5, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 2, (10,), generator=g)
    for step in range(4):
        idx = torch.randperm(10, generator=g)[:6]
        # the same samples come back with a tiny drift: their stored copies would
        # be every anchor's easy positive without the id exclusion
        x = (base[idx] + 1e-4 * torch.randn(6, 5, generator=g, dtype=torch.float64)).requires_grad_()
        xbm(x, lab[idx], ids=idx).backward()
        ref_ids = xbm.id_memory[:xbm.filled]  # PML order: the references are the memory
        if len(seen[-1]) == 4:
            a, p, a2, n = seen[-1]
            assert torch.equal(a, a2)
        else:
            a, p, n = seen[-1]
        assert len(a) > 0
        assert (ref_ids[p] != idx[a]).all() and (ref_ids[n] != idx[a]).all()
        assert torch.isfinite(x.grad).all()


def test_pml_loss_with_a_pml_miner_drops_same_sample_pairs():
    xbm = CrossBatchMemory(pml_losses.TripletMarginLoss(margin=0.2), embedding_size=5,
                           memory_size=16, miner=pml_miners.BatchHardMiner())
    for x, y in _batches(steps=3):
        x.requires_grad_()
        out = xbm(x, y, ids=torch.arange(8))  # the same 8 samples every step
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(x.grad).all()


# --- the in-place step: equal to the torch.cat formulation, without copying the bank --

import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

CPU_BACKENDS = [b for b in ("torch", "cpu") if b in fastmine.available_backends()]


class _CatXBM:
    """The straightforward formulation the in-place step must equal: references
    torch.cat([batch, memory[:filled]]) (batch with gradient, memory detached),
    the loss's own forward, then the batch enqueued (normalised when the loss
    normalises, as the memory stores it)."""

    def __init__(self, loss, d, size, dtype=torch.float64):
        self.loss, self.size = loss, size
        self.emb = torch.zeros(size, d, dtype=dtype)
        self.lab = torch.zeros(size, dtype=torch.long)
        self.ids = torch.zeros(size, dtype=torch.long)
        self.q = self.filled = self.next_id = 0

    def __call__(self, x, y, ids=None):
        n = x.shape[0]
        if ids is None:
            ids = -1 - torch.arange(self.next_id, self.next_id + n)
            self.next_id += n
        m = self.filled
        out = self.loss(x, y, torch.cat([x, self.emb[:m]]), torch.cat([y, self.lab[:m]]),
                        query_ids=ids, ref_ids=torch.cat([ids, self.ids[:m]]))
        stored = F.normalize(x, dim=1) if self.loss.normalize_embeddings else x
        slots = (self.q + torch.arange(n)) % self.size
        self.emb[slots], self.lab[slots], self.ids[slots] = stored.detach(), y, ids.long()
        self.q, self.filled = (self.q + n) % self.size, min(m + n, self.size)
        return out


def _make_loss(kind, distance, backend, normalize=False):
    if kind == "triplet":
        return losses.TripletMarginLoss(margin=0.3, distance=distance, neg_strategy="semihard",
                                        semihard_margin=0.5, normalize_embeddings=normalize,
                                        backend=backend)
    return losses.MarginLoss(margin=0.1, beta=0.8, learn_beta=True, nu=0.01, num_classes=3,
                             distance=distance, pos_strategy="hard", neg_strategy="hard",
                             normalize_embeddings=normalize, backend=backend)


def _steps(dataset_ids, d=5, seed=0, repeat=True):
    """Batches of varying size (the spare rows grow once), with repeated dataset
    samples, and one batch repeated exactly (ties between a batch row and its
    stored copy: the batch row, index j < N, must win as in the cat formulation)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(14, d, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 3, (14,), generator=g)
    out = []
    for step, n in enumerate((5, 8, 8, 3, 8, 7, 8, 6)):
        idx = torch.randperm(14, generator=g)[:n]
        x = base[idx] + 1e-3 * torch.randn(n, d, generator=g, dtype=torch.float64)
        if step == 2 and repeat:
            x, idx = out[-1][0].clone(), out[-1][2].clone()
        out.append((x, lab[idx], idx))
    return [(x, y, idx if dataset_ids else None) for x, y, idx in out]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ["triplet", "margin"])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("dataset_ids", [False, True])
def test_in_place_step_equals_the_cat_formulation(backend, kind, distance, dataset_ids):
    ours_loss, ref_loss = _make_loss(kind, distance, backend), _make_loss(kind, distance, backend)
    ours = CrossBatchMemory(ours_loss, embedding_size=5, memory_size=20)
    ref = _CatXBM(ref_loss, 5, 20)
    with_grad = 0
    for x, y, ids in _steps(dataset_ids):  # 53 rows through a ring of 20: wraps twice
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        la, lb = ours(xa, y, ids), ref(xb, y, ids)
        la.backward()
        lb.backward()
        torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-13)
        with_grad += bool(xa.grad.abs().sum() > 0)
        assert ours.filled == ref.filled and ours.queue_idx == ref.q
        assert torch.equal(ours.embedding_memory, ref.emb)
        assert torch.equal(ours.label_memory, ref.lab) and torch.equal(ours.id_memory, ref.ids)
    assert with_grad >= 4
    assert ours._fused.slack == 8  # the in-place path ran (spare rows for the largest batch)
    if kind == "margin":
        torch.testing.assert_close(ours_loss.beta.grad, ref_loss.beta.grad, rtol=1e-10, atol=1e-13)


def _make_topk_loss(kind, backend, seed):
    common = dict(k_pos=2, k_neg=3, backend=backend, seed=seed)
    if kind == "triplet_dw":
        return losses.TripletMarginLoss(margin=0.3, neg_strategy="distance_weighted",
                                        cutoff=0.4, nonzero_loss_cutoff=1.6, **common)
    if kind == "margin_dw":
        return losses.MarginLoss(margin=0.1, beta=0.8, learn_beta=True, nu=0.01, num_classes=3,
                                 pos_strategy="hard", neg_strategy="distance_weighted",
                                 average_nonzero=True, **common)
    return losses.MarginLoss(margin=0.1, beta=0.8, learn_beta=True, nu=0.01, num_classes=3,
                             pos_strategy="hard", neg_strategy="easy", k_pos=3, k_neg=2,
                             backend=backend)


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@pytest.mark.parametrize("kind,seed", [("triplet_dw", 987654321), ("triplet_dw", None),
                                       ("margin_dw", 987654321), ("margin_dw", None),
                                       ("margin_topk_easy", None)])
@pytest.mark.parametrize("dataset_ids", [False, True])
def test_in_place_topk_step_equals_the_cat_formulation(backend, kind, seed, dataset_ids):
    """k_pos x k_neg triplets and distance-weighted sampling: the in-place step
    ([N, k] distances recomputed from gathered rows) equals the loss's own
    forward on torch.cat([batch, memory]) over steps that wrap the ring.  The
    sampler's noise is counted by (anchor row, reference row), and the
    references are in the same order in both, so a fixed seed, or seed=None
    with torch's generator seeded alike before each step, gives the same draws."""
    if "dw" in kind and backend not in DW_BACKENDS:
        pytest.skip(f"{backend} does not sample distance_weighted")
    ours_loss, ref_loss = _make_topk_loss(kind, backend, seed), _make_topk_loss(kind, backend, seed)
    ours = CrossBatchMemory(ours_loss, embedding_size=5, memory_size=20)
    ref = _CatXBM(ref_loss, 5, 20)
    with_grad = 0
    for step, (x, y, ids) in enumerate(_steps(dataset_ids)):
        x = F.normalize(x, dim=1)  # unit rows: the sampler's domain (distances < 2)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(step)
        la = ours(xa, y, ids)
        torch.manual_seed(step)
        lb = ref(xb, y, ids)
        la.backward()
        lb.backward()
        torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-13)
        with_grad += bool(xa.grad.abs().sum() > 0)
        assert torch.equal(ours.embedding_memory, ref.emb)
    assert with_grad >= 4
    assert ours._fused.slack == 8  # the in-place path ran
    if kind != "triplet_dw":
        torch.testing.assert_close(ours_loss.beta.grad, ref_loss.beta.grad, rtol=1e-10,
                                   atol=1e-13)
    # against such a memory, anchors have several positives and negatives
    _, valid = ours_loss.per_anchor(x, y, ours.embedding_memory, ours.label_memory)
    assert valid.dim() == 3 and bool((valid.sum((1, 2)) >= 4).any())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_in_place_step_with_normalisation_and_reduction_none(backend):
    ours_loss = losses.TripletMarginLoss(margin=0.2, normalize_embeddings=True,
                                         neg_strategy="hard", reduction="none", backend=backend)
    ref_loss = losses.TripletMarginLoss(margin=0.2, normalize_embeddings=True,
                                        neg_strategy="hard", reduction="none", backend=backend)
    ours, ref = CrossBatchMemory(ours_loss, 5, 16), _CatXBM(ref_loss, 5, 16)
    # no repeated batch: a stored row is normalised once here, twice in the cat
    # formulation, so a batch row and its stored copy tie here and differ by an ulp there
    for x, y, ids in _steps(True, seed=1, repeat=False):
        x = 3 * x
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        la, lb = ours(xa, y, ids), ref(xb, y, ids)
        w = torch.linspace(0.5, 1.5, x.shape[0], dtype=x.dtype)
        (la * w).sum().backward()
        (lb * w).sum().backward()
        torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-8, atol=1e-11)
        torch.testing.assert_close(ours.embedding_memory, ref.emb, rtol=1e-15, atol=1e-15)
    assert torch.allclose(ours.embedding_memory.norm(dim=1), torch.ones(16, dtype=torch.float64))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_in_place_step_survives_buffer_replacement(backend):
    """.to(), a smaller then larger batch and a checkpoint load rebuild the spare
    rows (one copy) without changing any result; two steps may share a backward."""
    ours = CrossBatchMemory(losses.TripletMarginLoss(neg_strategy="hard", backend=backend), 5, 20)
    ref = _CatXBM(losses.TripletMarginLoss(neg_strategy="hard", backend=backend), 5, 20)
    steps = _steps(True, seed=2)
    for i, (x, y, ids) in enumerate(steps):
        if i == 3:
            ours._apply(lambda t: t.clone())  # replaces the buffers, as .to() does
        if i == 5:  # a new module (float32 memory) adopts the float64 checkpoint
            fresh = CrossBatchMemory(losses.TripletMarginLoss(neg_strategy="hard", backend=backend),
                                     5, 20)
            fresh.load_state_dict(ours.state_dict())
            ours = fresh
            assert ours.embedding_memory.dtype == torch.float64 and ours._fused.slack == 0
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        if i == 6:  # two steps, one backward (the ring is written between them)
            x2, y2, ids2 = steps[7]
            x2a, x2b = x2.clone().requires_grad_(), x2.clone().requires_grad_()
            (ours(xa, y, ids) + ours(x2a, y2, ids2)).backward()
            (ref(xb, y, ids) + ref(x2b, y2, ids2)).backward()
            torch.testing.assert_close(x2a.grad, x2b.grad, rtol=1e-10, atol=1e-13)
        elif i == 7:
            break
        else:
            ours(xa, y, ids).backward()
            ref(xb, y, ids).backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-13)
        assert torch.equal(ours.embedding_memory, ref.emb)
        assert ours._fused.backs(ours)  # the in-place path ran


def test_a_subclass_that_overrides_the_loss_is_called_as_it_is():
    spy = _Spy(neg_strategy="hard", backend=CPU_BACKENDS[-1])
    xbm = CrossBatchMemory(spy, embedding_size=4, memory_size=8)
    xbm(torch.randn(4, 4), torch.tensor([0, 0, 1, 1]))
    assert spy.seen[2].shape[0] == 4 and xbm._fused.slack == 0  # the cat formulation ran


class _NewStorage(TorchDispatchMode):
    """Records the size (elements) of every tensor an op allocates (outputs that
    do not share storage with an input: views and in-place results excluded)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append((t.untyped_storage().nbytes() // t.element_size(), str(func)))
        return out


def _full_memory(loss, m, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    xbm = CrossBatchMemory(loss, embedding_size=d, memory_size=m)
    xbm.load_state_dict({"embedding_memory": torch.randn(m, d, generator=g).to(dtype),
                         "label_memory": torch.randint(0, 40, (m,), generator=g),
                         "id_memory": torch.arange(m),
                         "_extra_state": {"queue_idx": 0, "filled": m, "next_id": 0}},
                        strict=False)
    return xbm, g


_BANK_LOSSES = [
    (b, make) for b in CPU_BACKENDS for make in (
        lambda b: losses.TripletMarginLoss(margin=0.1, backend=b),
        lambda b: losses.MarginLoss(learn_beta=True, nu=0.1, neg_strategy="hard", backend=b))
] + [(b, lambda b: losses.TripletMarginLoss(margin=0.1, k_pos=2, k_neg=4, neg_strategy="hard",
                                            backend=b)) for b in TOPK_BACKENDS] + [
    (b, lambda b: losses.MarginLoss(learn_beta=True, nu=0.1, k_pos=3, k_neg=2, seed=5,
                                    neg_strategy="distance_weighted", normalize_embeddings=True,
                                    backend=b)) for b in DW_BACKENDS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend,make_loss", _BANK_LOSSES)
def test_a_step_never_copies_the_bank(backend, dtype, make_loss):
    """Forward + backward of a step allocate nothing with as many elements as the
    bank has rows (so no copy of the bank, nor of its labels or ids): checked on
    every op the step dispatches from Python (the mining op counts as one)."""
    m, d, n = 4096, 16, 24
    xbm, g = _full_memory(make_loss(backend), m, d, dtype)
    for step in range(3):  # the first step builds the spare rows (one copy)
        x = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
        y = torch.randint(0, 40, (n,), generator=g)
        rec = _NewStorage()
        with rec:
            xbm(x, y, ids=torch.randint(0, m, (n,), generator=g)).backward()
        if step:
            assert max(rec.sizes) < (m, ""), sorted(rec.sizes)[-3:]
        assert torch.isfinite(x.grad.float()).all() and x.grad.abs().sum() > 0


def test_the_copy_check_sees_the_cat_formulation():
    """The recorder does catch a copy of the bank (the test above could fail)."""
    m, d, n = 4096, 16, 24
    xbm, g = _full_memory(_Spy(backend=CPU_BACKENDS[-1]), m, d, torch.float32)
    rec = _NewStorage()
    with rec:
        xbm(torch.randn(n, d, generator=g, requires_grad=True),
            torch.randint(0, 40, (n,), generator=g)).backward()
    assert max(rec.sizes)[0] >= m * d


def test_a_step_never_syncs_the_host(monkeypatch):
    """No Tensor.item / bool(tensor) / nonzero / ... inside a step (what a CUDA step
    must not do); the data checks in the form CUDA tensors get."""
    from fastmine import _contract
    backend = CPU_BACKENDS[-1]
    xbm, g = _full_memory(losses.TripletMarginLoss(margin=0.1, backend=backend), 256, 8,
                          torch.float32)
    xbm(torch.randn(16, 8, generator=g), torch.randint(0, 40, (16,), generator=g))  # builds the spare rows
    for name in ["item", "__bool__", "tolist", "nonzero", "__int__", "__float__", "numpy",
                 "argwhere"]:
        def refuse(*args, _name=name, **kwargs):
            raise AssertionError(f"host sync: Tensor.{_name} called inside a step")
        monkeypatch.setattr(torch.Tensor, name, refuse)
    if hasattr(_contract, "_check_finite_eager") and hasattr(_contract, "check_finite_async"):
        monkeypatch.setattr(_contract, "_check_finite_eager", _contract.check_finite_async)
    for ids in (None, torch.randint(0, 256, (16,), generator=g)):
        x = torch.randn(16, 8, generator=g, requires_grad=True)
        xbm(x, torch.randint(0, 40, (16,), generator=g), ids).backward()
    monkeypatch.undo()
    assert torch.isfinite(x.grad).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [b for b in fastmine.available_backends("cuda")])
@pytest.mark.parametrize("make_loss", [
    lambda b: losses.TripletMarginLoss(margin=0.1, backend=b),
    lambda b: losses.MarginLoss(learn_beta=True, nu=0.1, num_classes=40, neg_strategy="hard",
                                backend=b)])
def test_a_cuda_step_has_no_host_sync(backend, make_loss):
    xbm, g = _full_memory(make_loss(backend), 4096, 16, torch.bfloat16)
    xbm.cuda()

    # the batches are on the device before the checked steps (a host->device copy syncs)
    batches = [(torch.randn(24, 16, generator=g).to(torch.bfloat16).cuda().requires_grad_(),
                torch.randint(0, 40, (24,), generator=g).cuda(), ids)
               for ids in (None, None, torch.randint(0, 4096, (24,), generator=g).cuda())]
    xbm(*batches[0]).backward()  # warm-up: the spare rows, autotuning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y, ids in batches[1:]:
            xbm(x, y, ids).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(x.grad.float()).all() for x, _, _ in batches)
