"""No host synchronisation inside a mining call (what a CUDA call must not do).

A CUDA call that reads a value back (Tensor.item, bool(tensor), .tolist(),
nonzero, ...) blocks the host until the GPU catches up and rules out CUDA-graph
capture.  These tests run mine + backward on every CPU backend with those
Python entry points patched to raise, with the data checks in the form CUDA
tensors get (fastmine._contract.check_finite_async: a device-side assertion,
no read-back); likewise ``mine_topk`` (top-k, semi-hard, distance-weighted),
the mined losses, the contrastive losses on every streaming backend and
``CrossBatchMemory`` steps.  The GPU-marked tests run the real thing under
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


# --- every other differentiable call a training step makes ---------------------
# (PML's miners are left out by design: their output, index tuples of every
# admissible triplet, has a data-dependent length, which needs a read-back.)

from fastmine import _backends  # noqa: E402
from fastmine import contrastive as C  # noqa: E402

TOPK_BACKENDS = [b for b in BACKENDS if {"topk", "distance_weighted"} <= _backends.get(b).rules]
TOPK_RULES = {"topk": dict(k_pos=2, k_neg=3),
              "semihard": dict(k_pos=2, k_neg=2, neg_strategy="semihard", margin=0.5),
              "distance_weighted": dict(k_neg=3, neg_strategy="distance_weighted", seed=5)}


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@pytest.mark.parametrize("refs", [False, True])
@pytest.mark.parametrize("rule", sorted(TOPK_RULES))
def test_mine_topk_and_backward_never_sync(backend, refs, rule, no_sync):
    x, y, kw = _case(refs)
    with no_sync:
        res = fastmine.mine_topk(x, y, **kw, **TOPK_RULES[rule], backend=backend)
        (res.pos_dist.sum() - res.neg_dist.sum()).backward()
    want = fastmine.mine_topk(x, y, **kw, **TOPK_RULES[rule], backend=backend)
    assert torch.equal(res.pos_idx, want.pos_idx) and torch.equal(res.neg_idx, want.neg_idx)


LOSSES = {
    "triplet k=2": lambda b: fastmine.losses.TripletMarginLoss(margin=0.2, k_pos=2, k_neg=2, backend=b),
    "triplet distance_weighted": lambda b: fastmine.losses.TripletMarginLoss(
        margin=0.2, neg_strategy="distance_weighted", seed=3, backend=b),
    "margin": lambda b: fastmine.losses.MarginLoss(margin=0.2, backend=b),
}


@pytest.mark.parametrize("backend", TOPK_BACKENDS)
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_mined_loss_steps_never_sync(backend, name, no_sync):
    x, y, _ = _case(False)
    loss_fn = LOSSES[name](backend)
    with no_sync:
        loss_fn(x, y).backward()


def _contrastive_backends():
    out = []
    for b in C.BACKENDS[1:]:
        try:
            C.resolve_backend(b, torch.device("cpu"))
        except RuntimeError:
            continue
        out.append(b)
    return out


CONTRASTIVE = {"supcon": C.SupConLoss, "ntxent": C.NTXentLoss, "ms": C.MultiSimilarityLoss}


@pytest.mark.parametrize("backend", _contrastive_backends())
@pytest.mark.parametrize("refs", [False, True])
@pytest.mark.parametrize("name", sorted(CONTRASTIVE))
def test_contrastive_loss_steps_never_sync(backend, refs, name, no_sync):
    x, y, kw = _case(refs)
    loss_fn = CONTRASTIVE[name](backend=backend)
    with no_sync:
        loss_fn(x, y, kw.get("ref_emb"), kw.get("ref_labels")).backward()


@pytest.mark.parametrize("loss", ["triplet", "supcon"])
def test_cross_batch_memory_steps_never_sync(loss, no_sync):
    """Two steps of a CrossBatchMemory (the second against a filled bank)."""
    x, y, _ = _case(False)
    inner = (fastmine.losses.TripletMarginLoss(margin=0.2) if loss == "triplet"
             else C.SupConLoss())
    xbm = fastmine.CrossBatchMemory(inner, embedding_size=x.shape[1], memory_size=64)
    xbm(x, y).backward()  # the first step builds the spare rows
    with no_sync:
        xbm(x, y).backward()
        xbm(x, y).backward()


def _cuda_case():
    x, y, kw = _case(True)
    x, y = x.detach().cuda().requires_grad_(), y.cuda()
    kw = {k: (v.detach().cuda().requires_grad_() if v.is_floating_point() else v.cuda())
          for k, v in kw.items()}
    return x, y, kw


def _cuda_steps():
    """(id, step(x, y, kw)) of every call above, for the backends CUDA tensors have."""
    if not torch.cuda.is_available():
        return []
    dev = torch.device("cuda")
    topk = [b for b in fastmine.available_backends(dev)
            if {"topk", "distance_weighted"} <= _backends.get(b).rules]
    steps = []
    for b in topk:
        for rule, opts in sorted(TOPK_RULES.items()):
            def step(x, y, kw, b=b, opts=opts):
                res = fastmine.mine_topk(x, y, **kw, **opts, backend=b)
                (res.pos_dist.sum() - res.neg_dist.sum()).backward()
            steps.append((f"mine_topk {rule} {b}", step))
        for name, make in sorted(LOSSES.items()):
            steps.append((f"{name} {b}", lambda x, y, kw, f=make(b): f(x, y).backward()))
    for b in C.BACKENDS[1:]:
        try:
            C.resolve_backend(b, dev)
        except RuntimeError:
            continue
        for name, cls in sorted(CONTRASTIVE.items()):
            steps.append((f"{name} {b}", lambda x, y, kw, f=cls(backend=b):
                          f(x, y, kw["ref_emb"], kw["ref_labels"]).backward()))
    return steps


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name,step", _cuda_steps(), ids=[s[0] for s in _cuda_steps()])
def test_cuda_steps_have_no_host_sync(name, step):
    """The calls above on CUDA tensors under torch.cuda.set_sync_debug_mode("error")
    (after a warm-up call: autotuning may sync)."""
    x, y, kw = _cuda_case()
    step(x, y, kw)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(x, y, kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
