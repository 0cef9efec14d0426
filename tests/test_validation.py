"""Input validation: every error names the offending argument."""
import pytest
import torch

import fastmine

X = torch.randn(6, 3)
Y = torch.tensor([0, 0, 1, 1, 2, 2])
R = torch.randn(4, 3)
RY = torch.tensor([0, 1, 2, 3])

CASES = [
    (dict(embeddings=torch.randn(6)), ValueError, "embeddings must be 2-D"),
    (dict(embeddings=torch.randint(0, 3, (6, 3))), TypeError, "embeddings must be float"),
    (dict(labels=Y.float()), TypeError, "labels must have an integer dtype"),
    (dict(labels=Y[:, None]), ValueError, "labels must be 1-D"),
    (dict(labels=Y[:5]), ValueError, "labels has length 5 but embeddings has 6"),
    (dict(ref_emb=R), ValueError, r"ref_labels is missing"),
    (dict(ref_labels=RY), ValueError, r"ref_emb is missing"),
    (dict(ref_emb=torch.randn(4, 5), ref_labels=RY), ValueError, "ref_emb has dim 5"),
    (dict(ref_emb=R.double(), ref_labels=RY), TypeError, "must have the same dtype"),
    (dict(ref_emb=R, ref_labels=RY[:3]), ValueError, "ref_labels has length 3 but ref_emb has 4"),
    (dict(pos_strategy="medium"), ValueError, "pos_strategy must be one of"),
    (dict(neg_strategy="random"), ValueError, "neg_strategy must be one of"),
    (dict(distance="manhattan"), ValueError, "distance must be one of"),
    (dict(backend="metal"), ValueError, "unknown backend 'metal'"),
    (dict(neg_strategy="semihard", margin=-0.1), ValueError, "margin must be > 0"),
    (dict(neg_strategy="semihard", margin=0.0), ValueError, "margin must be > 0"),  # empty window
    (dict(neg_strategy="semihard", margin=float("nan")), ValueError, "margin must be finite"),
    (dict(margin=0.2), ValueError, "margin is only used by neg_strategy='semihard'"),
    (dict(query_ids=torch.arange(5)), ValueError, "query_ids has length 5"),
    (dict(query_ids=torch.arange(6.0)), TypeError, "query_ids must have an integer dtype"),
    (dict(ref_ids=torch.arange(6)), ValueError, "ref_ids given without ref_emb"),
    (dict(ref_emb=R, ref_labels=RY, query_ids=torch.arange(6)), ValueError, "ref_ids is missing"),
    (dict(ref_emb=R, ref_labels=RY, query_ids=torch.arange(6), ref_ids=torch.arange(3)),
     ValueError, "ref_ids has length 3 but ref_emb has 4"),
]


@pytest.mark.parametrize("overrides,exc,match", CASES)
def test_errors_name_the_argument(overrides, exc, match):
    kw = dict(embeddings=X, labels=Y)
    kw.update(overrides)
    with pytest.raises(exc, match=match):
        fastmine.mine(kw.pop("embeddings"), kw.pop("labels"), **kw)


@pytest.mark.parametrize("backend", fastmine.available_backends())
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_rejected(backend, bad):
    x = X.clone()
    x[2, 1] = bad
    with pytest.raises(ValueError, match="embeddings contains NaN or Inf"):
        fastmine.mine(x, Y, backend=backend)
    r = R.clone()
    r[0, 0] = bad
    with pytest.raises(ValueError, match="ref_emb contains NaN or Inf"):
        fastmine.mine(X, Y, r, RY, backend=backend)


@pytest.mark.parametrize("backend", fastmine.available_backends())
def test_cosine_rejects_zero_rows(backend):
    x = X.clone()
    x[3] = 0
    with pytest.raises(ValueError, match="embeddings row 3 has norm 0"):
        fastmine.mine(x, Y, distance="cosine", backend=backend)
    fastmine.mine(x, Y, distance="euclidean", backend=backend)  # fine for Euclidean
    tiny = X.clone().float()
    tiny[2] = 1e-25  # |x|^2 = 6e-50 underflows in float32: cos would be 0/0
    with pytest.raises(ValueError, match="row 2 has norm 0 .zero, D = 0, or a squared norm below"):
        fastmine.mine(tiny, Y, distance="cosine", backend=backend)


def test_devices_must_match():
    meta = torch.empty(6, 3, device="meta")
    with pytest.raises(ValueError, match="labels is on cpu but embeddings are on meta"):
        fastmine.mine(meta, Y)


def test_missing_backend_has_clear_error():
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        fastmine.mine(X, Y, backend="cuda")


def test_compiled_op_checks_its_arguments():
    if "cpu" not in fastmine.available_backends():
        pytest.skip("extension not built")
    op = torch.ops.fastmine.mine_select
    with pytest.raises(RuntimeError, match="fastmine: embeddings have dim 3 but ref_emb has dim 2"):
        op(X, Y, torch.randn(4, 2), RY, None, None, 0, 0, 0, None)
    with pytest.raises(RuntimeError, match="unknown neg_strategy code 7"):
        op(X, Y, R, RY, None, None, 0, 7, 0, None)
    with pytest.raises(RuntimeError, match="query_ids and ref_ids must be given together"):
        op(X, Y, R, RY, torch.arange(6), None, 0, 0, 0, None)


def test_batch_easy_hard_miner_points_distance_weighted_to_its_miner():
    """The losses take the sampling rule (tests/test_losses_topk.py); the
    deterministic PML drop-in refuses it by name and names the miner that has it."""
    from fastmine import miners
    with pytest.raises(ValueError, match="DistanceWeightedMiner"):
        miners.BatchEasyHardMiner(neg_strategy="distance_weighted")


# ------------------------------------------------------------------ scalar argument checks
def test_check_bool_accepts_only_flags():
    import numpy as np
    from fastmine._contract import check_bool
    for v, want in ((True, True), (False, False), (np.bool_(True), True),
                    (torch.tensor(False), False)):
        got = check_bool("flag", v)
        assert got is want
    for bad in (1, 0, "False", "yes", None, [True], 1.0, torch.tensor([True]), torch.tensor(1)):
        with pytest.raises(TypeError, match="flag must be a bool"):
            check_bool("flag", bad)


def test_real_arguments_that_require_grad_are_rejected():
    # A learnable margin would be read once as a float and never trained.
    margin = torch.nn.Parameter(torch.tensor(0.2))
    with pytest.raises(TypeError, match="margin is a tensor that requires grad"):
        fastmine.mine(X, Y, neg_strategy="semihard", margin=margin)
    res = fastmine.mine(X, Y, neg_strategy="semihard", margin=margin.detach())
    ref = fastmine.mine(X, Y, neg_strategy="semihard", margin=0.2)
    assert torch.equal(res.neg_idx, ref.neg_idx)
