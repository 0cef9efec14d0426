"""The streaming contrastive losses ("chunked", "cpu") against the full-matrix reference.

float64: values and gradients (w.r.t. embeddings and ref_emb) equal to 1e-10
relative, on tile shapes that do not divide N or M.  Low precision and label
dtypes: tests/test_contrastive_precision.py; memory: tests/test_contrastive_memory.py.
"""
import pytest
import torch

from fastmine import _ops
from fastmine import contrastive as C

F64 = torch.float64
SPECS = {  # name -> (class, kwargs)
    "supcon": (C.SupConLoss, {}),
    "supcon_t001": (C.SupConLoss, {"temperature": 0.01}),
    "ntxent": (C.NTXentLoss, {}),
    "ntxent_t05": (C.NTXentLoss, {"temperature": 0.5}),
    "ms": (C.MultiSimilarityLoss, {}),
    "ms_mined": (C.MultiSimilarityLoss, {"miner_epsilon": 0.1}),
    "ms_mined_args": (C.MultiSimilarityLoss, {"alpha": 1.0, "beta": 10.0, "base": 0.3,
                                              "miner_epsilon": 0.4}),
}
# The streaming backends runnable here: the PyTorch spec, and the compiled kernel when built.
STREAMING = ["chunked"] + (["cpu"] if _ops.has_contrastive_ops() else [])
BLOCKS = [7, 256]  # 256 > N, M: one tile; 7 divides neither N = 37 nor M = 29 (1: below)


def _data(n=37, m=29, d=6, classes=6, dtype=F64, seed=0):
    """Random rows; labels with classes of several sizes plus singletons (labels >= 100)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    y[:3] = torch.tensor([100, 101, 102])
    ry = torch.randint(0, classes, (m,), generator=g)
    ry[:2] = torch.tensor([101, 200])
    emb = torch.randn(n, d, generator=g).to(dtype)
    ref = torch.randn(m, d, generator=g).to(dtype)
    return emb, y, ref, ry


def _cases(emb, y, ref, ry):
    """(kind, embeddings, labels, ref_emb, ref_labels, query_ids, ref_ids)."""
    n = len(y)
    views = torch.arange(n) // 2  # every two rows are views of one sample
    bank_ref = torch.cat([emb[:5], ref])  # rows 0..4 stored in the bank (same ids)
    bank_y = torch.cat([y[:5], ry])
    bank_ids = torch.cat([torch.arange(5), 1000 + torch.arange(len(ry))])
    return [("self", emb, y, None, None, None, None),
            ("self_views", emb, y, None, None, views, None),
            ("ref", emb, y, ref, ry, None, None),
            ("ref_ids", emb, y, bank_ref, bank_y, torch.arange(n), bank_ids)]


def _loss_and_grads(cls, kw, backend, block, emb, y, ref, ry, qid, rid):
    emb = emb.detach().clone().requires_grad_()
    ins = [emb]
    if ref is not None:
        ref = ref.detach().clone().requires_grad_()
        ins.append(ref)
    loss = cls(**kw, backend=backend, block_size=block)(emb, y, ref, ry, qid, rid)
    return loss.detach(), torch.autograd.grad(loss, ins)


def _close(a, b, rel):
    """max |a - b| <= rel * max |b| (a gradient's scale is its largest entry)."""
    return not b.numel() or float((a - b).abs().max()) <= rel * float(b.abs().max())


@pytest.mark.parametrize("backend", STREAMING)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("name", sorted(SPECS))
def test_streaming_equals_reference_float64(name, block, backend):
    cls, kw = SPECS[name]
    for kind, *args in _cases(*_data()):
        lr, gr = _loss_and_grads(cls, kw, "torch", 256, *args)
        ls, gs = _loss_and_grads(cls, kw, backend, block, *args)
        assert float(ls) == pytest.approx(float(lr), rel=1e-10, abs=1e-300), kind
        assert float(lr) > 0, kind  # a non-trivial comparison
        for a, b in zip(gs, gr):
            assert _close(a, b, 1e-10), kind


@pytest.mark.parametrize("backend", STREAMING)
@pytest.mark.parametrize("name", sorted(SPECS))
def test_one_by_one_tiles(name, backend):
    """Tiles of a single anchor and a single reference (every row's state crosses
    every tile boundary)."""
    cls, kw = SPECS[name]
    for kind, *args in _cases(*_data(n=9, m=7, classes=3, seed=5)):
        lr, gr = _loss_and_grads(cls, kw, "torch", 256, *args)
        ls, gs = _loss_and_grads(cls, kw, backend, 1, *args)
        assert float(ls) == pytest.approx(float(lr), rel=1e-10, abs=1e-300), kind
        assert all(_close(a, b, 1e-10) for a, b in zip(gs, gr)), kind


@pytest.mark.parametrize("name", sorted(SPECS))
def test_auto_is_cpu_or_chunked(name):
    """auto: the compiled kernel on CPU tensors when built, else the PyTorch streaming."""
    cls, kw = SPECS[name]
    args = _cases(*_data(n=9, m=5))[2][1:]
    la, ga = _loss_and_grads(cls, kw, "auto", 4, *args)
    lc, gc = _loss_and_grads(cls, kw, STREAMING[-1], 4, *args)
    assert float(la) == float(lc) and all(torch.equal(a, b) for a, b in zip(ga, gc))


@pytest.mark.parametrize("backend", STREAMING)
@pytest.mark.parametrize("name", ["supcon", "ntxent", "ms", "ms_mined"])
def test_gradcheck_streaming(name, backend):
    cls, kw = SPECS[name]
    emb, y, ref, ry = _data(n=7, m=5, d=3, classes=3, seed=3)
    loss = cls(**kw, backend=backend, block_size=3)
    emb.requires_grad_()
    ref.requires_grad_()
    assert torch.autograd.gradcheck(lambda e: loss(e, y), (emb,))
    assert torch.autograd.gradcheck(lambda e, r: loss(e, y, r, ry), (emb, ref))


@pytest.mark.parametrize("backend", STREAMING)
@pytest.mark.parametrize("name", sorted(SPECS))
def test_bank_without_grad_gets_none(name, backend):
    """A reference set that does not require grad gets no gradient (none is formed)."""
    cls, kw = SPECS[name]
    emb, y, ref, ry = _data(n=11, m=13)
    emb.requires_grad_()
    loss = cls(**kw, backend=backend, block_size=4)(emb, y, ref, ry)
    (g,) = torch.autograd.grad(loss, emb)
    expect = cls(**kw, backend="torch")(emb, y, ref, ry)
    (ge,) = torch.autograd.grad(expect, emb)
    assert _close(g, ge, 1e-10) and ref.grad is None


@pytest.mark.parametrize("backend", STREAMING)
@pytest.mark.parametrize("cls", [C.SupConLoss, C.NTXentLoss, C.MultiSimilarityLoss])
@pytest.mark.parametrize("labels", [[3], list(range(5)), [2] * 5, []],
                         ids=["one_row", "singletons", "one_class", "empty"])
def test_degenerate_batches_streaming(cls, labels, backend):
    emb = torch.randn(len(labels), 4, dtype=F64, requires_grad=True)
    y = torch.tensor(labels, dtype=torch.int64)
    loss = cls(backend=backend, block_size=2)(emb, y)
    (g,) = torch.autograd.grad(loss, emb)
    expect = cls(backend="torch")(emb, y)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert float(loss.detach()) == pytest.approx(float(expect.detach()), rel=1e-12, abs=0.0)


def test_arguments_checked():
    with pytest.raises(ValueError, match="backend"):
        C.SupConLoss(backend="cuda-magic")
    with pytest.raises(ValueError, match="temperature"):
        C.NTXentLoss(temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        C.MultiSimilarityLoss(beta=-1)
    with pytest.raises(ValueError, match="miner_epsilon"):
        C.MultiSimilarityLoss(miner_epsilon=-0.1)
    with pytest.raises(ValueError, match="block_size"):
        C.SupConLoss(block_size=0)
    emb, y, ref, ry = _data(n=5, m=4)
    loss = C.SupConLoss()
    with pytest.raises(ValueError, match="ref_labels"):
        loss(emb, y, ref)
    with pytest.raises(ValueError, match="ref_ids"):
        loss(emb, y, None, None, torch.arange(5), torch.arange(5))
    with pytest.raises(ValueError, match="query_ids"):
        loss(emb, y, ref, ry, None, torch.arange(4))
    bad = emb.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="embeddings contains NaN"):
        loss(bad, y)
    zero = ref.clone()
    zero[1] = 0
    with pytest.raises(ValueError, match="ref_emb row 1"):
        loss(emb, y, zero, ry)


needs_cpu = pytest.mark.skipif("cpu" not in STREAMING, reason="compiled extension not built")


@needs_cpu
@pytest.mark.parametrize("name", ["supcon", "ntxent", "ms_mined"])
def test_cpu_kernel_is_deterministic_and_thread_independent(name):
    """Fixed-order sums: bit-identical gradients across runs and thread counts."""
    cls, kw = SPECS[name]
    args = _cases(*_data(n=300, m=200, d=8, dtype=torch.float32))[3][1:]
    first = _loss_and_grads(cls, kw, "cpu", 32, *args)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            again = _loss_and_grads(cls, kw, "cpu", 32, *args)
            assert torch.equal(again[0], first[0])
            assert all(torch.equal(a, b) for a, b in zip(again[1], first[1]))
    finally:
        torch.set_num_threads(threads)


@needs_cpu
@pytest.mark.parametrize("name", ["supcon", "ntxent", "ms_mined"])
@pytest.mark.parametrize("refs", [False, True])
def test_opcheck_contrastive(name, refs):
    cls, kw = SPECS[name]
    loss = cls(**kw, backend="cpu")
    emb, y, ref, ry = _data(n=10, m=8, d=4, classes=3, seed=6)
    q = torch.nn.functional.normalize(emb, dim=1).requires_grad_()
    r = torch.nn.functional.normalize(ref, dim=1).requires_grad_() if refs else None
    args = (q, r, y, ry if refs else y, None, None, *loss._op_args(), 4)
    torch.library.opcheck(torch.ops.fastmine.contrastive.default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


@needs_cpu
def test_cpu_backend_errors():
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available"):
        C.resolve_backend("cpu", torch.device("meta"))
    with pytest.raises(ValueError, match="unknown loss code"):
        torch.ops.fastmine.contrastive(torch.eye(2), None, torch.zeros(2, dtype=torch.int64),
                                       torch.zeros(2, dtype=torch.int64), None, None, 7, 0.1,
                                       0.0, 0.0, None, 4)
