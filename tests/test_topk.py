"""fastmine.mine_topk and mine(neg_strategy="distance_weighted") through the op layer
(issue #17): the op fastmine::mine_topk, its torch backend (fastmine::mine_topk_torch,
the reference of fastmine/reference_topk.py), its C++ autograd (fastmine::mine_backward
on the flattened columns), its fake, torch.compile, the argument checks and the
backend choice.  The reference itself is tested in tests/test_topk_reference.py.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastmine
from fastmine import _backends, _extension, _philox
from fastmine import reference_topk as rt
from fastmine._contract import DISTANCES, NEG_STRATEGIES, POS_STRATEGIES

mine_module = importlib.import_module("fastmine.mine")  # fastmine.mine is the function

needs_op = pytest.mark.skipif(not _extension.loaded(), reason="compiled extension not loaded")
CPU = torch.device("cpu")


def _data(n=12, d=4, m=None, seed=0, dtype=torch.float64, classes=3, normalize=False):
    """[n, d] embeddings, labels in [0, classes) (few classes: k beyond a row's
    admissible count leaves trailing -1), and optionally an [m, d] reference set."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    r = ry = None
    if m is not None:
        r = torch.randn(m, d, generator=g, dtype=dtype)
        ry = torch.randint(0, classes, (m,), generator=g)
    if normalize:
        x = F.normalize(x, dim=1)
        r = None if r is None else F.normalize(r, dim=1)
    return x, y, r, ry


# (pos, neg, distance, margin): every rule, each distance at least once.
RULES = [("easy", "hard", "euclidean", None), ("hard", "easy", "squared_euclidean", None),
         ("easy", "semihard", "cosine", None), ("hard", "semihard", "euclidean", 0.3),
         ("easy", "distance_weighted", "euclidean", None)]


def _kwargs(pos, neg, dist, margin, k_pos, k_neg, seed=12345):
    return dict(k_pos=k_pos, k_neg=k_neg, pos_strategy=pos, neg_strategy=neg, distance=dist,
                margin=margin, seed=seed if neg == "distance_weighted" else None)


def _assert_same(res, exp):
    for name in ("pos_idx", "neg_idx", "pos_dist", "neg_dist"):
        a, b = getattr(res, name), getattr(exp, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.equal(a, b), (name, a, b)


# ----------------------------------------------------------- the op equals the reference
@pytest.mark.parametrize("pos,neg,dist,margin", RULES)
@pytest.mark.parametrize("refs", ["self", "self_ids", "bank", "bank_ids"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_backend_equals_reference(pos, neg, dist, margin, refs, dtype):
    bank = refs.startswith("bank")
    x, y, r, ry = _data(n=13, d=3, m=11 if bank else None, seed=1, dtype=dtype,
                        normalize=(neg == "distance_weighted"))
    ids = {}
    if refs == "self_ids":
        ids = dict(query_ids=torch.arange(13) // 2)  # pairs of rows are one sample
    elif refs == "bank_ids":
        ids = dict(query_ids=torch.arange(13), ref_ids=torch.arange(11) + 6)  # 6..12 overlap
    for k_pos, k_neg in ((1, 1), (2, 5), (6, 3)):
        kw = _kwargs(pos, neg, dist, margin, k_pos, k_neg)
        res = fastmine.mine_topk(x, y, r, ry, backend="torch", **kw, **ids)
        assert isinstance(res, fastmine.TopKResult)
        assert res.pos_idx.shape == (13, k_pos) and res.neg_idx.shape == (13, k_neg)
        _assert_same(res, rt.mine_topk(x, y, r, ry, **kw, **ids))
    # the short rows were exercised (trailing -1 with k_pos = 6 among 3 classes)
    assert bool((res.pos_idx == -1).any())


@pytest.mark.parametrize("seed", [0, 7, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1])
def test_seed_travels_as_int64_bits(seed):
    # The op schema's int is signed: seeds >= 2^63 travel as seed - 2^64 and must
    # come back as the same 64-bit key (a wrong conversion changes the picks).
    x, y, _, _ = _data(n=24, d=3, seed=2, normalize=True)
    kw = dict(k_neg=4, neg_strategy="distance_weighted", seed=seed)
    _assert_same(fastmine.mine_topk(x, y, backend="torch", **kw), rt.mine_topk(x, y, **kw))


def test_seeds_change_the_picks_and_a_seed_reproduces_them():
    x, y, _, _ = _data(n=32, d=3, seed=3, normalize=True)
    kw = dict(k_neg=3, neg_strategy="distance_weighted", backend="torch")
    a = fastmine.mine_topk(x, y, seed=1, **kw).neg_idx
    assert torch.equal(a, fastmine.mine_topk(x, y, seed=1, **kw).neg_idx)
    assert not torch.equal(a, fastmine.mine_topk(x, y, seed=2, **kw).neg_idx)


def test_seed_none_draws_from_the_default_generator():
    x, y, _, _ = _data(n=32, d=3, seed=4, normalize=True)
    kw = dict(k_neg=2, neg_strategy="distance_weighted", backend="torch")
    torch.manual_seed(123)
    a = fastmine.mine_topk(x, y, **kw)
    torch.manual_seed(123)
    expected_seed = _philox.draw_seed()
    _assert_same(a, fastmine.mine_topk(x, y, seed=expected_seed, **kw))
    torch.manual_seed(123)
    _assert_same(a, fastmine.mine_topk(x, y, **kw))  # torch.manual_seed reproduces
    torch.manual_seed(123)
    b = fastmine.mine(x, y, neg_strategy="distance_weighted", backend="torch")
    assert torch.equal(b.neg_idx, a.neg_idx[:, 0])
    # the deterministic rules ignore the seed and draw nothing
    state = torch.get_rng_state()
    fastmine.mine_topk(x, y, k_neg=2, backend="torch")
    fastmine.mine(x, y, backend="torch")
    assert torch.equal(state, torch.get_rng_state())


def test_seed_accepts_numpy_and_0d_tensor_integers():
    x, y, _, _ = _data(n=16, d=3, seed=5, normalize=True)
    kw = dict(k_neg=2, neg_strategy="distance_weighted", backend="torch")
    a = fastmine.mine_topk(x, y, seed=99, **kw)
    _assert_same(a, fastmine.mine_topk(x, y, seed=np.uint64(99), **kw))
    _assert_same(a, fastmine.mine_topk(x, y, seed=torch.tensor(99), **kw))


# ------------------------------------------------------------------ k = 1 equals mine
@pytest.mark.parametrize("pos,neg,dist,margin", RULES)
@pytest.mark.parametrize("bank", [False, True])
def test_k1_equals_mine(pos, neg, dist, margin, bank):
    x, y, r, ry = _data(n=14, d=3, m=9 if bank else None, seed=6,
                        normalize=(neg == "distance_weighted"))
    kw = _kwargs(pos, neg, dist, margin, 1, 1)
    top = fastmine.mine_topk(x, y, r, ry, backend="torch", **kw)
    mkw = dict(pos_strategy=pos, neg_strategy=neg, distance=dist, margin=margin)
    if neg == "distance_weighted":
        mkw["seed"] = kw["seed"]
    backends = ["torch"] + (["cpu"] if neg != "distance_weighted"
                            and "cpu" in fastmine.available_backends() else [])
    for backend in backends + ["auto"]:
        res = fastmine.mine(x, y, r, ry, backend=backend, **mkw)
        assert torch.equal(res.pos_idx, top.pos_idx[:, 0]), backend
        assert torch.equal(res.neg_idx, top.neg_idx[:, 0]), backend
        torch.testing.assert_close(res.pos_dist, top.pos_dist[:, 0], rtol=0, atol=1e-12)
        torch.testing.assert_close(res.neg_dist, top.neg_dist[:, 0], rtol=0, atol=1e-12)
        assert torch.equal(res.valid, (res.pos_idx >= 0) & (res.neg_idx >= 0))
    if neg == "distance_weighted":  # column 0 of any k is the k = 1 draw
        k3 = fastmine.mine_topk(x, y, r, ry, backend="torch", **{**kw, "k_neg": 3})
        assert torch.equal(k3.neg_idx[:, 0], top.neg_idx[:, 0])


def test_minefunction_distance_weighted_is_mine():
    x, y, _, _ = _data(n=10, d=3, seed=7, normalize=True)
    torch.manual_seed(5)
    out = fastmine.MineFunction.apply(x, y, None, None, "easy", "distance_weighted")
    torch.manual_seed(5)
    res = fastmine.mine(x, y, neg_strategy="distance_weighted")
    for a, b in zip(out, res[:4]):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------- gradients
@needs_op
@pytest.mark.parametrize("pos,neg,dist,margin", RULES)
@pytest.mark.parametrize("refs", ["self", "self_ids", "bank", "bank_ids", "bank_nograd"])
def test_gradients_through_the_op(pos, neg, dist, margin, refs):
    """gradcheck (float64) of the op's C++ autograd, and equality with plain autograd
    of the reference's distances; k_pos != k_neg and short rows (trailing -1, zero
    gradient) exercise the padded, flattened backward."""
    bank = refs.startswith("bank")
    x, y, r, ry = _data(n=9, d=3, m=8 if bank else None, seed=8,
                        normalize=(neg == "distance_weighted"))
    ids = {}
    if refs == "self_ids":
        ids = dict(query_ids=torch.arange(9) // 3)
    elif refs == "bank_ids":
        ids = dict(query_ids=torch.arange(9), ref_ids=torch.arange(8) + 4)
    kw = _kwargs(pos, neg, dist, margin, 4, 2)
    x.requires_grad_()
    r_grad = bank and refs != "bank_nograd"
    if r_grad:
        r.requires_grad_()

    def f(x, r):
        res = fastmine.mine_topk(x, y, r, ry, backend="torch", **kw, **ids)
        return res.pos_dist, res.neg_dist

    inputs = (x, r) if r_grad else (x,)
    g = (lambda x, r=r: f(x, r)) if not r_grad else f
    assert torch.autograd.gradcheck(g, inputs)

    gen = torch.Generator().manual_seed(9)
    w_pos, w_neg = torch.rand(9, 4, generator=gen, dtype=x.dtype), torch.rand(
        9, 2, generator=gen, dtype=x.dtype)
    pd, nd = f(x, r)
    exp = rt.mine_topk(x, y, r, ry, **kw, **ids)
    assert bool((exp.pos_idx == -1).any())  # the -1 padding is exercised
    got = torch.autograd.grad((pd * w_pos).sum() + (nd * w_neg).sum(), inputs)
    want = torch.autograd.grad((exp.pos_dist * w_pos).sum() + (exp.neg_dist * w_neg).sum(),
                               inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # only one output used: the other's gradient is taken as zero
    gx, = torch.autograd.grad(f(x, r)[1].sum(), x)
    wx, = torch.autograd.grad(rt.mine_topk(x, y, r, ry, **kw, **ids).neg_dist.sum(), x)
    torch.testing.assert_close(gx, wx, rtol=1e-12, atol=1e-12)


@needs_op
def test_indices_are_not_differentiable():
    x, y, _, _ = _data(seed=10)
    x.requires_grad_()
    res = fastmine.mine_topk(x, y, k_pos=2, k_neg=2, backend="torch")
    assert not res.pos_idx.requires_grad and not res.neg_idx.requires_grad
    assert res.pos_dist.requires_grad and res.neg_dist.requires_grad


# ------------------------------------------------------------- opcheck and compile
def _op_args(x, y, r, ry, pos, neg, dist, margin, k_pos, k_neg, seed=None):
    return mine_module._prepare_topk(x, y, r, ry, k_pos, k_neg, pos, neg, dist, margin, 0.5,
                                     1.4, seed, None, None, "torch", topk=True)


@needs_op
@pytest.mark.parametrize("pos,neg,dist,margin", RULES)
def test_opcheck_mine_topk(pos, neg, dist, margin):
    op = torch.ops.fastmine.mine_topk.default
    # As test_ops_compile.test_opcheck_mine: torch's test_aot_dispatch_dynamic sums
    # the int64 and float outputs into one scalar (a limitation of the helper), so
    # it runs without grad, and the other checks with grad.
    grad_utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    for m, seed in ((None, 0), (9, 1)):
        x, y, r, ry = _data(m=m, seed=seed, normalize=(neg == "distance_weighted"))
        args = _op_args(x, y, r, ry, pos, neg, dist, margin, 3, 2, seed=2 ** 64 - 5)
        assert args[-2] < 0  # the int64 form of a seed >= 2^63 is exercised
        torch.library.opcheck(op, args)
        x.requires_grad_()
        if r is not None:
            r.requires_grad_()
        torch.library.opcheck(op, _op_args(x, y, r, ry, pos, neg, dist, margin, 3, 2,
                                           seed=2 ** 64 - 5), test_utils=grad_utils)


@needs_op
def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x, y = torch.empty(5, 3, dtype=torch.float16), torch.empty(5, dtype=torch.int64)
        out = torch.ops.fastmine.mine_topk(x, y, None, None, None, None, 2, 4, 0, 0, 0, None,
                                           0.5, 1.4, 0, "torch")
    assert [tuple(t.shape) for t in out] == [(5, 2), (5, 4), (5, 2), (5, 4)]
    assert [t.dtype for t in out] == [torch.int64, torch.int64, torch.float16, torch.float16]


@needs_op
@pytest.mark.parametrize("neg", ["hard", "semihard", "distance_weighted"])
def test_compile_fullgraph_matches_eager(neg):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def step(x, y):
        # seed given: seed=None draws on the host (_philox.draw_seed) before the op
        e = F.normalize(model(x), dim=1)
        res = fastmine.mine_topk(e, y, k_pos=2, k_neg=3, neg_strategy=neg, seed=77,
                                 backend="torch")
        terms = res.pos_dist[:, :, None] - res.neg_dist[:, None, :] + 0.2
        ok = (res.pos_idx[:, :, None] >= 0) & (res.neg_idx[:, None, :] >= 0)
        return torch.where(ok, terms.clamp_min(0), torch.zeros_like(terms)).sum(), res.neg_idx

    eager, eager_idx = step(x, y)
    g_eager = torch.autograd.grad(eager, list(model.parameters()))
    out, idx = torch.compile(step, fullgraph=True)(x, y)
    g_comp = torch.autograd.grad(out, list(model.parameters()))
    assert torch.equal(idx, eager_idx)
    torch.testing.assert_close(out, eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------- argument errors
ARG_ERRORS = [
    (dict(k_pos=0), ValueError, "k_pos must be >= 1"),
    (dict(k_neg=-2), ValueError, "k_neg must be >= 1"),
    (dict(k_pos=1.5), TypeError, "k_pos must be an integer"),
    (dict(k_neg=True), TypeError, "k_neg must be an integer"),
    (dict(k_neg="2"), TypeError, "k_neg must be an integer"),
    (dict(neg_strategy="distance_weighted", distance="cosine"), ValueError,
     "distance_weighted.*needs distance='euclidean'"),
    (dict(neg_strategy="distance_weighted", distance="squared_euclidean"), ValueError,
     "needs distance='euclidean'"),
    (dict(neg_strategy="distance_weighted", margin=0.2), ValueError,
     "margin is only used by neg_strategy='semihard'"),
    (dict(neg_strategy="distance_weighted", cutoff=0.0), ValueError, "cutoff must be > 0"),
    (dict(neg_strategy="distance_weighted", cutoff=-1), ValueError, "cutoff must be > 0"),
    (dict(cutoff=float("nan")), ValueError, "cutoff must be finite"),
    (dict(cutoff="0.5"), TypeError, "cutoff must be a real number"),
    (dict(neg_strategy="distance_weighted", nonzero_loss_cutoff=0), ValueError,
     "nonzero_loss_cutoff must be > 0"),
    (dict(neg_strategy="distance_weighted", cutoff=1.4, nonzero_loss_cutoff=1.4), ValueError,
     r"cutoff must be < min\(nonzero_loss_cutoff, 2\) = 1.4"),
    (dict(neg_strategy="distance_weighted", cutoff=2.0, nonzero_loss_cutoff=5.0), ValueError,
     r"cutoff must be < min\(nonzero_loss_cutoff, 2\) = 2"),
    (dict(cutoff=1.0, nonzero_loss_cutoff=0.5), ValueError, "cutoff must be <"),  # every rule
    (dict(neg_strategy="distance_weighted", seed=1.5), TypeError, "seed must be None or an int"),
    (dict(neg_strategy="distance_weighted", seed=True), TypeError, "seed must be None or an int"),
    (dict(neg_strategy="distance_weighted", seed="1"), TypeError, "seed must be None or an int"),
    (dict(neg_strategy="distance_weighted", seed=torch.tensor(1.0)), TypeError, "seed"),
    (dict(neg_strategy="distance_weighted", seed=torch.tensor([1])), TypeError, "seed"),
    (dict(neg_strategy="distance_weighted", seed=-1), ValueError, r"seed must be .*2\*\*64"),
    (dict(neg_strategy="distance_weighted", seed=2 ** 64), ValueError, r"seed must be .*2\*\*64"),
    (dict(seed=2.0), TypeError, "seed must be None or an int"),  # checked for every rule
    (dict(neg_strategy="weighted"), ValueError, "neg_strategy must be one of"),
    (dict(backend="nope"), ValueError, "unknown backend 'nope'"),
]


@pytest.mark.parametrize("entry,kw,exc,match",
                         [("mine_topk", *case) for case in ARG_ERRORS]
                         + [("mine", *case) for case in ARG_ERRORS  # mine has no k
                            if not {"k_pos", "k_neg"} & set(case[0])])
def test_argument_errors_name_the_argument(entry, kw, exc, match):
    x, y, _, _ = _data(n=6, d=3, seed=11, normalize=True)
    with pytest.raises(exc, match=match):
        getattr(fastmine, entry)(x, y, **kw)


@needs_op
def test_raw_op_checks():
    x, y, _, _ = _data(n=6, d=3, seed=12)
    base = [x, y, None, None, None, None, 1, 1, 0, 0, 0, None, 0.5, 1.4, 0, "torch"]

    def call(**changes):
        names = ["embeddings", "labels", "ref_emb", "ref_labels", "query_ids", "ref_ids",
                 "k_pos", "k_neg", "pos", "neg", "distance", "margin", "cutoff", "nzlc",
                 "seed", "backend"]
        args = [changes.get(n, v) for n, v in zip(names, base)]
        return torch.ops.fastmine.mine_topk(*args)

    with pytest.raises(ValueError, match="k_neg must be >= 1"):
        call(k_neg=0)
    with pytest.raises(ValueError, match="unknown neg_strategy code 4"):
        call(neg=4)
    with pytest.raises(ValueError, match="distance_weighted needs distance euclidean"):
        call(neg=3, distance=2)
    with pytest.raises(ValueError, match="cutoff must be a finite number > 0"):
        call(neg=3, cutoff=0.0)
    with pytest.raises(NotImplementedError, match="backend 'nope'.*mine_topk_nope"):
        call(backend="nope")


# ------------------------------------------------------------------ choice of backend
def _cpu_without_topk(monkeypatch):
    """The "cpu" backend as an extension built before its top-k kernel: no rules."""
    old = _backends.get("cpu")
    monkeypatch.setitem(_backends._REGISTRY, "cpu", _backends.Backend("cpu", old.unavailable))


def test_auto_picks_a_backend_with_the_rule(monkeypatch):
    x, y, _, _ = _data(n=8, d=3, seed=13, normalize=True)
    cpu_rules = _backends.get("cpu").rules
    cpu_ok = "cpu" in fastmine.available_backends()
    for neg, topk in (("hard", True), ("semihard", True), ("distance_weighted", True),
                      ("distance_weighted", False)):
        needs = _backends.rules_needed(neg, topk)
        assert needs <= _backends.get("torch").rules
        expected = "cpu" if cpu_ok and needs <= cpu_rules else "torch"
        assert _backends.resolve("auto", CPU, needs) == expected
    _cpu_without_topk(monkeypatch)
    for neg, topk in (("hard", True), ("distance_weighted", False)):
        needs = _backends.rules_needed(neg, topk)
        assert _backends.resolve("auto", CPU, needs) == "torch"  # cpu lacks the rule
        assert not needs <= _backends.get("cpu").rules
    args = mine_module._prepare_topk(x, y, None, None, 2, 2, "easy", "hard", "euclidean", None,
                                     0.5, 1.4, None, None, None, "auto", topk=True)
    assert args[-1] == "torch"
    # plain mine keeps its fastest backend
    expected = "cpu" if "cpu" in fastmine.available_backends() else "torch"
    assert _backends.resolve("auto", CPU, _backends.rules_needed("hard", False)) == expected
    _assert_same(fastmine.mine_topk(x, y, k_pos=2, k_neg=3),
                 fastmine.mine_topk(x, y, k_pos=2, k_neg=3, backend="torch"))


@pytest.mark.parametrize("call,what", [
    (lambda x, y: fastmine.mine_topk(x, y, k_neg=2, backend="cpu"), "top-k mining"),
    (lambda x, y: fastmine.mine_topk(x, y, neg_strategy="distance_weighted", backend="cpu"),
     "distance_weighted sampling"),
    (lambda x, y: fastmine.mine(x, y, neg_strategy="distance_weighted", backend="cpu"),
     "distance_weighted sampling"),
])
def test_explicit_backend_without_the_rule_raises(call, what, monkeypatch):
    _cpu_without_topk(monkeypatch)
    x, y, _, _ = _data(n=8, d=3, seed=14, normalize=True)
    with pytest.raises(NotImplementedError, match=f"backend 'cpu' does not implement {what}"):
        call(x, y)


@needs_op
def test_kernels_reject_distance_weighted_by_name():
    # The raw ops, below fastmine.mine's routing: fastmine::mine and mine_select
    # carry no seed; fastmine::mine_topk runs the backend's op, or names it.
    x, y, _, _ = _data(n=6, d=3, seed=15)
    dw = NEG_STRATEGIES["distance_weighted"]
    with pytest.raises(NotImplementedError, match="backend 'cpu'.*mined by fastmine::mine_topk"):
        torch.ops.fastmine.mine(x, y, None, None, None, None, 0, dw, 0, None, "cpu")
    with pytest.raises(NotImplementedError, match="backend 'torch'.*mined by fastmine::mine_topk"):
        torch.ops.fastmine.mine(x, y, None, None, None, None, 0, dw, 0, None, "torch")
    with pytest.raises(NotImplementedError, match="distance_weighted.*CPU mine / mine_select"):
        torch.ops.fastmine.mine_select(x, y, x, y, None, None, 0, dw, 0, None)
    with pytest.raises(NotImplementedError, match="backend 'nope' does not implement top-k"):
        torch.ops.fastmine.mine_topk(x, y, None, None, None, None, 1, 1, 0, 0, 0, None, 0.5,
                                     1.4, 0, "nope")


def test_codes_mirror_strategies_h():
    assert NEG_STRATEGIES["distance_weighted"] == 3
    assert POS_STRATEGIES == {"easy": 0, "hard": 1} and DISTANCES["euclidean"] == 0


def test_eager_reference_without_the_extension(monkeypatch):
    # fastmine._C missing: backend "torch" runs reference_topk eagerly (plain autograd).
    x, y, r, ry = _data(n=10, d=3, m=7, seed=16, normalize=True)
    kw = dict(k_pos=2, k_neg=3, neg_strategy="distance_weighted", seed=2 ** 64 - 3,
              query_ids=torch.arange(10), ref_ids=torch.arange(7))
    want = rt.mine_topk(x, y, r, ry, **kw)
    monkeypatch.setattr(_extension, "loaded", lambda: False)
    _assert_same(fastmine.mine_topk(x, y, r, ry, backend="torch", **kw), want)
    res = fastmine.mine(x, y, neg_strategy="distance_weighted", seed=4, backend="torch")
    assert torch.equal(res.neg_idx, rt.mine_topk(x, y, neg_strategy="distance_weighted",
                                                 seed=4).neg_idx[:, 0])
