"""Small-batch call overhead and memory-bank memory: the one-op-per-device targets.

    python -m benchmarks.call_overhead                 # CPU, ~1 minute
    python -m benchmarks.call_overhead --out DIR       # also write call_overhead.json / .md
    python -m benchmarks.call_overhead --only xbm      # one group: timing, memory or xbm

Timing (medians of --repeats calls after --warmup, time.perf_counter, one
process, all cells on fresh random data, fp32, easy positive + hard negative):

* ``raw op``: ``torch.ops.fastmine.mine`` called directly (no argument checks);
* ``plain autograd``: the floor of any autograd step of this shape -- the two
  pair distances of fixed indices in plain PyTorch ops, forward + backward;
* ``mine``: ``fastmine.mine`` forward (inputs without grad), and forward +
  ``(pos_dist - neg_dist).sum().backward()``;
* ``loss``: ``fastmine.losses.TripletMarginLoss(neg_strategy="hard")`` forward +
  backward, next to PML's ``BatchEasyHardMiner`` + ``TripletMarginLoss`` (the
  same mining, ``LpDistance(normalize_embeddings=False)``).

On a GPU (``--device cuda``, the small-batch target of issue #13): per backend
with CUDA kernels (triton, cuda), N in {256, 1024}, D = 128, fp32 and bf16,
wall time per call of back-to-back calls (one synchronisation per
``CUDA_INNER_CALLS`` calls, so a host-bound call is timed by its host time and
a device-bound one by its device time): ``mine`` forward and forward + backward,
the plain-autograd floor, the loss forward + backward, the same step replayed
from a CUDA graph (``graph``; the capture's error when it cannot be captured),
and PML's miner + loss.

Memory (peak RSS increase of one call above its inputs, VmHWM reset, as in
``benchmarks.mine``): queries x a memory bank that does not require grad,
forward (+ backward); and (``xbm``) one ``CrossBatchMemory`` step, batch 64
against a full 1,000,000 x 64 bf16 memory, ``losses.TripletMarginLoss``,
forward + backward, after a warm-up step (which builds the memory's spare rows).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import fastmine
from benchmarks.mine import environment, load_snapshot, measure_cpu_peak, measure_cuda_peak


def median_us(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


CUDA_INNER_CALLS = 20  # back-to-back calls per timed sample on a GPU


def cuda_median_us(fn, repeats: int, warmup: int, inner: int = CUDA_INNER_CALLS) -> float:
    """Median wall time per call (µs) of ``inner`` back-to-back calls of ``fn``
    followed by one device synchronisation, over ``repeats`` samples."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times) * 1e6


def capture_step(step, warmup: int = 3) -> "torch.cuda.CUDAGraph":
    """``step()`` (a forward + backward writing into fixed tensors) captured in a
    CUDA graph after ``warmup`` eager calls on a side stream, as PyTorch's
    whole-network capture recipe does; raises what the capture raises (e.g. a
    host synchronisation inside the step)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def cuda_timing_cells(repeats: int, warmup: int) -> list:
    """The small-batch rows on the GPU (module docstring), one per (backend, N, dtype)."""
    from pytorch_metric_learning import losses as pml_losses, miners as pml_miners
    from pytorch_metric_learning.distances import LpDistance

    device = torch.device("cuda")
    backends = [b for b in fastmine.available_backends(device) if b in ("triton", "cuda")]
    rows = []
    for backend in backends:
        for n, d, dtype in ((256, 128, torch.float32), (256, 128, torch.bfloat16),
                            (1024, 128, torch.float32)):
            g = torch.Generator(device=device).manual_seed(n)
            x = torch.randn(n, d, generator=g, device=device).to(dtype)
            y = torch.randint(0, max(2, n // 8), (n,), generator=g, device=device)
            xg = x.clone().requires_grad_()
            row = dict(backend=backend, n=n, d=d, dtype=str(dtype).replace("torch.", ""))
            row["mine_us"] = cuda_median_us(lambda: fastmine.mine(x, y, backend=backend),
                                            repeats, warmup)

            def mine_fb():
                res = fastmine.mine(xg, y, backend=backend)
                (res.pos_dist - res.neg_dist).float().sum().backward()
            row["mine_fwd_bwd_us"] = cuda_median_us(mine_fb, repeats, warmup)
            mined = fastmine.mine(x, y, backend=backend)
            pos_idx, neg_idx = mined.pos_idx.clamp_min(0), mined.neg_idx.clamp_min(0)

            def plain_fb():
                dp = (xg - xg[pos_idx]).float().pow(2).sum(1).sqrt()
                dn = (xg - xg[neg_idx]).float().pow(2).sum(1).sqrt()
                (dp - dn).sum().backward()
            row["plain_fwd_bwd_us"] = cuda_median_us(plain_fb, repeats, warmup)
            loss = fastmine.losses.TripletMarginLoss(margin=0.1, neg_strategy="hard", backend=backend)

            def loss_fb():
                xg.grad = None
                loss(xg, y).backward()
            row["loss_fwd_bwd_us"] = cuda_median_us(loss_fb, repeats, warmup)
            try:
                graph = capture_step(loss_fb)
                row["graph_fwd_bwd_us"] = cuda_median_us(graph.replay, repeats, warmup)
                row["graph_error"] = None
            except Exception as e:  # noqa: BLE001 - not capturable is a result
                row["graph_fwd_bwd_us"] = None
                row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
                torch.cuda.synchronize()
            dist = LpDistance(normalize_embeddings=False)
            miner = pml_miners.BatchEasyHardMiner(pos_strategy="easy", neg_strategy="hard",
                                                  distance=dist)
            pml_loss = pml_losses.TripletMarginLoss(margin=0.1, distance=dist)
            row["pml_fwd_bwd_us"] = cuda_median_us(lambda: pml_loss(xg, y, miner(xg, y)).backward(),
                                                   max(5, repeats // 10), max(2, warmup // 10))
            row["pml_over_loss"] = row["pml_fwd_bwd_us"] / row["loss_fwd_bwd_us"]
            rows.append(row)
            graph = (f"{row['graph_fwd_bwd_us']:7.1f} us" if row["graph_error"] is None
                     else f"not capturable ({row['graph_error'][:80]})")
            print(f"{backend:6s} N={n:5d} D={d:3d} {row['dtype']:8s}: mine {row['mine_us']:7.1f} us | "
                  f"mine fwd+bwd {row['mine_fwd_bwd_us']:7.1f} us (plain autograd "
                  f"{row['plain_fwd_bwd_us']:7.1f} us) | loss fwd+bwd {row['loss_fwd_bwd_us']:7.1f} us "
                  f"| graph {graph} | PML {row['pml_fwd_bwd_us']:8.1f} us "
                  f"({row['pml_over_loss']:.1f}x)", flush=True)
    return rows


def timing_cells(repeats: int, warmup: int) -> list:
    from pytorch_metric_learning import losses as pml_losses, miners as pml_miners
    from pytorch_metric_learning.distances import LpDistance

    rows = []
    op = torch.ops.fastmine.mine
    for n, d in ((16, 64), (128, 64), (512, 128), (2048, 128)):
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, d, generator=g)
        y = torch.randint(0, max(2, n // 8), (n,), generator=g)
        xg = x.clone().requires_grad_()
        row = dict(n=n, d=d)
        row["raw_op_us"] = median_us(lambda: op(x, y, None, None, None, None, 0, 0, 0, None, "cpu"),
                                     repeats, warmup)
        row["mine_us"] = median_us(lambda: fastmine.mine(x, y), repeats, warmup)

        def mine_fb():
            res = fastmine.mine(xg, y)
            (res.pos_dist - res.neg_dist).sum().backward()
        row["mine_fwd_bwd_us"] = median_us(mine_fb, repeats, warmup)
        # The autograd floor: the same gather + distance + backward in plain
        # PyTorch ops for fixed indices, no mining at all.
        mined = fastmine.mine(x, y)
        pos_idx, neg_idx = mined.pos_idx.clamp_min(0), mined.neg_idx.clamp_min(0)

        def plain_fb():
            dp = (xg - xg[pos_idx]).pow(2).sum(1).sqrt()
            dn = (xg - xg[neg_idx]).pow(2).sum(1).sqrt()
            (dp - dn).sum().backward()
        row["plain_fwd_bwd_us"] = median_us(plain_fb, repeats, warmup)
        loss = fastmine.losses.TripletMarginLoss(margin=0.1, neg_strategy="hard")
        row["loss_fwd_bwd_us"] = median_us(lambda: loss(xg, y).backward(), repeats, warmup)
        dist = LpDistance(normalize_embeddings=False)
        miner = pml_miners.BatchEasyHardMiner(pos_strategy="easy", neg_strategy="hard", distance=dist)
        pml_loss = pml_losses.TripletMarginLoss(margin=0.1, distance=dist)
        row["pml_fwd_bwd_us"] = median_us(lambda: pml_loss(xg, y, miner(xg, y)).backward(),
                                          max(20, repeats // 10), max(5, warmup // 10))
        row["mine_over_raw"] = row["mine_us"] / row["raw_op_us"]
        row["pml_over_loss"] = row["pml_fwd_bwd_us"] / row["loss_fwd_bwd_us"]
        rows.append(row)
        print(f"N={n:5d} D={d:3d}: raw op {row['raw_op_us']:8.1f} us | mine {row['mine_us']:8.1f} us "
              f"({row['mine_over_raw']:.2f}x raw) | mine fwd+bwd {row['mine_fwd_bwd_us']:8.1f} us "
              f"(plain autograd, fixed pairs: {row['plain_fwd_bwd_us']:8.1f} us) | "
              f"loss fwd+bwd {row['loss_fwd_bwd_us']:8.1f} us | PML {row['pml_fwd_bwd_us']:9.1f} us "
              f"({row['pml_over_loss']:.1f}x)", flush=True)
    return rows


def _peak(setup, fn, device: torch.device) -> tuple:
    """(peak bytes of one call above its inputs, method): RSS on the CPU, the
    allocator's peak on a GPU (benchmarks.mine's measurements)."""
    if device.type == "cuda":
        return measure_cuda_peak(setup, fn, device)
    return measure_cpu_peak(setup, fn)


def memory_cells(device: torch.device) -> list:
    rows = []
    cases = [(64, 1_000_000, 64, torch.bfloat16, True), (16, 100_000, 256, torch.float32, False)]
    for n, m, d, dtype, backward in cases:
        g = torch.Generator().manual_seed(m)
        bank = torch.randn(m, d, generator=g).to(device, dtype)
        bank_labels = torch.randint(0, m // 8, (m,), generator=g).to(device)
        x = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_(backward)
        y = torch.randint(0, m // 8, (n,), generator=g).to(device)

        def call(_):
            res = fastmine.mine(x, y, bank, bank_labels)
            if backward:
                (res.pos_dist - res.neg_dist).float().sum().backward()
        call(None)  # warm-up: allocator and thread pools
        peak, method = _peak(lambda: None, call, device)
        row = dict(n=n, m=m, d=d, dtype=str(dtype).replace("torch.", ""),
                   mode="forward+backward" if backward else "forward",
                   peak_extra_mib=peak / 2**20, method=method,
                   bank_mib=bank.numel() * bank.element_size() / 2**20)
        rows.append(row)
        print(f"{n} queries x {m} x {d} {row['dtype']} bank, {row['mode']}: peak extra "
              f"{row['peak_extra_mib']:.1f} MiB (bank {row['bank_mib']:.0f} MiB; {method})", flush=True)
    return rows


def xbm_cells(device: torch.device) -> list:
    n, m, d, dtype = 64, 1_000_000, 64, torch.bfloat16
    g = torch.Generator().manual_seed(m)
    xbm = fastmine.CrossBatchMemory(fastmine.losses.TripletMarginLoss(margin=0.1),
                                    embedding_size=d, memory_size=m)
    xbm.load_state_dict({"embedding_memory": torch.randn(m, d, generator=g).to(device, dtype),
                         "label_memory": torch.randint(0, m // 8, (m,), generator=g).to(device),
                         "id_memory": torch.arange(m, device=device),
                         "_extra_state": {"queue_idx": 0, "filled": m, "next_id": 0}},
                        strict=False)

    def batch():
        return (torch.randn(n, d, generator=g).to(device, dtype).requires_grad_(),
                torch.randint(0, m // 8, (n,), generator=g).to(device),
                torch.randint(0, m, (n,), generator=g).to(device))

    def step(b):
        xbm(*b).backward()
    step(batch())  # warm-up: the spare rows (one copy of the bank), allocator, thread pools
    step(batch())
    peak, method = _peak(batch, step, device)
    row = dict(n=n, m=m, d=d, dtype="bfloat16", mode="CrossBatchMemory step, forward+backward",
               peak_extra_mib=peak / 2**20, method=method,
               bank_mib=xbm.embedding_memory.numel() * xbm.embedding_memory.element_size() / 2**20)
    print(f"CrossBatchMemory step (TripletMarginLoss), batch {n}, memory {m} x {d} bfloat16, "
          f"forward+backward: peak extra {row['peak_extra_mib']:.1f} MiB (bank "
          f"{row['bank_mib']:.0f} MiB; {method})", flush=True)
    return [row]


def _us(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def markdown(result: dict) -> str:
    """call_overhead.md: the machine, the load, the timing rows (the CPU's or the
    GPU's columns) and the memory rows."""
    env = result["environment"]
    on_gpu = env["device"] == "cuda"
    machine = (f"GPU: {env['gpu']} (driver {env.get('driver')}, CUDA {env.get('cuda')}), "
               f"triton {env['triton']}" if on_gpu else
               f"CPU: {env['cpu']}, {env['torch_threads']} torch threads")
    lines = [f"# Call overhead and memory-bank memory ({env['date_utc']})", "",
             f"{machine}, torch {env['torch']}, fastmine {env['fastmine_git']}", "",
             f"Load before: {result['load_before']}; after: {result['load_after']}", ""]
    if on_gpu:
        lines += [f"Wall time per call of {CUDA_INNER_CALLS} back-to-back calls, then one "
                  "synchronisation (median).", "",
                  "| backend | N | D | dtype | mine µs | mine fwd+bwd µs | plain autograd fwd+bwd µs "
                  "| loss fwd+bwd µs | CUDA graph replay µs | PML fwd+bwd µs | PML / loss |",
                  "|" + "---|" * 11]
        for r in result["timing"]:
            graph = _us(r["graph_fwd_bwd_us"]) if r["graph_error"] is None else \
                "not capturable: " + r["graph_error"].replace("|", "/")[:120]
            lines.append(f"| {r['backend']} | {r['n']} | {r['d']} | {r['dtype']} | {_us(r['mine_us'])} | "
                         f"{_us(r['mine_fwd_bwd_us'])} | {_us(r['plain_fwd_bwd_us'])} | "
                         f"{_us(r['loss_fwd_bwd_us'])} | {graph} | {_us(r['pml_fwd_bwd_us'])} | "
                         f"{r['pml_over_loss']:.1f} |")
    else:
        lines += ["| N | D | raw op µs | mine µs | mine / raw | mine fwd+bwd µs "
                  "| plain autograd fwd+bwd µs | loss fwd+bwd µs | PML fwd+bwd µs | PML / loss |",
                  "|" + "---|" * 10]
        for r in result["timing"]:
            lines.append(f"| {r['n']} | {r['d']} | {r['raw_op_us']:.1f} | {r['mine_us']:.1f} | "
                         f"{r['mine_over_raw']:.2f} | {r['mine_fwd_bwd_us']:.1f} | "
                         f"{r['plain_fwd_bwd_us']:.1f} | "
                         f"{r['loss_fwd_bwd_us']:.1f} | {r['pml_fwd_bwd_us']:.1f} | "
                         f"{r['pml_over_loss']:.1f} |")
    lines += ["", "| queries | bank | D | dtype | mode | peak extra MiB | bank MiB |",
              "|" + "---|" * 7]
    for r in result["memory"]:
        lines.append(f"| {r['n']} | {r['m']} | {r['d']} | {r['dtype']} | {r['mode']} | "
                     f"{r['peak_extra_mib']:.1f} | {r['bank_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: the GPU rows (triton / cuda backends, CUDA graph replay)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed samples per cell (default: 400 on the CPU, 50 on a GPU)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed calls first (default: 50 on the CPU, 10 on a GPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--only", choices=("timing", "memory", "xbm"), default=None,
                    help="run one group of cells (default: all)")
    # not results.json: that name is benchmarks.mine's sweep, which benchmarks.report regenerates
    ap.add_argument("--out", default=None, help="write call_overhead.json and call_overhead.md here")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    on_gpu = args.device == "cuda"
    if args.repeats is None:
        args.repeats = 50 if on_gpu else 400
    if args.warmup is None:
        args.warmup = 10 if on_gpu else 50
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = dict(environment=environment(device), load_before=load_snapshot(1.0))
    run = lambda group: args.only in (None, group)
    timing = cuda_timing_cells if on_gpu else timing_cells
    result["timing"] = timing(args.repeats, args.warmup) if run("timing") else []
    result["memory"] = ((memory_cells(device) if run("memory") else [])
                        + (xbm_cells(device) if run("xbm") else []))
    result["load_after"] = load_snapshot(1.0)
    env = result["environment"]
    where = (f"GPU: {env['gpu']}" if on_gpu else
             f"CPU: {env['cpu']}, {env['torch_threads']} threads")
    print(f"{where}; load before/after: {result['load_before']} / {result['load_after']}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "call_overhead.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "call_overhead.md").write_text(markdown(result))
        print(f"written to {out.resolve()}")
    return result


if __name__ == "__main__":
    main()
