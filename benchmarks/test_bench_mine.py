"""pytest-benchmark suite: every provider side by side, one group per size and mode.

Not collected by default (testpaths = tests).  Run:

    pytest benchmarks --benchmark-json out.json          # tiny sizes
    FASTMINE_BENCH_SIZES=1024,4096 FASTMINE_BENCH_D=128 pytest benchmarks
    pytest benchmarks --benchmark-disable                # CI: each case runs once, as a test

Groups are "N=.. M=.. D=.. dtype mode", so pytest-benchmark prints one table per
size with fastmine, PML and the blocked matmul floor next to each other.
"""
import os

import pytest
import torch

from benchmarks import mine as M
from benchmarks import providers as P

DEVICE = torch.device(os.environ.get("FASTMINE_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
SIZES = [int(s) for s in os.environ.get("FASTMINE_BENCH_SIZES", "128,256").split(",")]
DIMS = [int(s) for s in os.environ.get("FASTMINE_BENCH_D", "32").split(",")]
DTYPES = os.environ.get("FASTMINE_BENCH_DTYPES", "fp32").split(",")
STRATEGY = os.environ.get("FASTMINE_BENCH_STRATEGY", "easy/hard")
PROVIDERS, _MISSING = P.all_providers(DEVICE)

_data_cache = {}


def _data(n, d, dt):
    key = (n, d, dt)
    if key not in _data_cache:
        _data_cache.clear()
        _data_cache[key] = M.make_data(n, None, d, M.DTYPES[dt][0], DEVICE, 8, seed=n + d)
    return _data_cache[key]


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.name.replace(" ", "_"))
def test_mine(benchmark, provider, n, d, dt, mode):
    why = provider.unsupported(DEVICE, STRATEGY, mode, False)
    if why:
        pytest.skip(why)
    benchmark.group = f"N={n} D={d} {dt} {mode} {STRATEGY}"
    dtype, precision = M.DTYPES[dt]
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision or "highest")
    try:
        data = _data(n, d, dt)
        setup, fn = M._call(provider, mode, data, STRATEGY)

        def once():
            state = setup()
            fn(state)
            if DEVICE.type == "cuda":
                torch.cuda.synchronize(DEVICE)
        benchmark(once)
        if provider.name != P.FLOOR:
            # The call must have produced real distances (and, with a backward, gradients).
            pos, neg = provider.run(data[0], data[1], None, None, *STRATEGY.split("/"))
            assert torch.isfinite(pos).all() and torch.isfinite(neg).all() and pos.numel() > 0
    finally:
        torch.set_float32_matmul_precision(prev)
