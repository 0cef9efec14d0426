"""The streaming contrastive losses in float32 / bfloat16 / float16, at a small
temperature, and with every accepted label / id dtype (helpers shared with
tests/test_contrastive.py)."""
import pytest
import torch

from test_contrastive import SPECS, STREAMING, _cases, _data, _loss_and_grads
from fastmine import contrastive as C


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 2e-4), (torch.bfloat16, 2e-4),
                                       (torch.float16, 2e-4)])
@pytest.mark.parametrize("name", ["supcon", "ntxent", "ms_mined", "supcon_t001"])
@pytest.mark.parametrize("backend", STREAMING)
def test_low_precision_against_float64(name, dtype, rel, backend):
    """fp32 computes in fp32, fp16/bf16 accumulate in fp32: the loss is the float64
    loss of the same (rounded) rows within fp32 precision; gradients finite."""
    cls, kw = SPECS[name]
    emb, y, ref, ry = _data(dtype=dtype)
    for kind, *args in _cases(emb, y, ref, ry):
        ls, gs = _loss_and_grads(cls, kw, backend, 7, *args)
        args64 = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                  for a in args]
        lr, _ = _loss_and_grads(cls, kw, "torch", 256, *args64)
        assert ls.dtype == dtype and torch.isfinite(ls), kind
        assert all(g.dtype == dtype and torch.isfinite(g).all() for g in gs), kind
        tol = rel if dtype == torch.float32 else 1e-2  # the loss is rounded to dtype
        if name == "ms_mined" and dtype != torch.float32:
            continue  # the selection's thresholds move with the fp32 similarities
        assert float(ls) == pytest.approx(float(lr), rel=tol), kind


@pytest.mark.parametrize("backend", STREAMING)
def test_small_temperature_fp32_streaming(backend):
    emb, y, _, _ = _data(dtype=torch.float32, d=16)
    emb = emb * 3
    for cls in (C.SupConLoss, C.NTXentLoss):
        e = emb.clone().requires_grad_()
        loss = cls(temperature=0.01, backend=backend, block_size=5)(e, y)
        loss.backward()
        expect = cls(temperature=0.01, backend="torch")(emb.double(), y)
        assert torch.isfinite(loss) and torch.isfinite(e.grad).all()
        assert float(loss.detach()) == pytest.approx(float(expect), rel=1e-4)


@pytest.mark.parametrize("backend", STREAMING)
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.uint32])
def test_label_and_id_dtypes(backend, dtype):
    """Every accepted label / id dtype gives the int64 result (uint32 is widened)."""
    emb, y, ref, ry = _data(n=12, m=9, classes=4, seed=8)
    y, ry = y % 50, ry % 50  # representable in int8 / uint8
    qid, rid = torch.arange(12), torch.cat([torch.arange(3), 40 + torch.arange(6)])
    for cls, kw in (SPECS["supcon"], SPECS["ms_mined"]):
        loss = cls(**kw, backend=backend, block_size=5)
        expect = loss(emb, y, ref, ry, qid, rid)
        got = loss(emb, y.to(dtype), ref, ry.to(dtype), qid.to(dtype), rid.to(dtype))
        assert float(got) == float(expect)
