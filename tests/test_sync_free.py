"""No host synchronisation inside a mining call (what a CUDA call must not do).

A CUDA call that reads a value back (Tensor.item, bool(tensor), .tolist(),
nonzero, ...) blocks the host until the GPU catches up and rules out CUDA-graph
capture.  These tests run mine + backward on every CPU backend with those
Python entry points patched to raise, with the data checks in the form CUDA
tensors get (fastmine._contract.check_finite_async: a device-side assertion,
no read-back).  The GPU-marked test runs the real thing under
torch.cuda.set_sync_debug_mode("error").
"""
import pytest
import torch

import fastmine
from fastmine import _contract

BACKENDS = fastmine.available_backends()
SYNCING = ["item", "__bool__", "tolist", "nonzero", "__int__", "__float__", "numpy", "argwhere"]


@pytest.fixture
def no_sync(monkeypatch):
    """Inside the `with`: every syncing Tensor entry point raises."""
    class Guard:
        def __enter__(self):
            for name in SYNCING:
                def refuse(*args, _name=name, **kwargs):
                    raise AssertionError(f"host sync: Tensor.{_name} called inside a mining call")
                monkeypatch.setattr(torch.Tensor, name, refuse)
            monkeypatch.setattr(torch, "nonzero", lambda *a, **k: (_ for _ in ()).throw(
                AssertionError("host sync: torch.nonzero called inside a mining call")))
            # the data checks as CUDA tensors run them (eager on CPU by design)
            monkeypatch.setattr(_contract, "_check_finite_eager", _contract.check_finite_async)

        def __exit__(self, *exc):
            monkeypatch.undo()
    return Guard()


def _case(refs, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 8, generator=g, dtype=dtype).requires_grad_()
    y = torch.randint(0, 4, (24,), generator=g)
    if not refs:
        return x, y, {}
    r = torch.randn(30, 8, generator=g, dtype=dtype).requires_grad_()
    ry = torch.randint(0, 4, (30,), generator=g)
    ids = torch.randint(0, 10, (24,), generator=g), torch.randint(0, 10, (30,), generator=g)
    return x, y, dict(ref_emb=r, ref_labels=ry, query_ids=ids[0], ref_ids=ids[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("refs", [False, True])
@pytest.mark.parametrize("neg,distance,margin", [("hard", "euclidean", None),
                                                 ("semihard", "cosine", 0.3)])
def test_mine_and_backward_never_sync(backend, refs, neg, distance, margin, no_sync):
    x, y, kw = _case(refs)
    with no_sync:
        res = fastmine.mine(x, y, **kw, neg_strategy=neg, distance=distance, margin=margin,
                            backend=backend)
        loss = (res.pos_dist - res.neg_dist).sum()
        loss.backward()
    want = fastmine.mine(x, y, **kw, neg_strategy=neg, distance=distance, margin=margin,
                         backend=backend)
    assert torch.equal(res.pos_idx, want.pos_idx) and torch.equal(res.neg_idx, want.neg_idx)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="compiled extension not loaded")
def test_triplet_loss_step_never_syncs(no_sync):
    x, y, _ = _case(False)
    loss_fn = fastmine.losses.TripletMarginLoss(margin=0.2, backend="cpu")
    with no_sync:
        loss_fn(x, y).backward()


def test_the_guard_catches_a_sync(no_sync):
    """The patched entry points do raise (the tests above could fail)."""
    t = torch.ones(3)
    with no_sync:
        with pytest.raises(AssertionError, match="host sync: Tensor.item"):
            t.sum().item()
        with pytest.raises(AssertionError, match="host sync: Tensor.__bool__"):
            bool(t.any())


@pytest.mark.parametrize("bad,distance", [(float("nan"), "euclidean"), (1e30, "euclidean"),
                                          (0.0, "cosine")])
def test_async_checks_reject_bad_rows(bad, distance):
    """The CUDA form of the data checks rejects what the eager one rejects (on
    CPU, torch._assert_async raises at once)."""
    x = torch.randn(6, 3)
    x[2] = bad
    with pytest.raises(RuntimeError, match="fastmine: embeddings contains NaN or Inf, or a row "
                                           "whose norm is outside the admissible range"):
        _contract.check_finite_async("embeddings", x, distance)
    _contract.check_finite_async("embeddings", torch.randn(6, 3), distance)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [b for b in fastmine.available_backends("cuda")])
def test_cuda_call_has_no_host_sync(backend):
    x, y, kw = _case(True)
    x, y = x.detach().cuda().requires_grad_(), y.cuda()
    kw = {k: (v.detach().cuda().requires_grad_() if v.is_floating_point() else v.cuda())
          for k, v in kw.items()}
    fastmine.mine(x, y, **kw, backend=backend)  # warm-up (autotuning may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = fastmine.mine(x, y, **kw, backend=backend)
        (res.pos_dist - res.neg_dist).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
