"""Sweep fastmine against every available provider on the same random data.

    python -m benchmarks.mine                 # quick preset on CPU, standard sweep on GPU
    python -m benchmarks.mine --quick         # CPU, < 1 minute
    python -m benchmarks.mine --full          # GPU: N 1k..65k, 8192 x bank up to 1M, all D/dtypes
    python -m benchmarks.mine --n 4096 --m 65536 --d 128 --dtype bf16 --providers cpu pml floor

Method
------
* Data: for each (N, M, D, dtype) one fresh random draw (fixed seed), shared by
  every provider: embeddings ~ N(0, 1), labels uniform over max(2, M // spc)
  classes (spc = --samples-per-class).  M = N means "the batch is its own
  reference set" (self-pairs excluded); --m gives a separate memory bank of M
  rows (no grad) with its own labels from the same classes.
* Modes: forward (mining under no_grad, embeddings not requiring grad);
  forward+backward ((pos_dist - neg_dist).sum().backward() with embeddings
  requiring grad); backward (the same backward, timed alone: the forward runs
  untimed before each repeat).
* Time: warm-up runs, then the median of --repeats timed runs; CPU uses
  time.perf_counter, CUDA uses CUDA events around the call (synchronised).
  A cell stops repeating once its calls took --cell-budget-s (times_s in the
  JSON lists the runs actually timed).
* TFLOP/s = 2 N M D / t (the Gram product every exact method must do).
  "t/floor" = t / t(matmul blocked floor, same size/dtype, forward), and
  "PML/t" = t(PML BatchEasyHardMiner, same cell) / t, i.e. speed-up over PML.
  TFLOP/s and t/floor are left empty in backward mode (no Gram product there).
* Peak memory = peak extra memory of one call above the inputs.  CUDA:
  torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the
  memory allocated before the call.  CPU: measured in a fresh spawned process
  per provider (so providers never share a heap): before each cell it runs
  malloc_trim(0), resets the kernel's peak-RSS counter (write "5" to
  /proc/self/clear_refs) and reads VmRSS; after the call, VmHWM - VmRSS_before
  is the peak RSS increase.  Where clear_refs is unavailable it falls back to
  the increase of getrusage(RUSAGE_SELF).ru_maxrss (an underestimate if an
  earlier cell peaked higher).
* A provider that raises out-of-memory is reported "OOM"; one whose estimated
  memory exceeds --mem-cap-gb is "skipped (est. X GB)" without running.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

import fastmine

from . import providers as P
from . import report

DTYPES = {"fp32": (torch.float32, "highest"), "tf32": (torch.float32, "high"),
          "fp16": (torch.float16, None), "bf16": (torch.bfloat16, None),
          "fp64": (torch.float64, None)}
MODES = ("forward", "backward", "forward+backward")
STRATEGIES = ("easy/hard", "easy/semihard", "hard/hard")
REPO = Path(__file__).resolve().parent.parent

PRESETS = {
    # CPU, < 1 minute on 2 cores.
    "quick": dict(n=[1024, 2048, 4096], m=[], d=[128], dtype=["fp32"], strategies=["easy/hard"],
                  providers=["cpu", "torch", "BatchEasyHardMiner", "floor"], modes=["forward"],
                  repeats=3, warmup=1),
    # GPU, everything.
    "full": dict(n=[1024, 2048, 4096, 8192, 16384, 32768, 65536], m=[65536, 262144, 1048576],
                 bank_n=8192, d=[64, 128, 512, 2048], dtype=["fp32", "tf32", "fp16", "bf16"],
                 strategies=list(STRATEGIES), providers=None, modes=list(MODES), repeats=10, warmup=3),
    # Default on a GPU without --full.
    "gpu": dict(n=[1024, 4096, 16384, 65536], m=[], d=[128], dtype=["fp32", "bf16"],
                strategies=["easy/hard"], providers=None, modes=["forward", "forward+backward"],
                repeats=10, warmup=3),
}


# ---------------------------------------------------------------- environment
def environment(device: torch.device) -> dict:
    """Versions, hardware and load: everything needed to interpret the numbers."""
    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent or broken optional package
            return None
    env = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "triton": version("triton"),
        "numpy": version("numpy"),
        "pytorch_metric_learning": version("pytorch_metric_learning"),
        "pykeops": version("pykeops"),
        "fastmine": fastmine.__version__,
        "fastmine_git": _git_sha(),
        "fastmine_backends": fastmine.available_backends(device),
    }
    try:
        import psutil
        env["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:  # noqa: BLE001 - no nvidia-smi
            env["driver"] = None
    return env


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_sha() -> Optional[str]:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fastmine", "csrc"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) or None
    except Exception:  # noqa: BLE001 - not a git checkout
        return None


def device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return "cpu"


# ---------------------------------------------------------------- data
def make_data(n: int, m: Optional[int], d: int, dtype: torch.dtype, device: torch.device,
              samples_per_class: int, seed: int):
    """(x [N, D], labels [N], r [M, D] or None, ref_labels [M] or None), reproducible from seed."""
    g = torch.Generator().manual_seed(seed)
    total = n if m is None else m
    classes = max(2, total // samples_per_class)
    x = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    labels = torch.randint(0, classes, (n,), generator=g).to(device)
    if m is None:
        return x, labels, None, None
    r = torch.randn(m, d, generator=g).to(device=device, dtype=dtype)
    ref_labels = torch.randint(0, classes, (m,), generator=g).to(device)
    return x, labels, r, ref_labels


# ---------------------------------------------------------------- one call
def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(e).lower()


def _call(provider: P.Provider, mode: str, data, strategy: str):
    """Build (setup, fn) for one timed call: setup() runs untimed, fn(state) is timed."""
    x, labels, r, ref_labels = data
    pos, neg = strategy.split("/")
    if mode == "forward":
        def setup():
            return None

        def fn(_):
            with torch.no_grad():
                provider.run(x, labels, r, ref_labels, pos, neg)
        return setup, fn
    xg = x.detach().requires_grad_(True)

    def forward():
        pd, nd = provider.run(xg, labels, r, ref_labels, pos, neg)
        return (pd.float() - nd.float()).sum()
    if mode == "forward+backward":
        def setup():
            xg.grad = None

        def fn(_):
            forward().backward()
        return setup, fn

    def setup():  # backward alone
        xg.grad = None
        return forward()

    def fn(loss):
        loss.backward()
    return setup, fn


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(setup, fn, device: torch.device, repeats: int, warmup: int,
              budget_s: float = float("inf")) -> List[float]:
    """Seconds per timed call, ``repeats`` of them after ``warmup`` untimed calls.

    Once the calls made so far have taken ``budget_s`` in total, no more are
    started (at least one is always timed): a provider taking minutes per call
    at large N gets fewer repeats instead of stalling the sweep.
    """
    spent = 0.0
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn(setup())
        _sync(device)
        spent += time.perf_counter() - t0
        if spent > budget_s:
            break
    times = []
    for _ in range(repeats):
        if times and spent > budget_s:
            break
        state = setup()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn(state)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(state)
            times.append(time.perf_counter() - t0)
        spent += times[-1]
        del state
    return times


# ---------------------------------------------------------------- memory
def _proc_status_kb(key: str) -> Optional[int]:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", open("/proc/self/status").read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_cpu_peak(setup, fn) -> tuple:
    """(peak RSS increase in bytes of one fn(setup()) call, method name), in this process."""
    state = setup()  # untimed part (e.g. the forward before a backward) is not counted
    gc.collect()
    _malloc_trim()  # return freed heap pages, so the call cannot reuse them unseen
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        reset = True
    except OSError:
        reset = False
    if reset:
        before = _proc_status_kb("VmRSS")
        fn(state)
        peak = _proc_status_kb("VmHWM")
        if before is not None and peak is not None:
            return (peak - before) * 1024, "VmHWM-reset"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn(state)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) * 1024, "ru_maxrss"


def measure_cuda_peak(setup, fn, device) -> tuple:
    state = setup()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn(state)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, "cuda.max_memory_allocated"


def _memory_worker(provider_name: str, cells: List[dict], cfg: dict, out_path: str):
    """Spawned child: measure CPU peak memory of one provider over ``cells``; writes JSON.

    Results are flushed after every cell, so a child killed by the OOM killer
    still reports the cells before the fatal one.
    """
    torch.set_num_threads(cfg["threads"])
    device = torch.device("cpu")
    provs, _ = P.all_providers(device)
    (provider,) = [p for p in provs if p.name == provider_name]
    out = []
    for cell in cells:
        dtype, precision = DTYPES[cell["dtype"]]
        torch.set_float32_matmul_precision(precision or "highest")
        data = make_data(cell["n"], cell["m"], cell["d"], dtype, device, cfg["spc"], cell["seed"])
        try:
            setup, fn = _call(provider, cell["mode"], data, cell["strategy"])
            fn(setup())  # warm-up: lazy initialisation is not the call's memory
            peak, method = measure_cpu_peak(setup, fn)
            out.append(dict(key=cell["key"], peak_mem_bytes=peak, mem_method=method))
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            out.append(dict(key=cell["key"], peak_mem_bytes=None,
                            mem_method="OOM" if _is_oom(e) else f"error: {e}"))
        del data
        with open(out_path, "w") as f:
            json.dump(out, f)


def measure_cpu_memory(rows: List[dict], cfg: dict, progress) -> int:
    """Fill rows' peak_mem_bytes, one fresh spawned process per provider.

    Calls ``progress(1)`` per provider process; returns how many were started.
    """
    ctx = mp.get_context("spawn")
    by_provider: Dict[str, List[dict]] = {}
    for row in rows:
        if row["status"] == "ok":
            by_provider.setdefault(row["provider"], []).append(row)
    for name, prow in by_provider.items():
        prow.sort(key=lambda r: (r["n"] * r["m"] * r["d"], r["mode"]))
        cells = [dict(key=i, n=r["n"], m=None if r["self_refs"] else r["m"], d=r["d"],
                      dtype=r["dtype"], mode=r["mode"], strategy=r["strategy"], seed=r["seed"])
                 for i, r in enumerate(prow)]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "mem.json")
            proc = ctx.Process(target=_memory_worker, args=(name, cells, cfg, path))
            proc.start()
            proc.join()
            got = json.load(open(path)) if os.path.exists(path) else []
        done = {g["key"]: g for g in got}
        for i, r in enumerate(prow):
            g = done.get(i)
            if g is None:  # the child died (e.g. OOM-killed) at or before this cell
                r["peak_mem_bytes"], r["mem_method"] = None, f"process died (exit {proc.exitcode})"
            else:
                r["peak_mem_bytes"], r["mem_method"] = g["peak_mem_bytes"], g["mem_method"]
        progress(1)
    return len(by_provider)


# ---------------------------------------------------------------- sweep
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.mine", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="CPU preset, < 1 minute")
    g.add_argument("--full", action="store_true", help="GPU preset: everything")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--n", type=int, nargs="+", help="query (batch) sizes N")
    ap.add_argument("--m", type=int, nargs="+",
                    help="memory-bank sizes M (query x reference cells; default: references = the batch)")
    ap.add_argument("--bank-n", type=int, default=None,
                    help="with --m: the query size of the bank cells (default: each --n)")
    ap.add_argument("--d", type=int, nargs="+", help="embedding dims D")
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES),
                    help="fp32 = float32 at 'highest' matmul precision, tf32 = float32 at 'high'")
    ap.add_argument("--strategies", nargs="+", choices=STRATEGIES)
    ap.add_argument("--providers", nargs="+",
                    help="names or words of names: cpu torch triton cuda pml BatchEasyHardMiner "
                         "BatchHardMiner keops floor (default: all available)")
    ap.add_argument("--modes", nargs="+", choices=MODES)
    ap.add_argument("--repeats", type=int, help="timed runs per cell (0: measure memory only)")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--cell-budget-s", type=float, default=60.0,
                    help="stop repeating a cell once its calls took this long (>= 1 timed run)")
    ap.add_argument("--samples-per-class", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--memory", choices=["auto", "subprocess", "inprocess", "off"], default="auto",
                    help="peak-memory method (auto: subprocess on CPU, allocator stats on CUDA)")
    ap.add_argument("--mem-cap-gb", type=float, default=None,
                    help="skip a provider whose estimated memory exceeds this (default: half the "
                         "RAM on CPU, 90%% of the GPU memory on CUDA)")
    ap.add_argument("--out", default=None, help="output dir (default benchmarks/results/<device>-<date>/)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = "quick" if args.quick else "full" if args.full else (
        "gpu" if args.device.type == "cuda" else "quick")
    args.preset = preset
    for k, v in PRESETS[preset].items():
        if k == "providers" and not (args.quick or args.full):
            continue  # no preset named: every available provider
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.mem_cap_gb is None:
        if args.device.type == "cuda":
            args.mem_cap_gb = 0.9 * torch.cuda.get_device_properties(args.device).total_memory / 2**30
        else:
            try:
                import psutil
                args.mem_cap_gb = 0.5 * psutil.virtual_memory().total / 2**30
            except ImportError:
                args.mem_cap_gb = 8.0
    for name in ("n", "m", "d"):
        for v in getattr(args, name) or []:
            if v <= 0:
                ap.error(f"--{name} values must be positive, got {v}")
    return args


def _sizes(args) -> List[tuple]:
    """(N, M, self_refs) cells: the batch against itself, then query x bank."""
    sizes = [(n, n, True) for n in args.n]
    for m in args.m or []:
        for n in ([args.bank_n] if args.bank_n else args.n):
            sizes.append((n, m, False))
    return sizes


def _progress_bar(total: int, enabled: bool):
    if enabled:
        try:
            from tqdm import tqdm
            bar = tqdm(total=total, unit="cell", dynamic_ncols=True, file=sys.stderr)
            return bar.update, bar.set_postfix_str, bar.close
        except ImportError:
            pass
    state = {"done": 0}

    def update(k=1):
        state["done"] += k
        if enabled:
            print(f"[{state['done']}/{total}]", file=sys.stderr, flush=True)
    return update, (lambda s: None), (lambda: None)


def run(args) -> dict:
    """Run the sweep described by parsed ``args``; returns the results dict (also written out)."""
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    available, missing = P.all_providers(device)
    provs = P.select(available, args.providers)
    if not provs:
        raise SystemExit(f"no provider matches --providers {args.providers}; available: "
                         f"{[p.name for p in available]}")
    memory = args.memory
    if memory == "auto":
        memory = "inprocess" if device.type == "cuda" else "subprocess"
    cells = [(n, m, s, d, dt, st, mode) for (n, m, s) in _sizes(args) for d in args.d
             for dt in args.dtype for st in args.strategies for mode in args.modes]
    total = len(cells) * len(provs) + (len(provs) if memory == "subprocess" else 0)
    update, postfix, close = _progress_bar(total, not args.no_progress)
    rows: List[dict] = []
    prev_precision = torch.get_float32_matmul_precision()
    data_key, data = None, None
    try:
        for seed_i, (n, m, self_refs, d, dt, strategy, mode) in enumerate(cells):
            dtype, precision = DTYPES[dt]
            torch.set_float32_matmul_precision(precision or "highest")
            seed = args.seed + 7919 * n + 104729 * m + 31 * d + sorted(DTYPES).index(dt)
            key = (n, m, self_refs, d, dt)
            if key != data_key:  # one fresh draw per size/dtype, shared by every provider
                data = None
                gc.collect()
                data = make_data(n, None if self_refs else m, d, dtype, device, args.samples_per_class, seed)
                data_key = key
            elem = torch.empty((), dtype=dtype).element_size()
            for prov in provs:
                postfix(f"{prov.name} N={n} M={m} D={d} {dt} {mode}")
                row = dict(provider=prov.name, mode=mode, strategy=strategy, n=n, m=m, d=d, dtype=dt,
                           self_refs=self_refs, seed=seed, status="ok", time_s=None, times_s=None,
                           peak_mem_bytes=None, mem_method=None)
                why = prov.unsupported(device, strategy, mode, not self_refs)
                est = prov.estimate_bytes(n, m, d, elem)
                if why:
                    update()
                    continue  # not a result: e.g. BatchHardMiner in an easy/hard cell
                if est > args.mem_cap_gb * 2**30:
                    row["status"] = f"skipped (est. {est / 2**30:.1f} GB)"
                else:
                    try:
                        setup, fn = _call(prov, mode, data, strategy)
                        if args.repeats > 0:  # --repeats 0: memory only
                            times = time_call(setup, fn, device, args.repeats, args.warmup,
                                              args.cell_budget_s)
                            row["times_s"] = times
                            row["time_s"] = statistics.median(times)
                        elif memory != "subprocess":
                            fn(setup())  # still check that it runs (the subprocess would, too)
                        if memory == "inprocess":
                            if device.type == "cuda":
                                peak, method = measure_cuda_peak(setup, fn, device)
                            else:
                                peak, method = measure_cpu_peak(setup, fn)
                            row["peak_mem_bytes"], row["mem_method"] = peak, method
                    except Exception as e:  # noqa: BLE001 - a provider failing is a result
                        row["status"] = "OOM" if _is_oom(e) else f"error: {type(e).__name__}: {e}"
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                rows.append(row)
                update()
        if memory == "subprocess":
            measured = measure_cpu_memory(rows, dict(threads=torch.get_num_threads(),
                                                     spc=args.samples_per_class), update)
            update(len(provs) - measured)  # providers with nothing to measure
    finally:
        torch.set_float32_matmul_precision(prev_precision)
        close()
    report.add_derived(rows)
    config = {k: v for k, v in vars(args).items() if k not in ("device",)}
    config["memory"] = memory
    result = dict(environment=environment(device), config=config, missing_providers=missing,
                  results=rows)
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"{device_tag(args.device)}-{date}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    md = report.markdown(result)
    (out / "results.md").write_text(md)
    if not args.no_plots:
        report.plots(result, out)
    print(md)
    print(f"written to {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
