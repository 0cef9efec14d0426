"""The losses' call contract: keyword-only settings, checked flags, checked
reduce_terms inputs, named input errors, and a PML indices_tuple refused."""
import pytest
import torch

from fastmine import losses

LOSSES = (losses.TripletMarginLoss, losses.MarginLoss)


def _batch(n=8, d=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g), torch.arange(n) % 3


# --- every argument after margin is keyword-only ---------------------------------

@pytest.mark.parametrize("make", [
    # PML's TripletMarginLoss(margin, swap, smooth_loss, triplets_per_anchor, ...)
    lambda: losses.TripletMarginLoss(0.1, False),
    lambda: losses.TripletMarginLoss(0.1, "cosine"),
    # PML's MarginLoss(margin, nu, beta, triplets_per_anchor, learn_beta, num_classes, ...)
    lambda: losses.MarginLoss(0.2, 0.0),
    lambda: losses.MarginLoss(0.2, 1.2, True),
])
def test_settings_after_margin_are_keyword_only(make):
    with pytest.raises(TypeError, match="positional argument"):
        make()


@pytest.mark.parametrize("cls", LOSSES)
def test_margin_may_be_positional(cls):
    assert cls(0.3).margin == 0.3


# --- flags are bools, not truthy values -------------------------------------------

@pytest.mark.parametrize("cls,flag", [(c, f) for c in LOSSES
                                      for f in ("normalize_embeddings", "average_nonzero")]
                         + [(losses.MarginLoss, "learn_beta")])
@pytest.mark.parametrize("bad", ["False", 0, 1.0, None])
def test_flags_must_be_bool(cls, flag, bad):
    with pytest.raises(TypeError, match=f"{flag} must be a bool"):
        cls(**{flag: bad})


@pytest.mark.parametrize("cls,flag", [(c, f) for c in LOSSES
                                      for f in ("normalize_embeddings", "average_nonzero")]
                         + [(losses.MarginLoss, "learn_beta")])
def test_flags_accept_bool_tensors(cls, flag):
    assert getattr(cls(**{flag: torch.tensor(True)}), flag) is True


# --- reduce_terms checks its inputs ------------------------------------------------

@pytest.mark.parametrize("terms,valid,kw,exc,match", [
    (torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.bool), {}, TypeError,
     "terms must be a floating-point torch.Tensor, got torch.int64"),
    ([1.0, 2.0], torch.ones(2, dtype=torch.bool), {}, TypeError,
     "terms must be a floating-point torch.Tensor, got list"),
    (torch.ones(3), torch.ones(3), {}, TypeError, "valid must be a bool torch.Tensor, got torch.float32"),
    (torch.ones(3), None, {}, TypeError, "valid must be a bool torch.Tensor, got NoneType"),
    (torch.ones(3), torch.ones(4, dtype=torch.bool), {}, ValueError,
     r"valid must have the shape of terms \(3,\), got \(4,\)"),
    (torch.ones(2, 2, 2), torch.ones(2, dtype=torch.bool), {}, ValueError,
     r"valid must have the shape of terms \(2, 2, 2\), got \(2,\)"),
    (torch.ones(3), torch.ones(3, dtype=torch.bool), {"average_nonzero": "yes"}, TypeError,
     "average_nonzero must be a bool"),
    (torch.ones(3), torch.ones(3, dtype=torch.bool), {"average_nonzero": 1}, TypeError,
     "average_nonzero must be a bool"),
])
def test_reduce_terms_checks_inputs(terms, valid, kw, exc, match):
    with pytest.raises(exc, match=match):
        losses.reduce_terms(terms, valid, "mean", **kw)


def test_reduce_terms_accepts_valid_inputs():
    terms = torch.tensor([0.0, 2.0, 4.0, 0.0])
    valid = torch.tensor([True, True, True, False])
    assert losses.reduce_terms(terms, valid).item() == 2.0
    assert losses.reduce_terms(terms, valid, average_nonzero=True).item() == 3.0


# --- forward: fastmine's named errors; a PML indices_tuple is refused --------------

@pytest.mark.parametrize("cls", LOSSES)
@pytest.mark.parametrize("normalize", [False, True])
def test_pml_indices_tuple_is_refused(cls, normalize):
    x, y = _batch()
    triplets = (torch.tensor([0]), torch.tensor([3]), torch.tensor([1]))
    fn = cls(normalize_embeddings=normalize, backend="cpu")
    for indices_tuple in (triplets, list(triplets)):
        with pytest.raises(TypeError, match="fastmine losses take no PML indices_tuple.*"
                                            "the third argument is ref_emb"):
            fn(x, y, indices_tuple)
        with pytest.raises(TypeError, match="take no PML indices_tuple"):
            fn.per_anchor(x, y, indices_tuple)


@pytest.mark.parametrize("cls", LOSSES)
@pytest.mark.parametrize("make_emb,make_ref,exc,match", [
    (lambda x: x.numpy(), lambda x: None, TypeError, "embeddings must be a torch.Tensor, got ndarray"),
    (lambda x: x.reshape(-1), lambda x: None, ValueError, r"embeddings must be 2-D \[rows, dim\]"),
    (lambda x: x.long(), lambda x: None, TypeError, "embeddings must be float16/bfloat16/float32"),
    (lambda x: x, lambda x: x[0], ValueError, r"ref_emb must be 2-D \[rows, dim\]"),
    (lambda x: x, lambda x: x.int(), TypeError, "ref_emb must be float16/bfloat16/float32"),
    (lambda x: x, lambda x: x.numpy(), TypeError, "ref_emb must be a torch.Tensor, got ndarray"),
])
def test_normalized_inputs_get_named_errors(cls, make_emb, make_ref, exc, match):
    """With normalize_embeddings the inputs are checked before F.normalize."""
    x, y = _batch()
    ref = make_ref(x)
    with pytest.raises(exc, match=match):
        cls(normalize_embeddings=True, backend="cpu")(make_emb(x), y, ref,
                                                      None if ref is None else y)


# --- the public names -------------------------------------------------------------

def test_all_lists_the_public_api():
    public = {"reduce_terms", "TripletMarginLoss", "MarginLoss", "triplet_margin_loss",
              "margin_loss", "MultiSimilarityLoss", "NTXentLoss", "SupConLoss"}
    assert set(losses.__all__) == public and len(losses.__all__) == len(public)
    namespace = {}
    exec("from fastmine.losses import *", namespace)
    # the star import brings the API, not the module's helpers and imports
    assert set(namespace) - {"__builtins__"} == public
