"""The contrastive losses' call surface and the package's public names.

* A PML ``indices_tuple`` passed positionally (PML's ``loss(embeddings, labels,
  indices_tuple, ref_emb, ref_labels)``) is refused by name, on every backend
  and both entry points (``forward``, ``per_anchor``).
* ``fastmine.__init__``'s docstring example runs and is NaN-free when no
  anchor is valid; ``__all__`` of fastmine, fastmine.contrastive and
  fastmine.mine name exactly public, existing objects.
"""
import importlib

import pytest
import torch

import fastmine
from fastmine import contrastive as C

LOSSES = [C.SupConLoss, C.NTXentLoss, C.MultiSimilarityLoss]


def _batch(n=6, d=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2])


def _pml_indices_tuple(labels):
    """A PML pair tuple (a1, p, a2, n) over the batch, as a PML miner returns it."""
    same = labels[:, None] == labels[None, :]
    a1, p = torch.nonzero(same & ~torch.eye(len(labels), dtype=torch.bool), as_tuple=True)
    a2, n = torch.nonzero(~same, as_tuple=True)
    return a1, p, a2, n


@pytest.mark.parametrize("cls", LOSSES)
@pytest.mark.parametrize("backend", ["torch", "chunked", "auto"])
@pytest.mark.parametrize("container", [tuple, list])
def test_positional_indices_tuple_is_refused_by_name(cls, backend, container):
    emb, y = _batch()
    loss = cls(backend=backend)
    pairs = container(_pml_indices_tuple(y))
    for call in (lambda: loss(emb, y, pairs),  # PML: loss(embeddings, labels, indices_tuple)
                 lambda: loss(emb, y, pairs, emb, y),  # ... , ref_emb, ref_labels)
                 lambda: loss.per_anchor(emb, y, pairs)):
        with pytest.raises(TypeError, match=r"take no PML indices_tuple: the third argument "
                                            r"is ref_emb .*got a " + container.__name__):
            call()


def test_ref_emb_tensor_still_accepted():
    """The guard refuses only tuples / lists: a tensor ref_emb is a memory bank."""
    emb, y = _batch()
    for cls in LOSSES:
        assert torch.isfinite(cls(backend="torch")(emb, y, emb[:4].clone(), y[:4]))


def _init_example():
    """The code lines of fastmine's module docstring (indented by 4)."""
    lines = [ln[4:] for ln in fastmine.__doc__.splitlines() if ln.startswith("    ")]
    assert lines, "fastmine's docstring has no example"
    return "\n".join(lines)


@pytest.mark.parametrize("labels", [[0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 5]],
                         ids=["valid", "no_negative", "no_positive"])
def test_init_docstring_example_is_nan_free(labels):
    """The package docstring's example: finite, differentiable, even when no anchor
    is valid (a mean over the empty set of valid anchors would be NaN)."""
    embeddings = torch.randn(6, 4, generator=torch.Generator().manual_seed(1),
                             requires_grad=True)
    scope = {"fastmine": fastmine, "torch": torch, "embeddings": embeddings,
             "labels": torch.tensor(labels)}
    exec(_init_example(), scope)
    loss = scope["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(embeddings.grad).all()


def test_fastmine_all_is_every_public_name():
    """__all__ = the public names bound by ``import fastmine`` (functions, classes and
    the public submodules), each exactly once, none private."""
    public = {n for n in vars(fastmine) if not n.startswith("_")} | {"__version__"}
    assert len(fastmine.__all__) == len(set(fastmine.__all__))
    assert set(fastmine.__all__) == public
    assert not [n for n in fastmine.__all__ if n.startswith("_") and n != "__version__"]


@pytest.mark.parametrize("module", ["fastmine.contrastive", "fastmine.mine"])
def test_module_all_names_exist_and_are_public(module):
    mod = importlib.import_module(module)
    assert mod.__all__, f"{module} has no __all__"
    for name in mod.__all__:
        assert not name.startswith("_") and hasattr(mod, name), name
