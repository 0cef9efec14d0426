"""opcheck of the custom ops, torch.compile, determinism, MineFunction gradcheck."""
import os

import pytest
import torch

import fastmine
from fastmine import MineFunction, losses
from fastmine._contract import DISTANCES, NEG_STRATEGIES, POS_STRATEGIES
from fastmine.mine import _prepare


def _data(n=12, d=5, m=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    if m is None:
        return x, y, None, None
    return x, y, torch.randn(m, d, generator=g, dtype=dtype), torch.randint(0, 3, (m,), generator=g)


# Every backend usable on CPU tensors here: cpu, torch and (under the
# interpreter) triton.
CPU_BACKENDS = fastmine.available_backends("cpu")
FUSED_BACKENDS = [b for b in CPU_BACKENDS if b != "torch"]


def _args(x, y, r, ry, pos, neg, dist, backend, margin=None):
    return _prepare(x, y, r, ry, pos, neg, dist, margin, None, None, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pos,neg,dist,margin", [("easy", "hard", "euclidean", None),
                                                 ("hard", "semihard", "cosine", 0.5),
                                                 ("easy", "easy", "squared_euclidean", None)])
def test_opcheck_mine(backend, pos, neg, dist, margin):
    op = torch.ops.fastmine.mine.default
    # torch's test_aot_dispatch_dynamic sums all outputs into a scalar that
    # starts as the int64 sum of pos_idx, then fails adding the float
    # distances in place (a limitation of the helper, not of the op); so it
    # runs on inputs without grad, and the other checks on inputs with grad.
    # The compiled forward+backward is covered by test_compile_fullgraph_matches_eager.
    grad_utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    for m, seed in ((None, 0), (9, 1)):
        x, y, r, ry = _data(m=m, seed=seed)
        torch.library.opcheck(op, _args(x, y, r, ry, pos, neg, dist, backend, margin))
        x.requires_grad_()
        if r is not None:
            r.requires_grad_()
        torch.library.opcheck(op, _args(x, y, r, ry, pos, neg, dist, backend, margin),
                              test_utils=grad_utils)


@pytest.mark.skipif(not hasattr(torch.ops.fastmine, "mine_select"), reason="compiled extension not loaded")
@pytest.mark.parametrize("neg", ["hard", "semihard"])
def test_opcheck_mine_select(neg):
    x, y, _, _ = _data(seed=2)
    ids = torch.arange(x.shape[0])
    # mine_select takes the strategies/distance as the integer codes of _contract
    args = (x, y, x, y, ids, ids, POS_STRATEGIES["easy"], NEG_STRATEGIES[neg],
            DISTANCES["euclidean"], 0.4 if neg == "semihard" else None)
    torch.library.opcheck(torch.ops.fastmine.mine_select.default, args)


@pytest.mark.parametrize("dist", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("pos,neg", [("easy", "hard"), ("hard", "semihard"), ("easy", "easy")])
@pytest.mark.parametrize("refs", [False, True])
def test_minefunction_gradcheck_and_matches_mine(dist, pos, neg, refs):
    x, y, r, ry = _data(n=8, d=4, m=7 if refs else None, seed=3)
    x.requires_grad_()
    if refs:
        r.requires_grad_()

    def f(x, r):
        out = MineFunction.apply(x, y, r, ry, pos, neg, dist, None, None, None, "cpu")
        return out[2], out[3]

    assert torch.autograd.gradcheck(f, (x, r))
    w1, w2 = torch.rand(8, dtype=torch.float64), torch.rand(8, dtype=torch.float64)
    pd, nd = f(x, r)
    inputs = (x, r) if refs else (x,)
    g1 = torch.autograd.grad((pd * w1 + nd * w2).sum(), inputs)
    res = fastmine.mine(x, y, r, ry, pos_strategy=pos, neg_strategy=neg, distance=dist, backend="cpu")
    g2 = torch.autograd.grad((res.pos_dist * w1 + res.neg_dist * w2).sum(), inputs)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def _model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    x = torch.randn(16, 6)
    y = torch.randint(0, 3, (16,))
    return model, x, y


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    model, x, y = _model_and_data()
    loss_fn = losses.TripletMarginLoss(margin=0.2, neg_strategy="hard", backend=backend)

    def step(x, y):
        return loss_fn(model(x), y)

    eager = step(x, y)
    g_eager = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(step, fullgraph=True)  # inductor
    out = compiled(x, y)
    g_comp = torch.autograd.grad(out, list(model.parameters()))
    torch.testing.assert_close(out, eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


# Fused backends whose backward runs kernels of their own on CPU tensors:
# triton (under the interpreter).  cuda-emulated scatters with fastmine._pairs
# (torch's index_put_ / index_add_), whose order the CPU never varies: its
# run-to-run claim is the GPU test below.  The cpu backend sums reference rows
# in anchor order on one thread: test_cpu_backward_independent_of_threads.
OWN_BACKWARD = [b for b in FUSED_BACKENDS if b == "triton"]


def _loss_grads(backend, n, deterministic):
    """d(loss)/d(embeddings) of a triplet loss over an n-row batch (its own references)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    x, y = torch.randn(n, 6), torch.randint(0, 3, (n,))
    loss_fn = losses.TripletMarginLoss(margin=10.0, neg_strategy="hard", backend=backend)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        emb = model(x)
        return torch.autograd.grad(loss_fn(emb, y) * 3.7, emb)[0]
    finally:
        torch.use_deterministic_algorithms(prev)


@pytest.mark.parametrize("backend", OWN_BACKWARD)
def test_deterministic_gradients_bit_identical(backend, shuffled_triton_programs):
    """Under torch.use_deterministic_algorithms(True), a loss's gradients do not
    depend on the order in which the GPU runs the backward's programs.  On CPU
    the Triton interpreter runs them in grid order, where atomics never race
    and this could not fail; conftest.shuffled_triton_programs runs each launch's
    programs in a shuffled order instead.  96 anchors (6 programs) scatter into
    96 reference rows: the atomic path changes bits with the order (checked, so
    the test can tell), the deterministic one must not."""
    det, atomic = [], []
    for seed in range(3):
        with shuffled_triton_programs(seed):
            det.append(_loss_grads(backend, 96, True))
            atomic.append(_loss_grads(backend, 96, False))
    assert det[0].abs().sum() > 0
    assert all(torch.equal(det[0], g) for g in det[1:])
    assert any(not torch.equal(atomic[0], g) for g in atomic[1:])
    torch.testing.assert_close(atomic[0], det[0], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "cuda", "triton"])
def test_gpu_deterministic_gradients_bit_identical(backend):
    """On CUDA tensors, where atomics race: with torch.use_deterministic_algorithms(True)
    the gradients into anchors and a small reference bank (16384 anchors, 64
    references: every reference row sums hundreds of pairs) are bit-identical
    across runs, for every backend, including those whose backward is
    fastmine._pairs (torch's scatter).  GPU-only: on CPU nothing runs out of order."""
    if backend not in fastmine.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not available for CUDA tensors")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton runs compiled on CUDA tensors with FASTMINE_TEST_GPU=1")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(16384, 64, device="cuda", generator=g)
    r = torch.randn(64, 64, device="cuda", generator=g)
    y = torch.randint(0, 8, (16384,), device="cuda", generator=g)
    ry = torch.arange(64, device="cuda") % 8
    w = torch.randn(2, 16384, device="cuda", generator=g)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(3):
            xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()
            res = fastmine.mine(xg, y, rg, ry, backend=backend)
            grads.append(torch.autograd.grad((res.pos_dist * w[0] - res.neg_dist * w[1]).sum(),
                                             (xg, rg)))
    finally:
        torch.use_deterministic_algorithms(prev)
    assert grads[0][1].abs().sum() > 0
    for g in grads[1:]:
        assert torch.equal(g[0], grads[0][0]) and torch.equal(g[1], grads[0][1])


@pytest.mark.skipif("cpu" not in CPU_BACKENDS, reason="compiled extension not loaded")
@pytest.mark.parametrize("refs", [False, True])
def test_cpu_backward_independent_of_threads(refs):
    """The CPU backward's reference-row sums run in anchor order on one thread:
    gradients are bit-identical whatever the thread count (a parallel scatter
    with a varying order would round differently on these many collisions)."""
    g = torch.Generator().manual_seed(5)
    n, m = 3000, (5 if refs else None)
    x = torch.randn(n, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 2, (n,), generator=g)
    r = torch.randn(m, 16, generator=g, requires_grad=True) if refs else None
    ry = torch.randint(0, 2, (m,), generator=g) if refs else None
    w = torch.rand(n, generator=g)
    prev = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, max(2, prev)):
            torch.set_num_threads(threads)
            res = fastmine.mine(x, y, r, ry, backend="cpu")
            inputs = (x, r) if refs else (x,)
            grads.append(torch.autograd.grad((res.pos_dist * w - res.neg_dist).sum(), inputs))
    finally:
        torch.set_num_threads(prev)
    for a, b in zip(*grads):
        assert torch.equal(a, b)
