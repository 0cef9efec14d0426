"""Issue #17's benchmark: top-k mining and distance-weighted sampling, side by side.

    python -m benchmarks.topk                      # N = 8192, D = 128, fp32 (~2-4 min on 2 CPU cores)
    python -m benchmarks.topk --n 2048 --d 128     # other sizes
    python -m benchmarks.topk --device cuda        # triton and cuda backends on a GPU

One run, one fresh random draw per (N, D) (embeddings ~ N(0, 1) then
L2-normalised, as distance-weighted sampling assumes; labels uniform over N /
--samples-per-class classes), the batch mined against itself, forward (no_grad),
median of --repeats timed calls after --warmup.  Rows, per fastmine backend that
implements the rule (``cpu`` on CPU; ``triton`` and ``cuda`` on a GPU):

* ``floor``: the blocked Gram matmul ``benchmarks.providers.blocked_matmul``;
* ``mine k=1``: ``fastmine.mine`` easy/hard, the baseline of the targets;
* ``mine_topk k=2, 4, 8``: easy/hard with k_pos = k_neg = k (target: k <= 8
  within 1.3x ``mine k=1``);
* ``distance_weighted k=1``: ``fastmine.mine(neg_strategy="distance_weighted")``
  (target: within 1.5x ``mine k=1``) and ``distance_weighted k=8``
  (``mine_topk`` with k_neg = 8, Gumbel-top-k);
* ``pml DistanceWeightedMiner``: PML's miner with its defaults (cutoff 0.5,
  nonzero_loss_cutoff 1.4, LpDistance on normalised embeddings) on the same
  data (target: fastmine's distance-weighted k=1 >= 20x faster, <= 1/50 of
  its peak memory): one cold call in a fresh process (CPU), which reports its
  time and peak memory; its time grows like N^3 on CPU (a per-class loop over
  N x M copies: 88 s at N = 4096 on 2 cores), so past --pml-timeout-s the
  process is stopped and its time and peak memory so far (PML allocates its
  N x M matrices first) are reported as lower bounds, marked ">".

Peak memory (distance-weighted rows and PML) is the peak extra memory of one
call above the inputs, measured as ``benchmarks.mine`` does (CPU: a fresh
spawned process per row, VmHWM after a reset; CUDA: max_memory_allocated).
The machine load is measured and recorded as in ``benchmarks.mine``.

Output: results.json and table.md in a new folder under benchmarks/results/
(``<device>-<date>-<time>-topk``) or --out.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import fastmine
from fastmine import _backends

from . import mine as B
from . import providers as P

PML_DW = "pml DistanceWeightedMiner"
KS = (2, 4, 8)
DW_K = 8
SEED = 20261203  # the distance-weighted noise seed of every call (fixed: same draws per repeat)


# ---------------------------------------------------------------- the timed calls
def _runs(device: torch.device, backends: List[str]) -> List[Tuple[str, str, Callable]]:
    """(row name, backend or "", fn(x, labels)) in table order."""
    runs: List[Tuple[str, str, Callable]] = [
        ("floor", "", lambda x, y: P.blocked_matmul(x, x))]
    for b in backends:
        runs.append(("mine k=1", b, lambda x, y, b=b: fastmine.mine(x, y, backend=b)))
        for k in KS:
            runs.append((f"mine_topk k={k}", b, lambda x, y, b=b, k=k: fastmine.mine_topk(
                x, y, k_pos=k, k_neg=k, backend=b)))
        runs.append(("distance_weighted k=1", b, lambda x, y, b=b: fastmine.mine(
            x, y, neg_strategy="distance_weighted", seed=SEED, backend=b)))
        runs.append((f"distance_weighted k={DW_K}", b, lambda x, y, b=b: fastmine.mine_topk(
            x, y, k_neg=DW_K, neg_strategy="distance_weighted", seed=SEED, backend=b)))
    return runs


def _pml_miner() -> Callable:
    from pytorch_metric_learning.miners import DistanceWeightedMiner
    miner = DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)
    return lambda x, y: miner(x, y)


def _write_json(path: str, obj: dict) -> None:
    """Atomically (the parent polls the file)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def _pml_worker(n: int, d: int, spc: int, seed: int, threads: int, out_path: str) -> None:
    """Spawned child: one cold call of PML's miner.  Writes its RSS before the call
    first, then the time and the peak RSS increase when the call returns, so a
    parent that stops waiting can still read the peak so far (VmHWM)."""
    torch.set_num_threads(threads)
    miner = _pml_miner()
    x, y = make_data(n, d, torch.device("cpu"), spc, _cell_seed(n, d, seed))
    B.gc.collect()
    B._malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = B._proc_status_kb("VmRSS")
    _write_json(out_path, dict(rss_before_kb=before, started_epoch_s=B.time.time()))
    t0 = B.time.perf_counter()
    with torch.no_grad():
        miner(x, y)
    t = B.time.perf_counter() - t0
    peak = B._proc_status_kb("VmHWM")
    _write_json(out_path, dict(rss_before_kb=before, time_s=t,
                               peak_mem_bytes=(peak - before) * 1024))


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # not written yet, or being written
        return {}


def _run_pml(n: int, d: int, args) -> dict:
    """PML's DistanceWeightedMiner, once, in a fresh process (CPU): time and peak
    extra memory; past --pml-timeout-s the process is stopped and both are lower
    bounds (the time waited, and the peak RSS increase so far, read from
    /proc/<pid>/status: PML allocates its N x M matrices first)."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pml.json")
        proc = ctx.Process(target=_pml_worker, args=(
            n, d, args.samples_per_class, args.seed, torch.get_num_threads(), path))
        proc.start()
        while proc.is_alive():  # --pml-timeout-s counts from the call's start, not the spawn
            proc.join(0.5)
            got = _read_json(path)
            if "started_epoch_s" in got and "time_s" not in got \
                    and B.time.time() - got["started_epoch_s"] > args.pml_timeout_s:
                break
        if proc.is_alive():
            hwm = None
            try:
                m = B.re.search(r"^VmHWM:\s+(\d+) kB", open(f"/proc/{proc.pid}/status").read(),
                                B.re.M)
                hwm = int(m.group(1)) if m else None
            except OSError:
                pass
            proc.kill()
            proc.join()
            got = _read_json(path)
            before, started = got.get("rss_before_kb"), got.get("started_epoch_s")
            if started is None:  # stopped before the call began (start-up, data)
                return dict(time_s=None, times_s=[], lower_bound=True, peak_mem_bytes=None,
                            mem_method="stopped before the call started")
            waited = B.time.time() - started  # the call's own time so far
            peak = None if hwm is None or before is None else (hwm - before) * 1024
            return dict(time_s=waited, times_s=[waited], lower_bound=True, peak_mem_bytes=peak,
                        mem_method="VmHWM so far (stopped)")
        got = _read_json(path)
    if "time_s" not in got:
        return dict(time_s=None, times_s=[], lower_bound=False, peak_mem_bytes=None,
                    mem_method=f"process died (exit {proc.exitcode})")
    return dict(time_s=got["time_s"], times_s=[got["time_s"]], lower_bound=False,
                peak_mem_bytes=got["peak_mem_bytes"], mem_method="VmHWM-reset (cold call)")


def _backends_for(device: torch.device) -> Tuple[List[str], Dict[str, str]]:
    """The fastmine backends with top-k and distance-weighted kernels on ``device`` (the
    torch reference is O(N*M) and not a contender), and why the others are left out."""
    wanted = ("cpu",) if device.type == "cpu" else ("triton", "cuda")
    usable, missing = [], {}
    for b in wanted:
        reason = _backends.get(b).unavailable(device)
        if not reason and not {"topk", "distance_weighted"} <= _backends.get(b).rules:
            reason = "no top-k / distance-weighted kernel"
        if reason:
            missing[b] = reason
        else:
            usable.append(b)
    return usable, missing


def make_data(n: int, d: int, device: torch.device, spc: int, seed: int):
    x, y, _, _ = B.make_data(n, None, d, torch.float32, device, spc, seed)
    return F.normalize(x, dim=1), y


def _cell_seed(n: int, d: int, seed: int) -> int:
    return seed + 7919 * n + 31 * d


def _memory_worker(name: str, backend: str, n: int, d: int, spc: int, seed: int, threads: int,
                   out_path: str) -> None:
    """Spawned child: the peak extra memory of one call of row ``name``; writes JSON."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    (fn,) = [f for r, b, f in _runs(device, [backend] if backend else []) if (r, b) == (name, backend)]
    x, y = make_data(n, d, device, spc, _cell_seed(n, d, seed))
    with torch.no_grad():
        fn(x, y)  # warm-up: lazy initialisation is not the call's memory
        peak, method = B.measure_cpu_peak(lambda: None, lambda _: fn(x, y))
    with open(out_path, "w") as f:
        json.dump(dict(peak_mem_bytes=peak, mem_method=method), f)


def _measure_memory(name: str, backend: str, n: int, d: int, args) -> Tuple[Optional[int], str]:
    if args.device.type == "cuda":
        x, y = make_data(n, d, args.device, args.samples_per_class, _cell_seed(n, d, args.seed))
        (fn,) = [f for r, b, f in _runs(args.device, [backend] if backend else [])
                 if (r, b) == (name, backend)]
        with torch.no_grad():
            fn(x, y)
            return B.measure_cuda_peak(lambda: None, lambda _: fn(x, y), args.device)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mem.json")
        proc = ctx.Process(target=_memory_worker, args=(
            name, backend, n, d, args.samples_per_class, args.seed, torch.get_num_threads(), path))
        proc.start()
        proc.join()
        if not os.path.exists(path):
            return None, f"process died (exit {proc.exitcode})"
        got = json.load(open(path))
    return got["peak_mem_bytes"], got["mem_method"]


# ---------------------------------------------------------------- the run
def run(args) -> dict:
    backends, missing = _backends_for(args.device)
    if P._pml_available():
        missing[PML_DW] = P._pml_available()
    before = B.load_snapshot()
    pre = B.assess_load(before, None, None, args.load_threshold)
    if pre["loaded"]:
        print(pre["warning"], file=sys.stderr, flush=True)
    rows: List[dict] = []
    prev_precision = torch.get_float32_matmul_precision()
    sampler = B.LoadSampler().start()
    try:
        torch.set_float32_matmul_precision("highest")
        for n in args.n:
            for d in args.d:
                seed = _cell_seed(n, d, args.seed)
                x, y = make_data(n, d, args.device, args.samples_per_class, seed)
                for name, backend, fn in _runs(args.device, backends):
                    print(f"time {name} {backend} N={n} D={d}", file=sys.stderr, flush=True)
                    with torch.no_grad():
                        times = B.time_call(lambda: None, lambda _, fn=fn: fn(x, y), args.device,
                                            args.repeats, args.warmup, args.cell_budget_s)
                    rows.append(dict(row=name, backend=backend, n=n, d=d, dtype="fp32",
                                     seed=seed, times_s=times, time_s=statistics.median(times),
                                     peak_mem_bytes=None, mem_method=None, lower_bound=False))
                del x, y
                if PML_DW not in missing and args.device.type == "cpu" and not args.no_pml:
                    print(f"time+memory {PML_DW} N={n} D={d} (fresh process, at most "
                          f"{args.pml_timeout_s:g} s)", file=sys.stderr, flush=True)
                    rows.append(dict(row=PML_DW, backend="", n=n, d=d, dtype="fp32", seed=seed,
                                     **_run_pml(n, d, args)))
        if not args.no_memory:
            for r in rows:
                if r["row"].startswith("distance_weighted k=1"):
                    print(f"memory {r['row']} {r['backend']} N={r['n']} D={r['d']}",
                          file=sys.stderr, flush=True)
                    r["peak_mem_bytes"], r["mem_method"] = _measure_memory(
                        r["row"], r["backend"], r["n"], r["d"], args)
    finally:
        torch.set_float32_matmul_precision(prev_precision)
        during = sampler.stop()
    after = B.load_snapshot()
    for r in rows:
        same = [q for q in rows if q["n"] == r["n"] and q["d"] == r["d"]]
        floor = next(q["time_s"] for q in same if q["row"] == "floor")
        r["t_over_floor"] = None if r["time_s"] is None else r["time_s"] / floor
        base = next((q["time_s"] for q in same
                     if q["row"] == "mine k=1" and q["backend"] == r["backend"]), None)
        r["t_over_mine"] = None if base is None or not r["backend"] else r["time_s"] / base
        pml = next((q for q in same if q["row"] == PML_DW and q["time_s"]), None)
        r["pml_over_t"] = (pml["time_s"] / r["time_s"]
                           if pml and r["row"].startswith("distance_weighted") else None)
        r["pml_lower_bound"] = bool(pml and pml.get("lower_bound"))  # PML stopped: ratios are >=
        r["pml_mem_over_mem"] = (
            pml["peak_mem_bytes"] / max(r["peak_mem_bytes"], 1)
            if pml and pml.get("peak_mem_bytes") and r["peak_mem_bytes"] is not None
            and r["row"].startswith("distance_weighted") else None)
    config = {k: v for k, v in vars(args).items() if k != "device"}
    config.update(ks=list(KS), dw_k=DW_K, noise_seed=SEED, backends=backends)
    return dict(environment=B.environment(args.device), config=config, missing=missing,
                machine_load=B.assess_load(before, during, after, args.load_threshold),
                results=rows)


def markdown(result: dict) -> str:
    env, load = result["environment"], result["machine_load"]
    before, during = load.get("before") or {}, load.get("during") or {}
    where = env.get("gpu") or f"{env['cpu']}, {env['cpu_count']} CPUs"
    lines = [f"> **{load['warning']}**", ""] if load.get("loaded") else []
    lines += [
        f"**{where}**, torch {env['torch']}, fastmine {env['fastmine']} ({env['fastmine_git']}), "
        f"finished {env['date_utc']}", "",
        f"Machine load: 1-minute load average {before.get('loadavg')} before the run; other "
        f"processes' busy cores {before.get('others_busy_cores')} before, mean "
        f"{during.get('others_busy_cores_mean')} / max {during.get('others_busy_cores_max')} "
        f"during (loaded: {load.get('loaded')}).", "",
        "fp32, L2-normalised embeddings, batch = references, forward (no_grad), median of the "
        f"timed calls ({result['config']['samples_per_class']} samples per class).  "
        "x mine = time / `mine` k=1 of the same backend; PML / t = PML DistanceWeightedMiner's "
        "time (or peak memory) / this row's.", ""]
    for k, v in result["missing"].items():
        lines.append(f"- not run: {k}: {v}")
    if result["missing"]:
        lines.append("")
    lines += ["| N, D | row | backend | time | x floor | x mine | PML / t | peak extra memory "
              "| PML mem / mem |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]

    def fmt(v, spec, bound=False):
        return "" if v is None else (">= " if bound else "") + format(v, spec)
    for r in result["results"]:
        mem, lb = r.get("peak_mem_bytes"), r.get("lower_bound", False)
        plb = r.get("pml_lower_bound", False)
        time = "n/a" if r["time_s"] is None else f"{'> ' if lb else ''}{r['time_s'] * 1e3:.1f} ms"
        lines.append(
            f"| {r['n']}, {r['d']} | {r['row']} | {r['backend']} | {time} | "
            f"{fmt(r['t_over_floor'], '.2f', lb)} | {fmt(r['t_over_mine'], '.2f')} | "
            f"{fmt(r['pml_over_t'], '.1f', plb)} | "
            f"{'' if mem is None else ('> ' if lb else '') + f'{mem / 2**20:.1f} MiB'} | "
            f"{fmt(r['pml_mem_over_mem'], '.0f', plb)} |")
    if any(r.get("lower_bound") for r in result["results"]):
        lines += ["", f"PML's call was stopped after {result['config']['pml_timeout_s']:g} s: its "
                  "time and peak memory (so far) are lower bounds, and so are the ratios (>=)."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.topk", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--n", type=int, nargs="+", default=[8192])
    ap.add_argument("--d", type=int, nargs="+", default=[128])
    ap.add_argument("--samples-per-class", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--cell-budget-s", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory rows")
    ap.add_argument("--no-pml", action="store_true", help="skip PML's DistanceWeightedMiner")
    ap.add_argument("--pml-timeout-s", type=float, default=600.0,
                    help="stop PML's call after this long (its figures become lower bounds)")
    ap.add_argument("--load-threshold", type=float, default=B.LOAD_THRESHOLD)
    ap.add_argument("--out", default=None)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--results-root", default=None)
    args = ap.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for name in ("n", "d"):
        if any(v <= 0 for v in getattr(args, name)):
            ap.error(f"--{name} values must be positive")
    return args


def main(argv=None) -> dict:
    return B.table_main(argv, parse_args, run, "topk", markdown)


if __name__ == "__main__":
    main()
