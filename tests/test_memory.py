"""CrossBatchMemory: same-sample exclusion, ring buffer, degenerate batches."""
import torch

import fastmine
from fastmine import CrossBatchMemory, losses


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
    mode, path = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, dtype=torch.bfloat16), torch.randint(0, 3, (4,))) for _ in range(6)]
    def make():
        return CrossBatchMemory(losses.MarginLoss(learn_beta=True, nu=0.1, neg_strategy="hard",
                                                  backend="cpu"),
                                embedding_size=3, memory_size=10)
    xbm = make()
    if mode == "save":
        for x, y in batches[:3]:
            xbm(x, y)
        torch.save(xbm.state_dict(), path)
    else:
        xbm.load_state_dict(torch.load(path))
        assert xbm.embedding_memory.dtype == torch.bfloat16
    if mode in ("save", "load"):
        print([xbm(x, y).double().item().hex() for x, y in batches[3:]])
""")


def test_checkpoint_round_trip_in_a_new_process(tmp_path):
    script = tmp_path / "xbm.py"
    script.write_text(_CHECKPOINT_SCRIPT)
    ckpt = str(tmp_path / "xbm.pt")
    run = lambda mode: subprocess.run([sys.executable, str(script), mode, ckpt], check=True,
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


def test_pml_loss_with_fastmine_miner_never_pairs_a_sample_with_its_stored_copy():
    seen = []

    class Spy(pml_losses.TripletMarginLoss):
        def forward(self, embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None):
            seen.append(indices_tuple)
            return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    xbm = CrossBatchMemory(Spy(margin=0.2), embedding_size=5, memory_size=16,
                           miner=fastmine.miners.BatchEasyHardMiner(pos_strategy="easy",
                                                                    neg_strategy="hard"))
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
        a, p, a2, n = seen[-1]
        assert len(a) > 0 and torch.equal(a, a2)
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
