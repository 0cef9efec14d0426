"""The Triton contrastive kernels (fastmine/_triton_contrastive.py) against the
full-matrix reference.

On CPU they run under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so sizes stay small (N, M <= 48, D <= 20).  float64: values and gradients
(embeddings and ref_emb) equal the reference to 1e-10 relative, on 16 x 16
tiles that divide neither N = 37 nor M = 29 / 34, with the forward's
reference axis split in 1 or 3 slices.  The ``gpu`` test needs a CUDA device
(FASTMINE_TEST_GPU=1).
"""
import pytest
import torch

from test_contrastive import SPECS, _cases, _close, _data, _loss_and_grads
from fastmine import contrastive as C

tc = pytest.importorskip("fastmine._triton_contrastive")
if tc.triton is None:
    pytest.skip("triton is not installed", allow_module_level=True)

ON_GPU = torch.cuda.is_available() and not tc.INTERPRETED
needs_interpreter = pytest.mark.skipif(not tc.INTERPRETED,
                                       reason="CPU tensors need TRITON_INTERPRET=1")
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device (FASTMINE_TEST_GPU=1)")
TILES_16 = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "MAX_BLOCK_D": 16}


@pytest.fixture
def tiles(monkeypatch):
    """tiles(config, splits): run the interpreter with these tiles and this many
    reference-axis splits in the forward (None: the default heuristic)."""
    def use(config, splits=None):
        monkeypatch.setattr(tc, "INTERPRETER_CONFIG", dict(config))
        if splits is not None:
            monkeypatch.setattr(tc, "_splits", lambda *args: splits)
    return use


def _assert_equals_reference(cls, kw, args, kind, rel=1e-10):
    lr, gr = _loss_and_grads(cls, kw, "torch", 256, *args)
    lt, gt = _loss_and_grads(cls, kw, "triton", 256, *args)
    assert float(lt) == pytest.approx(float(lr), rel=rel, abs=1e-300), kind
    assert len(gt) == len(gr)
    for a, b in zip(gt, gr):
        assert _close(a, b, rel), kind
    return lr


@needs_interpreter
@pytest.mark.parametrize("name", ["supcon", "ntxent", "ms", "ms_mined_args"])
def test_float64_equals_reference(name, tiles):
    """Every case of test_contrastive._cases (batch, batch with view ids, bank,
    bank with ids), tiles of 16 that divide neither N nor M."""
    tiles(TILES_16, splits=1)
    cls, kw = SPECS[name]
    for kind, *args in _cases(*_data()):
        assert float(_assert_equals_reference(cls, kw, args, kind)) > 0, kind


@needs_interpreter
@pytest.mark.parametrize("name", ["supcon", "ntxent", "ms_mined"])
def test_split_reference_axis(name, tiles):
    """The forward's reference axis in 3 slices (partial statistics merged in
    PyTorch), anchor tiles of 32 and reference tiles of 16; D = 20: two BLOCK_K
    chunks per dot and two column chunks of the backward's accumulator."""
    tiles({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "MAX_BLOCK_D": 16}, splits=3)
    cls, kw = SPECS[name]
    cases = _cases(*_data(n=40, m=31, d=20, seed=2))
    for kind, *args in (cases[0], cases[3]):
        _assert_equals_reference(cls, kw, args, kind)


@needs_interpreter
@pytest.mark.parametrize("cls", [C.SupConLoss, C.NTXentLoss, C.MultiSimilarityLoss])
def test_degenerate_batches(cls, tiles):
    """One row, singletons, one class, empty: the reference's value (0 where no
    anchor is valid, never NaN) and finite gradients."""
    tiles(TILES_16)
    for labels in ([3], list(range(5)), [2] * 5, []):
        emb = torch.randn(len(labels), 4, dtype=torch.float64, requires_grad=True)
        y = torch.tensor(labels, dtype=torch.int64)
        loss = cls(backend="triton")(emb, y)
        (g,) = torch.autograd.grad(loss, emb)
        expect = cls(backend="torch")(emb, y)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), labels
        assert float(loss.detach()) == pytest.approx(float(expect.detach()), rel=1e-12, abs=0.0)
        if cls is not C.MultiSimilarityLoss or len(labels) <= 1:
            # SupCon / NT-Xent: each batch lacks a positive or a negative pair;
            # MS: no pair at all
            assert float(loss.detach()) == 0.0, labels


@needs_interpreter
def test_no_valid_anchor_against_a_bank(tiles):
    """A bank with no positive of any anchor: SupCon / NT-Xent are exactly 0."""
    tiles(TILES_16)
    emb, y, ref, _ = _data(n=9, m=7, seed=4)
    ry = torch.full((7,), 999)  # no anchor has label 999
    for cls in (C.SupConLoss, C.NTXentLoss):
        e = emb.clone().requires_grad_()
        loss = cls(backend="triton")(e, y, ref, ry)
        (g,) = torch.autograd.grad(loss, e)
        assert float(loss.detach()) == 0.0
        assert torch.isfinite(g).all() and float(g.abs().max()) == 0.0


@needs_interpreter
@pytest.mark.parametrize("name,dtype", [("supcon_t001", torch.float32),
                                        ("ntxent", torch.float32),
                                        ("ms_mined", torch.float32),
                                        ("supcon_t001", torch.bfloat16)])
def test_low_precision_against_float64(name, dtype, tiles):
    """As tests/test_contrastive_precision.py: the float64 loss of the same rounded
    rows within 2e-4 (float32) / 1e-2 (bfloat16; the loss is rounded to it);
    gradients finite and in the input dtype (float32: within 1e-3 of the float64
    gradients' scale).  bfloat16 rows reach the kernels as float32 (prepare), so
    one bfloat16 case covers the conversions."""
    tiles(TILES_16)
    cls, kw = SPECS[name]
    emb, y, ref, ry = _data(dtype=dtype)
    for kind, *args in [c for c in _cases(emb, y, ref, ry) if c[0] in ("self", "ref_ids")]:
        ls, gs = _loss_and_grads(cls, kw, "triton", 256, *args)
        args64 = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                  for a in args]
        lr, gr = _loss_and_grads(cls, kw, "torch", 256, *args64)
        assert ls.dtype == dtype and torch.isfinite(ls), kind
        assert all(g.dtype == dtype and torch.isfinite(g).all() for g in gs), kind
        if name == "ms_mined" and dtype != torch.float32:
            continue  # the selection's thresholds move with the rounded similarities
        tol = 2e-4 if dtype == torch.float32 else 1e-2
        assert float(ls) == pytest.approx(float(lr), rel=tol), kind
        if dtype == torch.float32:
            assert all(_close(a.double(), b, 1e-3) for a, b in zip(gs, gr)), kind


@needs_interpreter
def test_small_temperature_fp32(tiles):
    tiles(TILES_16)
    emb, y, _, _ = _data(dtype=torch.float32, d=16)
    emb = emb * 3
    for cls in (C.SupConLoss, C.NTXentLoss):
        e = emb.clone().requires_grad_()
        loss = cls(temperature=0.01, backend="triton")(e, y)
        loss.backward()
        expect = cls(temperature=0.01, backend="torch")(emb.double(), y)
        assert torch.isfinite(loss) and torch.isfinite(e.grad).all()
        assert float(loss.detach()) == pytest.approx(float(expect), rel=1e-4)


@needs_interpreter
def test_bank_without_grad_gets_none(tiles):
    tiles(TILES_16)
    emb, y, ref, ry = _data(n=11, m=13)
    emb.requires_grad_()
    cls, kw = SPECS["ntxent"]
    (g,) = torch.autograd.grad(cls(**kw, backend="triton")(emb, y, ref, ry), emb)
    (ge,) = torch.autograd.grad(cls(**kw, backend="torch")(emb, y, ref, ry), emb)
    assert _close(g, ge, 1e-10) and ref.grad is None


@needs_interpreter
@pytest.mark.parametrize("name", ["ntxent", "ms_mined"])
def test_no_n_by_m_allocation(name, tiles):
    """Forward + backward (3 splits) allocate no torch tensor beyond the rows and
    the O(SPLITS N) statistics (the probe of tests/test_contrastive_memory.py,
    blind to in-place ops: the interpreter copies every argument's storage back
    with set_ / copy_)."""
    from test_contrastive_memory import _LargestAllocation

    class _NewTensors(_LargestAllocation):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__.endswith("_"):
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    tiles(TILES_16, splits=3)
    cls, kw = SPECS[name]
    n, m, d = 48, 44, 4
    emb, y, ref, ry = _data(n=n, m=m, d=d, seed=7)
    emb.requires_grad_()
    ref.requires_grad_()
    with _NewTensors() as mode:
        loss = cls(**kw, backend="triton")(emb, y, ref, ry)
        loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()
    assert mode.largest <= max(3 * 4 * n, m * d) < n * m // 2
    with _NewTensors() as full:  # the probe sees the reference's matrix
        cls(**kw, backend="torch")(emb, y, ref, ry)
    assert full.largest >= n * m


@needs_interpreter
@pytest.mark.parametrize("name", ["supcon", "ms_mined"])
def test_backward_is_deterministic(name, tiles, shuffled_triton_programs):
    """One writer per gradient row, fixed-order sums: bit-identical results
    whatever order the programs run in (the interpreter's order shuffled)."""
    tiles(TILES_16)
    cls, kw = SPECS[name]
    args = _cases(*_data(n=37, m=29, dtype=torch.float32))[3][1:]
    first = None
    for seed in (1, 2):
        with shuffled_triton_programs(seed):
            got = _loss_and_grads(cls, kw, "triton", 256, *args)
        if first is None:
            first = got
        else:
            assert torch.equal(got[0], first[0])
            assert all(torch.equal(a, b) for a, b in zip(got[1], first[1]))


@needs_interpreter
@pytest.mark.parametrize("name", ["supcon", "ntxent", "ms_mined"])
@pytest.mark.parametrize("refs", [False, True])
def test_opcheck_contrastive_triton(name, refs, tiles):
    """The ops fastmine::contrastive_triton and its backward: schema, fake and
    autograd registration (torch.library.opcheck), ids and splits included."""
    tiles(TILES_16)
    cls, kw = SPECS[name]
    emb, y, ref, ry = _data(n=10, m=8, d=4, classes=3, seed=6)
    q = torch.nn.functional.normalize(emb.double(), dim=1).requires_grad_()
    r = torch.nn.functional.normalize(ref.double(), dim=1).requires_grad_() if refs else None
    ids = (torch.arange(10) % 7, torch.arange(8) % 5) if refs else (None, None)
    args = (q, r, y, ry if refs else y, *ids, *cls(**kw)._op_args(), not refs, 2)
    torch.library.opcheck(torch.ops.fastmine.contrastive_triton.default, args)
    terms, *_ , saved = torch.ops.fastmine.contrastive_triton(*args)
    grad = torch.rand_like(terms)
    bwd_args = (grad, saved.detach(), q.detach(), None if r is None else r.detach(),
                *args[2:12], refs)
    torch.library.opcheck(torch.ops.fastmine.contrastive_backward_triton.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_backend_selection():
    cpu = torch.device("cpu")
    if tc.INTERPRETED:
        assert C.resolve_backend("triton", cpu) == "triton"
    else:
        with pytest.raises(RuntimeError,
                           match="backend 'triton' is not available.*TRITON_INTERPRET"):
            C.resolve_backend("triton", cpu)
    assert C.resolve_backend("auto", cpu) in ("cpu", "chunked")  # never the interpreter
    with pytest.raises(RuntimeError, match="backend 'triton' is not available"):
        C.resolve_backend("triton", torch.device("meta"))
    if ON_GPU:
        assert C.resolve_backend("auto", torch.device("cuda")) == "triton"
    with pytest.raises(TypeError, match="float32 / float64"):
        tc.streaming_terms(C._SupConSpec(0.1), torch.eye(2, dtype=torch.float16), None,
                           torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                           None, None, True)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["supcon", "ntxent", "ms", "ms_mined"])
def test_gpu_realistic_size(name, dtype):
    """N = 4096 against a bank of 6000 with ids, D = 128: the compiled kernels
    against the chunked backend (float64: 1e-10; fp32 at "highest": 1e-4 on the
    loss, 1e-3 on the gradients' scale; bf16: 1e-2, its rounding)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    n, m, d = 4096, 6000, 128
    emb = torch.randn(n, d, device="cuda", generator=g).to(dtype)
    ref = torch.randn(m, d, device="cuda", generator=g).to(dtype)
    y = torch.randint(0, 100, (n,), device="cuda", generator=g)
    ry = torch.randint(0, 100, (m,), device="cuda", generator=g)
    ref[:n // 2], ry[:n // 2] = emb[:n // 2], y[:n // 2]  # the first half is in the bank
    qid = torch.arange(n, device="cuda")
    rid = torch.cat([qid[:n // 2], n + torch.arange(m - n // 2, device="cuda")])
    cls, kw = SPECS[name]
    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        lt, gt = _loss_and_grads(cls, kw, "triton", 256, emb, y, ref, ry, qid, rid)
        lc, gc = _loss_and_grads(cls, kw, "chunked", 512, emb, y, ref, ry, qid, rid)
    finally:
        torch.set_float32_matmul_precision(prec)
    # float64 / float32; bfloat16: the loss and gradients are rounded to it
    rel, grad_rel = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-3)}.get(
        dtype, (1e-2, 1e-2))
    assert float(lt) == pytest.approx(float(lc), rel=rel)
    for a, b in zip(gt, gc):
        assert _close(a.double(), b.double(), grad_rel)
