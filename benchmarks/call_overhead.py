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
from benchmarks.mine import environment, load_snapshot, measure_cpu_peak


def median_us(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


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


def memory_cells() -> list:
    rows = []
    cases = [(64, 1_000_000, 64, torch.bfloat16, True), (16, 100_000, 256, torch.float32, False)]
    for n, m, d, dtype, backward in cases:
        g = torch.Generator().manual_seed(m)
        bank = torch.randn(m, d, generator=g).to(dtype)
        bank_labels = torch.randint(0, m // 8, (m,), generator=g)
        x = torch.randn(n, d, generator=g).to(dtype).requires_grad_(backward)
        y = torch.randint(0, m // 8, (n,), generator=g)

        def call(_):
            res = fastmine.mine(x, y, bank, bank_labels)
            if backward:
                (res.pos_dist - res.neg_dist).float().sum().backward()
        call(None)  # warm-up: allocator and thread pools
        peak, method = measure_cpu_peak(lambda: None, call)
        row = dict(n=n, m=m, d=d, dtype=str(dtype).replace("torch.", ""),
                   mode="forward+backward" if backward else "forward",
                   peak_extra_mib=peak / 2**20, method=method,
                   bank_mib=bank.numel() * bank.element_size() / 2**20)
        rows.append(row)
        print(f"{n} queries x {m} x {d} {row['dtype']} bank, {row['mode']}: peak extra "
              f"{row['peak_extra_mib']:.1f} MiB (bank {row['bank_mib']:.0f} MiB; {method})", flush=True)
    return rows


def xbm_cells() -> list:
    n, m, d, dtype = 64, 1_000_000, 64, torch.bfloat16
    g = torch.Generator().manual_seed(m)
    xbm = fastmine.CrossBatchMemory(fastmine.losses.TripletMarginLoss(margin=0.1),
                                    embedding_size=d, memory_size=m)
    xbm.load_state_dict({"embedding_memory": torch.randn(m, d, generator=g).to(dtype),
                         "label_memory": torch.randint(0, m // 8, (m,), generator=g),
                         "id_memory": torch.arange(m),
                         "_extra_state": {"queue_idx": 0, "filled": m, "next_id": 0}},
                        strict=False)

    def batch():
        return (torch.randn(n, d, generator=g).to(dtype).requires_grad_(),
                torch.randint(0, m // 8, (n,), generator=g), torch.randint(0, m, (n,), generator=g))

    def step(b):
        xbm(*b).backward()
    step(batch())  # warm-up: the spare rows (one copy of the bank), allocator, thread pools
    step(batch())
    peak, method = measure_cpu_peak(batch, step)
    row = dict(n=n, m=m, d=d, dtype="bfloat16", mode="CrossBatchMemory step, forward+backward",
               peak_extra_mib=peak / 2**20, method=method,
               bank_mib=xbm.embedding_memory.numel() * xbm.embedding_memory.element_size() / 2**20)
    print(f"CrossBatchMemory step (TripletMarginLoss), batch {n}, memory {m} x {d} bfloat16, "
          f"forward+backward: peak extra {row['peak_extra_mib']:.1f} MiB (bank "
          f"{row['bank_mib']:.0f} MiB; {method})", flush=True)
    return [row]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--only", choices=("timing", "memory", "xbm"), default=None,
                    help="run one group of cells (default: all)")
    # not results.json: that name is benchmarks.mine's sweep, which benchmarks.report regenerates
    ap.add_argument("--out", default=None, help="write call_overhead.json and call_overhead.md here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    result = dict(environment=environment(device), load_before=load_snapshot(1.0))
    run = lambda group: args.only in (None, group)
    result["timing"] = timing_cells(args.repeats, args.warmup) if run("timing") else []
    result["memory"] = (memory_cells() if run("memory") else []) + (xbm_cells() if run("xbm") else [])
    result["load_after"] = load_snapshot(1.0)
    print(f"CPU: {result['environment']['cpu']}, {result['environment']['torch_threads']} threads; "
          f"load before/after: {result['load_before']} / {result['load_after']}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "call_overhead.json").write_text(json.dumps(result, indent=1, default=str))
        lines = [f"# Call overhead and memory-bank memory ({result['environment']['date_utc']})", "",
                 f"CPU: {result['environment']['cpu']}, {result['environment']['torch_threads']} "
                 f"torch threads, torch {result['environment']['torch']}, fastmine "
                 f"{result['environment']['fastmine_git']}", "",
                 f"Load before: {result['load_before']}; after: {result['load_after']}", "",
                 "| N | D | raw op µs | mine µs | mine / raw | mine fwd+bwd µs "
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
        (out / "call_overhead.md").write_text("\n".join(lines) + "\n")
        print(f"written to {out.resolve()}")
    return result


if __name__ == "__main__":
    main()
