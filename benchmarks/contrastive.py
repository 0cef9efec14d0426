"""Issue #18's benchmark: SupCon, NT-Xent and Multi-Similarity, forward + backward.

    python -m benchmarks.contrastive                    # the issue's targets (CPU: long; see below)
    python -m benchmarks.contrastive --n 2048 --mem-n 0 --large-n 0 --repeats 3
    python -m benchmarks.contrastive --losses supcon --no-pml
    python -m benchmarks.contrastive --device cuda      # triton / cuda backends on a GPU

One run measures the three targets of issue #18 (fp32, D = --d, default 128):

1. **Time** at N = --n (default 8192), the batch against itself: forward +
   backward (``loss(x, labels).backward()``, x [N, D] ~ N(0, 1) requiring grad,
   labels uniform over N / --samples-per-class classes), median of --repeats
   timed calls after --warmup, for every loss in --losses on every fastmine
   backend with a kernel on the device (``cpu`` on CPU; ``triton``, ``cuda``
   and the ``chunked`` PyTorch streaming on a GPU, those that
   ``fastmine.contrastive`` has), and

   * ``floor``: the Gram-matmul floor of forward + backward, three GEMMs per
     row block of queries -- S = Q R^T, dQ = G R, dR = G^T Q (G = S: the
     values do not matter) -- blocked as ``benchmarks.providers.blocked_matmul``
     (one [rows, M] buffer, never N x M resident);
     target: each fastmine row <= 3.5x it;
   * ``pml``: pytorch-metric-learning's loss of the same name and defaults on
     the same data (target: fastmine faster), run in a spawned process under
     a memory cap (--mem-cap-gb; RLIMIT_AS) so that its N x M (NT-Xent: pairs
     x pairs) buffers cannot take the machine down.  A PML call whose estimated
     memory (``pml_estimate_bytes``) exceeds the cap is not started and is
     reported "OOM (needs est. X GB)"; one that runs out of memory anyway is
     "OOM (needs > X GB)" with the allocation it failed on.

2. **Peak extra memory** at N = --mem-n (default 16384), fastmine SupCon
   (each backend) against PML's SupConLoss, forward + backward: the peak above
   the inputs, as ``benchmarks.mine`` measures it (CPU: a fresh spawned process
   per row, VmHWM after a reset; CUDA: max_memory_allocated).  Target: fastmine
   <= 1/20 of PML.

3. **Large N** = --large-n (default 65536): fastmine SupCon forward + backward
   once, time and peak extra memory in a fresh process (CPU; a small call
   first initialises the threads).  PML is reported as not runnable with its
   estimated memory (or run, if the estimate fits the cap).  Target: runs on
   a 24 GiB CPU machine.

--mem-n 0 / --large-n 0 skip parts 2 / 3; --no-pml skips every PML row.  On 2
CPU cores part 1 takes minutes per loss and part 3 several minutes per call.
The machine load is measured and recorded as in ``benchmarks.mine``: do not
quote the figures of a loaded run.

Output: results.json and table.md in a new folder under benchmarks/results/
(``<device>-<date>-<time>-contrastive``) or --out.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from fastmine import contrastive as C

from . import mine as B
from . import providers as P

LOSSES = ("supcon", "ntxent", "multi_similarity")
FASTMINE = {"supcon": C.SupConLoss, "ntxent": C.NTXentLoss,
            "multi_similarity": C.MultiSimilarityLoss}  # defaults = PML's
PML_NAMES = {"supcon": "SupConLoss", "ntxent": "NTXentLoss",
             "multi_similarity": "MultiSimilarityLoss"}
FLOOR = "floor (3 GEMMs)"
PML = "pml"
# PML's peak extra memory per (query, reference) pair of one fp32 forward +
# backward, measured at N = 4096, D = 128, 8 samples per class (torch 2.13,
# PML 2.9.0; 49.1 and 54.2 bytes): the mat, masks, the int64 index tuples of
# every pair and their autograd copies.  Scaled by the element size.
PML_BYTES_PER_PAIR = {"supcon": 50.0, "multi_similarity": 55.0}
TARGET_FLOOR, TARGET_MEM = 3.5, 20.0  # issue #18: <= 3.5x the floor; <= 1/20 of PML's memory


# ---------------------------------------------------------------- data, floor, estimates
def make_data(n: int, d: int, device: torch.device, spc: int, seed: int) -> Tuple[Tensor, Tensor]:
    """x [n, d] float32 ~ N(0, 1) (the losses normalise), labels [n] over max(2, n // spc)
    classes; reproducible from seed (``benchmarks.mine.make_data``)."""
    x, y, _, _ = B.make_data(n, None, d, torch.float32, device, spc, seed)
    return x, y


def _cell_seed(n: int, d: int, seed: int) -> int:
    return seed + 7919 * n + 31 * d


def gram_floor_fwd_bwd(q: Tensor, r: Tensor, block_elems: Optional[int] = None) -> None:
    """The three GEMMs of a forward + backward over q [N, D] x r [M, D], results discarded:
    per block of query rows, S = q_blk r^T (into one reused [rows, M] buffer), then with
    G = S: dq_blk = G r and dr += G^T q_blk.  Row blocks of at most ``block_elems``
    outputs (default per device: ``benchmarks.providers.FLOOR_BLOCK_ELEMS``), so
    nothing N x M is resident; 6 N M D flops."""
    if block_elems is None:
        block_elems = P.FLOOR_BLOCK_ELEMS.get(q.device.type, P.FLOOR_BLOCK_ELEMS["cpu"])
    m = max(r.shape[0], 1)
    rows = min(max(1, block_elems // m), max(q.shape[0], 1))
    buf = torch.empty(rows, r.shape[0], dtype=q.dtype, device=q.device)
    dq, dr = torch.empty_like(q), torch.zeros_like(r)
    rt = r.T
    for i in range(0, q.shape[0], rows):
        qb = q[i:i + rows]
        s = buf[:qb.shape[0]]
        torch.mm(qb, rt, out=s)
        torch.mm(s, r, out=dq[i:i + rows])
        dr.addmm_(s.T, qb)


def pml_estimate_bytes(loss: str, labels: Tensor, elem: int = 4) -> float:
    """Estimated peak extra memory of PML's ``loss`` (forward + backward) on a batch with
    these labels against itself.  SupCon / MS: PML_BYTES_PER_PAIR x N^2 (x elem / 4).
    NT-Xent: PML's ``NTXentLoss`` forms a [positive pairs, negative pairs] bool mask and
    its float copy (``n_per_p``), (1 + elem) bytes per (positive pair, negative pair)
    -- the PML #547 blow-up -- which dominates."""
    n = labels.shape[0]
    if loss == "ntxent":
        counts = torch.unique(labels, return_counts=True)[1].to(torch.float64)
        pos_pairs = float((counts * (counts - 1)).sum())
        neg_pairs = float(n * n - (counts * counts).sum())
        return (1 + elem) * pos_pairs * neg_pairs + PML_BYTES_PER_PAIR["supcon"] * n * n
    return PML_BYTES_PER_PAIR[loss] * n * n * elem / 4


def _oom_needs(e: BaseException) -> Optional[float]:
    """The allocation (bytes) of an out-of-memory error, None if it is not one.
    0.0: out of memory without a size in the message."""
    msg = str(e)
    if not (B._is_oom(e) or "can't allocate memory" in msg or "Cannot allocate memory" in msg):
        return None
    m = re.search(r"tried to allocate ([0-9.]+) ?(bytes|[KMGT]i?B)", msg)
    if not m:
        return 0.0
    scale = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
             "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[m.group(2)]
    return float(m.group(1)) * scale


def _gb(b: float) -> str:
    return f"{b / 2**30:.3g} GB" if b < 2**50 else f"{b / 2**50:.3g} PB"


# ---------------------------------------------------------------- the calls
def _fastmine_fn(loss: str, backend: str) -> Callable:
    mod = FASTMINE[loss](backend=backend)
    return lambda x, y: mod(x, y).backward()


def _pml_fn(loss: str) -> Callable:
    from pytorch_metric_learning import losses as L
    mod = getattr(L, PML_NAMES[loss])()  # PML's defaults, which are fastmine's
    return lambda x, y: mod(x, y).backward()


def _fwd_bwd(fn: Callable, x: Tensor, y: Tensor) -> Tuple[Callable, Callable]:
    """(setup, timed fn) of one forward + backward of fn on a fresh leaf copy of x."""
    xg = x.detach().clone().requires_grad_(True)

    def setup():
        xg.grad = None

    return setup, lambda _: fn(xg, y)


def _backends_for(device: torch.device) -> Tuple[List[str], Dict[str, str]]:
    """fastmine.contrastive's streaming backends runnable on ``device`` (the full-matrix
    ``torch`` reference is not a contender; neither is ``chunked`` on CPU, where ``cpu``
    is its compiled form), and why the others are left out."""
    wanted = ("cpu",) if device.type == "cpu" else ("triton", "cuda", "chunked")
    usable, missing = [], {}
    for b in wanted:
        if b not in C.BACKENDS:
            missing[b] = "not a backend of fastmine.contrastive"
            continue
        try:
            C.resolve_backend(b, device)
        except RuntimeError as e:
            missing[b] = str(e)
            continue
        usable.append(b)
    return usable, missing


# ---------------------------------------------------------------- spawned processes
def _limit_address_space(cap_bytes: Optional[float]) -> None:
    """RLIMIT_AS = what this process maps now + cap_bytes: an allocation beyond the cap
    fails with an out-of-memory error instead of waking the OOM killer."""
    if not cap_bytes:
        return
    import resource
    size_kb = B._proc_status_kb("VmSize")
    if size_kb is None:
        return
    limit = int(size_kb * 1024 + cap_bytes)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError):
        pass


def _worker(spec: dict, out_path: str) -> None:
    """Spawned child: one row (fastmine ``backend`` or PML), timed and/or its peak extra
    memory measured; writes a JSON dict (the error, if any, as ``status``)."""
    torch.set_num_threads(spec["threads"])
    torch.set_float32_matmul_precision("highest")
    _limit_address_space(spec.get("cap_bytes"))
    device = torch.device("cpu")
    out: dict = {}
    try:
        fn = _pml_fn(spec["loss"]) if spec["backend"] == PML else \
            _fastmine_fn(spec["loss"], spec["backend"])
        if spec.get("warm_n"):  # initialise threads and lazy state on a small batch
            wx, wy = make_data(spec["warm_n"], spec["d"], device, spec["spc"], 1)
            s, f = _fwd_bwd(fn, wx, wy)
            f(s())
        x, y = make_data(spec["n"], spec["d"], device, spec["spc"], spec["seed"])
        setup, call = _fwd_bwd(fn, x, y)
        if spec["repeats"]:
            out["times_s"] = B.time_call(setup, call, device, spec["repeats"], spec["warmup"],
                                         spec["budget_s"])
        if spec["memory"]:
            if not spec["repeats"] and not spec.get("warm_n"):
                call(setup())  # warm-up: lazy initialisation is not the call's memory
            t0 = time.perf_counter()
            out["peak_mem_bytes"], out["mem_method"] = B.measure_cpu_peak(setup, call)
            out.setdefault("times_s", [time.perf_counter() - t0])
        out["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        needs = _oom_needs(e)
        if needs is None:
            out["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
        else:
            cap = spec.get("cap_bytes")
            out["status"] = "OOM" + (f" (needs > {_gb(cap)}" if cap else " (") + (
                f"; failed allocating {_gb(needs)})" if needs else ")")
    with open(out_path, "w") as f:
        json.dump(out, f)


def _spawn(spec: dict) -> dict:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out.json")
        proc = ctx.Process(target=_worker, args=(spec, path))
        proc.start()
        proc.join()
        if not os.path.exists(path):
            return dict(status=f"process died (exit {proc.exitcode})")
        return json.load(open(path))


def _measure_cuda(fn: Callable, x: Tensor, y: Tensor, device: torch.device, memory: bool,
                  args) -> dict:
    setup, call = _fwd_bwd(fn, x, y)
    out: dict = {}
    try:
        out["times_s"] = B.time_call(setup, call, device, max(args.repeats, 1), args.warmup,
                                     args.cell_budget_s)
        if memory:
            out["peak_mem_bytes"], out["mem_method"] = B.measure_cuda_peak(setup, call, device)
        out["status"] = "ok"
    except Exception as e:  # noqa: BLE001
        needs = _oom_needs(e)
        if needs is None:
            raise
        out["status"] = "OOM" + (f" (failed allocating {_gb(needs)})" if needs else "")
    finally:
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- the run
def _row(part: str, row: str, loss: str, backend: str, n: int, d: int, seed: int,
         got: dict, est: Optional[float] = None) -> dict:
    times = got.get("times_s")
    return dict(part=part, row=row, loss=loss, backend=backend, n=n, d=d, dtype="fp32", seed=seed,
                status=got.get("status", "ok"), times_s=times,
                time_s=statistics.median(times) if times else None,
                peak_mem_bytes=got.get("peak_mem_bytes"), mem_method=got.get("mem_method"),
                est_mem_bytes=est)


def _pml_cell(loss: str, n: int, d: int, seed: int, args, memory: bool, repeats: int,
              warm_n: int = 0) -> Tuple[dict, float]:
    """Run (or skip, if its estimate exceeds the cap) one PML forward + backward row."""
    _, y = make_data(n, d, torch.device("cpu"), args.samples_per_class, seed)  # the row's labels
    est = pml_estimate_bytes(loss, y)
    cap = args.mem_cap_gb * 2**30
    if est > cap:
        return dict(status=f"OOM (needs est. {_gb(est)}; cap {_gb(cap)})"), est
    if args.device.type == "cuda":
        x, y = make_data(n, d, args.device, args.samples_per_class, seed)
        return _measure_cuda(_pml_fn(loss), x, y, args.device, memory, args), est
    return _spawn(dict(loss=loss, backend=PML, n=n, d=d, spc=args.samples_per_class, seed=seed,
                       threads=torch.get_num_threads(), repeats=repeats, warmup=args.warmup,
                       budget_s=args.cell_budget_s, memory=memory, cap_bytes=cap,
                       warm_n=warm_n)), est


def _fastmine_memory_cell(loss: str, backend: str, n: int, d: int, seed: int, args,
                          repeats: int, warm_n: int = 0) -> dict:
    if args.device.type == "cuda":
        x, y = make_data(n, d, args.device, args.samples_per_class, seed)
        return _measure_cuda(_fastmine_fn(loss, backend), x, y, args.device, True, args)
    return _spawn(dict(loss=loss, backend=backend, n=n, d=d, spc=args.samples_per_class, seed=seed,
                       threads=torch.get_num_threads(), repeats=repeats, warmup=args.warmup,
                       budget_s=args.cell_budget_s, memory=True, warm_n=warm_n,
                       cap_bytes=args.mem_cap_gb * 2**30))


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args) -> dict:
    backends, missing = _backends_for(args.device)
    pml_why = P._pml_available()
    if args.no_pml:
        missing[PML] = "--no-pml"
    elif pml_why:
        missing[PML] = pml_why
    with_pml = PML not in missing
    before = B.load_snapshot()
    pre = B.assess_load(before, None, None, args.load_threshold)
    if pre["loaded"]:
        _say(pre["warning"])
    rows: List[dict] = []
    prev_precision = torch.get_float32_matmul_precision()
    sampler = B.LoadSampler().start()
    try:
        torch.set_float32_matmul_precision("highest")
        # 1. time: floor, fastmine, PML
        for n in args.n:
            for d in args.d:
                seed = _cell_seed(n, d, args.seed)
                x, y = make_data(n, d, args.device, args.samples_per_class, seed)
                _say(f"time {FLOOR} N={n} D={d}")
                times = B.time_call(lambda: None, lambda _: gram_floor_fwd_bwd(x, x), args.device,
                                    args.repeats, args.warmup, args.cell_budget_s)
                rows.append(_row("time", FLOOR, "", "", n, d, seed, dict(times_s=times)))
                for loss in args.losses:
                    for b in backends:
                        _say(f"time fastmine {loss} {b} N={n} D={d}")
                        setup, call = _fwd_bwd(_fastmine_fn(loss, b), x, y)
                        times = B.time_call(setup, call, args.device, args.repeats, args.warmup,
                                            args.cell_budget_s)
                        rows.append(_row("time", "fastmine", loss, b, n, d, seed,
                                         dict(times_s=times)))
                    if with_pml:
                        _say(f"time pml {PML_NAMES[loss]} N={n} D={d}")
                        got, est = _pml_cell(loss, n, d, seed, args, False, args.repeats)
                        rows.append(_row("time", PML, loss, "", n, d, seed, got, est))
                del x, y
        # 2. peak extra memory: fastmine SupCon vs PML SupConLoss
        if args.mem_n:
            n, d = args.mem_n, args.d[0]
            seed = _cell_seed(n, d, args.seed)
            for b in backends:
                _say(f"memory fastmine supcon {b} N={n} D={d}")
                got = _fastmine_memory_cell("supcon", b, n, d, seed, args, repeats=0)
                rows.append(_row("memory", "fastmine", "supcon", b, n, d, seed, got))
            if with_pml:
                _say(f"memory pml SupConLoss N={n} D={d}")
                got, est = _pml_cell("supcon", n, d, seed, args, True, repeats=0)
                rows.append(_row("memory", PML, "supcon", "", n, d, seed, got, est))
        # 3. large N: fastmine SupCon once (time and memory); PML's estimate
        if args.large_n:
            n, d = args.large_n, args.d[0]
            seed = _cell_seed(n, d, args.seed)
            for b in backends:
                _say(f"large fastmine supcon {b} N={n} D={d} (one call)")
                got = _fastmine_memory_cell("supcon", b, n, d, seed, args, repeats=0,
                                            warm_n=min(n, 512))
                rows.append(_row("large", "fastmine", "supcon", b, n, d, seed, got))
            if with_pml:
                _say(f"large pml SupConLoss N={n} D={d}")
                got, est = _pml_cell("supcon", n, d, seed, args, True, 0, warm_n=min(n, 512))
                rows.append(_row("large", PML, "supcon", "", n, d, seed, got, est))
    finally:
        torch.set_float32_matmul_precision(prev_precision)
        during = sampler.stop()
    after = B.load_snapshot()
    targets = derive(rows)
    config = {k: v for k, v in vars(args).items() if k != "device"}
    config.update(backends=backends, pml_bytes_per_pair=PML_BYTES_PER_PAIR)
    return dict(environment=B.environment(args.device), config=config, missing=missing,
                machine_load=B.assess_load(before, during, after, args.load_threshold),
                results=rows, targets=targets)


def derive(rows: List[dict]) -> List[dict]:
    """Fill the ratios in place (t_over_floor, pml_over_t, pml_mem_over_mem) and return
    the targets of issue #18 that this run measured, each with ``met`` true/false/None."""
    def find(part, row, n, loss="", backend=None):
        return next((r for r in rows if r["part"] == part and r["row"] == row and r["n"] == n
                     and r["loss"] == loss and (backend is None or r["backend"] == backend)), None)
    targets = []
    for r in rows:
        r["t_over_floor"] = r["pml_over_t"] = r["pml_mem_over_mem"] = None
        if r["part"] == "time" and r["row"] == "fastmine" and r["time_s"]:
            floor = next(q for q in rows if q["part"] == "time" and q["row"] == FLOOR
                         and q["n"] == r["n"] and q["d"] == r["d"])
            r["t_over_floor"] = r["time_s"] / floor["time_s"]
            pml = next((q for q in rows if q["part"] == "time" and q["row"] == PML
                        and q["n"] == r["n"] and q["d"] == r["d"] and q["loss"] == r["loss"]), None)
            if pml and pml["time_s"]:
                r["pml_over_t"] = pml["time_s"] / r["time_s"]
            met_pml = (r["pml_over_t"] > 1 if r["pml_over_t"] is not None
                       else (True if pml and pml["status"].startswith("OOM") else None))
            targets.append(dict(target=f"{r['loss']} {r['backend']} N={r['n']}: <= {TARGET_FLOOR}x "
                                       "the floor and faster than PML",
                                value=f"{r['t_over_floor']:.2f}x floor, PML / t = "
                                      + (f"{r['pml_over_t']:.2f}" if r["pml_over_t"] else
                                         (pml["status"] if pml else "not run")),
                                met=(r["t_over_floor"] <= TARGET_FLOOR and met_pml)
                                if met_pml is not None else None))
        if r["part"] == "memory" and r["row"] == "fastmine" and r["peak_mem_bytes"]:
            pml = find("memory", PML, r["n"], "supcon")
            pml_mem = None
            if pml:
                pml_mem = pml["peak_mem_bytes"] or (pml["est_mem_bytes"]
                                                    if pml["status"].startswith("OOM") else None)
            if pml_mem:
                r["pml_mem_over_mem"] = pml_mem / max(r["peak_mem_bytes"], 1)
            targets.append(dict(
                target=f"supcon {r['backend']} N={r['n']}: peak extra memory <= 1/{TARGET_MEM:g} "
                       "of PML's SupConLoss",
                value=None if r["pml_mem_over_mem"] is None else
                f"PML / fastmine = {r['pml_mem_over_mem']:.0f}"
                + ("" if not pml or pml["peak_mem_bytes"] else " (PML estimated)"),
                met=None if r["pml_mem_over_mem"] is None else r["pml_mem_over_mem"] >= TARGET_MEM))
        if r["part"] == "large" and r["row"] == "fastmine":
            ok = r["status"] == "ok"
            targets.append(dict(target=f"supcon {r['backend']} N={r['n']} runs (24 GiB CPU machine)",
                                value=(f"{r['time_s']:.1f} s, "
                                       f"{(r['peak_mem_bytes'] or 0) / 2**20:.0f} MiB peak extra"
                                       if ok else r["status"]), met=ok))
    return targets


# ---------------------------------------------------------------- output
def _ms(r: dict) -> str:
    return "" if r["time_s"] is None else f"{r['time_s'] * 1e3:.1f} ms"


def _mib(b) -> str:
    return "" if b is None else f"{b / 2**20:.1f} MiB"


def _fmt(v, spec) -> str:
    return "" if v is None else format(v, spec)


def _name(r: dict) -> str:
    if r["row"] == PML:
        return f"pml {PML_NAMES[r['loss']]}"
    if r["row"] == "fastmine":
        return f"fastmine {r['loss']}"
    return r["row"]


def markdown(result: dict) -> str:
    env, load = result["environment"], result["machine_load"]
    before, during = load.get("before") or {}, load.get("during") or {}
    where = env.get("gpu") or f"{env['cpu']}, {env['cpu_count']} CPUs"
    rows = result["results"]
    lines = [f"> **{load['warning']}**", ""] if load.get("loaded") else []
    lines += [
        f"**{where}**, torch {env['torch']}, PML {env.get('pytorch_metric_learning')}, fastmine "
        f"{env['fastmine']} ({env['fastmine_git']}), finished {env['date_utc']}", "",
        f"Build: {env.get('fastmine_build')}; ISA limits: {env.get('isa_env') or 'none'}.", "",
        f"Machine load: 1-minute load average {before.get('loadavg')} before the run; other "
        f"processes' busy cores {before.get('others_busy_cores')} before, mean "
        f"{during.get('others_busy_cores_mean')} / max {during.get('others_busy_cores_max')} "
        f"during (loaded: {load.get('loaded')}).", "",
        "fp32, batch = references, forward + backward (`loss(x, labels).backward()`), "
        f"{result['config']['samples_per_class']} samples per class, median of the timed calls. "
        "x floor = time / the three blocked GEMMs of a forward + backward; PML / t = PML's "
        "time (or memory) / this row's.", ""]
    for k, v in result["missing"].items():
        lines.append(f"- not run: {k}: {v}")
    if result["missing"]:
        lines.append("")
    timed = [r for r in rows if r["part"] == "time"]
    if timed:
        lines += ["### Forward + backward time", "",
                  "| N, D | row | backend | time | x floor | PML / t | status |",
                  "|---|---|---|---:|---:|---:|---|"]
        for r in timed:
            lines.append(f"| {r['n']}, {r['d']} | {_name(r)} | {r['backend']} | {_ms(r)} | "
                         f"{_fmt(r['t_over_floor'], '.2f')} | {_fmt(r['pml_over_t'], '.2f')} | "
                         f"{r['status']} |")
        lines.append("")
    mem = [r for r in rows if r["part"] in ("memory", "large")]
    if mem:
        lines += ["### Peak extra memory (forward + backward) and large N", "",
                  "| N, D | row | backend | peak extra memory | PML mem / mem | time | status |",
                  "|---|---|---|---:|---:|---:|---|"]
        for r in mem:
            est = r.get("est_mem_bytes")
            peak = _mib(r["peak_mem_bytes"]) or (f"est. {_gb(est)}" if est else "")
            lines.append(f"| {r['n']}, {r['d']} | {_name(r)} | {r['backend']} | {peak} | "
                         f"{_fmt(r['pml_mem_over_mem'], '.0f')} | "
                         f"{_ms(r) if r['part'] == 'large' else ''} | {r['status']} |")
        lines.append("")
    if result["targets"]:
        lines += ["### Issue #18's targets", "", "| target | measured | met |", "|---|---|---|"]
        for t in result["targets"]:
            met = {True: "yes", False: "**no**", None: "?"}[t["met"]]
            lines.append(f"| {t['target']} | {t['value'] or ''} | {met} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.contrastive",
                                 description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--n", type=int, nargs="+", default=[8192], help="batch sizes of the time rows")
    ap.add_argument("--d", type=int, nargs="+", default=[128], help="embedding dims (memory and "
                    "large N use the first)")
    ap.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    ap.add_argument("--mem-n", type=int, default=16384, help="N of the peak-memory rows (0: skip)")
    ap.add_argument("--large-n", type=int, default=65536, help="N of the large run (0: skip)")
    ap.add_argument("--no-pml", action="store_true", help="skip every PML row")
    ap.add_argument("--samples-per-class", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--cell-budget-s", type=float, default=120.0,
                    help="stop repeating a cell once its calls took this long (>= 1 timed run)")
    ap.add_argument("--mem-cap-gb", type=float, default=None,
                    help="PML rows: not started when their estimate exceeds this, and run under "
                         "it as RLIMIT_AS on CPU (default: benchmarks.mine.default_mem_cap_gb: on "
                         "CPU min(50%% of the RAM, 75%% of the available RAM), 90%% of the GPU "
                         "memory on CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--load-threshold", type=float, default=B.LOAD_THRESHOLD)
    ap.add_argument("--out", default=None)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--results-root", default=None)
    args = ap.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for name in ("n", "d"):
        if any(v <= 0 for v in getattr(args, name)):
            ap.error(f"--{name} values must be positive")
    for name in ("mem_n", "large_n"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.mem_cap_gb is None:
        args.mem_cap_gb = B.default_mem_cap_gb(args.device)
    return args


def main(argv=None) -> dict:
    return B.table_main(argv, parse_args, run, "contrastive", markdown)


if __name__ == "__main__":
    main()
