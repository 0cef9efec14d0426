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
