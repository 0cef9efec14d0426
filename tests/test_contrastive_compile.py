"""The contrastive losses under torch.compile(fullgraph=True): the same loss and
parameter gradients as eager (the compiled extension's op with its fake and C++
autograd; the PyTorch streaming backend traced through its autograd.Function; the
Triton kernels as the custom op fastmine::contrastive_triton, under the interpreter)."""
import pytest
import torch

from fastmine import _ops
from fastmine import contrastive as C


def _triton_interpreted() -> bool:
    """Triton is installed and runs on CPU tensors (TRITON_INTERPRET=1, tests/conftest.py)."""
    try:
        from fastmine import _triton
    except ImportError:
        return False
    return _triton.triton is not None and _triton.INTERPRETED

# (loss, kwargs, backend, with a bank, torch.compile backend): inductor once (its
# code generation costs ~20 s per graph on a 2-core machine), aot_eager (the same
# dynamo graph and AOT autograd, no code generation) for the rest.
CASES = [(C.SupConLoss, {}, "chunked", False, "aot_eager")]
if _ops.has_contrastive_ops():
    CASES += [(C.SupConLoss, {}, "cpu", False, "inductor"),
              (C.NTXentLoss, {}, "cpu", True, "aot_eager"),
              (C.MultiSimilarityLoss, {"miner_epsilon": 0.1}, "cpu", True, "aot_eager")]

if _triton_interpreted():
    # the Triton kernels under the interpreter: one opaque op (fastmine::contrastive_triton)
    CASES += [(C.SupConLoss, {}, "triton", False, "aot_eager"),
              (C.NTXentLoss, {}, "triton", True, "aot_eager"),
              (C.MultiSimilarityLoss, {"miner_epsilon": 0.1}, "triton", False, "aot_eager")]


@pytest.mark.parametrize("cls,kw,backend,with_ref,compiler", CASES,
                         ids=[f"{c[0].__name__}-{c[2]}-{'ref' if c[3] else 'self'}-{c[4]}"
                              for c in CASES])
def test_compile_fullgraph_matches_eager(cls, kw, backend, with_ref, compiler):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    bank, bank_y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    # cpu: tiles smaller than the batch; chunked: one tile (dynamo unrolls the tile
    # loops, and inductor's compile time grows with the tiles)
    loss_fn = cls(**kw, backend=backend, block_size=5 if backend == "cpu" else 256)

    def step(x, y):
        emb = model(x)
        return loss_fn(emb, y, bank, bank_y) if with_ref else loss_fn(emb, y)

    params = list(model.parameters())
    eager = step(x, y)
    g_eager = torch.autograd.grad(eager, params)
    out = torch.compile(step, fullgraph=True, backend=compiler)(x, y)
    g_comp = torch.autograd.grad(out, params)
    torch.testing.assert_close(out, eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)
