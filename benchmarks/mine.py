"""Sweep fastmine against every available provider on the same random data.

    python -m benchmarks.mine                 # quick preset on CPU, standard sweep on GPU
    python -m benchmarks.mine --quick         # CPU, < 1 minute
    python -m benchmarks.mine --cpu-kernel    # issue #16's CPU table: floor, easy/hard, easy/semihard,
                                              # all threads and 1 thread, one run (~1.5 min on 2 cores;
                                              # table.md + threads-<t>/results.md)
    python -m benchmarks.mine --full          # GPU: N 1k..65k, 8192 x bank up to 1M, all D/dtypes
    python -m benchmarks.mine --n 4096 --m 65536 --d 128 --dtype bf16 --providers cpu pml floor

Output
------
Every run gets its own folder, <results root>/<device>-<YYYY-MM-DD>-<HHMMSS>/
(UTC start time; "-2", "-3", ... appended if that exists), so a second run
never replaces the first.  The results root is benchmarks/results/ unless
--results-root or $FASTMINE_BENCH_RESULTS names another.  --out DIR writes to
DIR instead, and refuses a DIR that exists and is not empty unless --force is
given (then results.json, results.md and the plots there are replaced; other
files are kept).  The folder written is printed last.

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
* Machine load: other work on the machine inflates the times (a run next to a
  compile measured 48.89x the floor where a quiet run measured 2.2x).  The
  CPU time that anything but this benchmark (and its memory processes) used is
  measured from psutil.cpu_times() minus this process tree's CPU time, as
  busy cores: over LOAD_SAMPLE_S seconds just before the sweep and just after
  it (the benchmark idle), and over every LOAD_WINDOW_S window during it.  The
  run is "loaded" if any of these exceeds --load-threshold (default 0.25) x
  the machine's core count; without psutil, if the 1-minute load average
  before the run does.  (The load averages are recorded too, but not used when
  psutil is there: after a run they include the run's own threads, and they
  stay high for minutes after the previous run ended.)  A loaded run prints a
  WARNING at the start (if already loaded) and at the end, and records
  machine_load (the values, loaded: true/false and the warning) in
  results.json and at the top of results.md.
* Progress: the bar (plain lines when stderr is not a terminal) names the cell
  -- phase, provider, mode, strategy, N, M, D, dtype -- before it starts,
  including the memory cells run in a spawned process (the child announces
  each cell before drawing its data).
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import datetime as _dt
import gc
import itertools
import json
import multiprocessing as mp
import os
import queue as _queue
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

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
RESULTS_ENV = "FASTMINE_BENCH_RESULTS"  # overrides the results root (tests use a tmp dir)
LOAD_THRESHOLD = 0.25  # default --load-threshold: fraction of the cores busy with other work
LOAD_SAMPLE_S = 1.0  # seconds of idle sampling just before and just after the sweep
LOAD_WINDOW_S = 5.0  # sampling window during the sweep

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
MEM_CAP_FALLBACK_GB = 8.0  # CPU without psutil: the machine's memory is unknown


def default_mem_cap_gb(device: torch.device) -> float:
    """The default of every benchmark's --mem-cap-gb (GiB), one rule for all.

    CUDA: 90 % of the device's memory.  CPU: the smaller of half the RAM and
    three quarters of the RAM available when the run starts -- a run never plans
    on more than half the machine, nor on memory that other processes hold (on
    a quiet machine the first bound decides).  Without psutil:
    MEM_CAP_FALLBACK_GB.
    """
    if device.type == "cuda":
        return 0.9 * torch.cuda.get_device_properties(device).total_memory / 2**30
    try:
        import psutil
    except ImportError:
        return MEM_CAP_FALLBACK_GB
    vm = psutil.virtual_memory()
    return min(0.5 * vm.total, 0.75 * vm.available) / 2**30


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
        "fastmine_build": fastmine.build_info(),
        # what limits the ISA of torch's own kernels (the GEMM of the tiles and the floor)
        "isa_env": {k: os.environ[k] for k in ("MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY",
                                               "ONEDNN_MAX_CPU_ISA") if k in os.environ},
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


GIT_SHA_ENV = "FASTMINE_GIT_SHA"  # the commit of a tree copied without .git (a lent GPU's copy)


def _git_sha() -> Optional[str]:
    if os.environ.get(GIT_SHA_ENV) and not (REPO / ".git").exists():
        return os.environ[GIT_SHA_ENV]
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


# ---------------------------------------------------------------- machine load
def _cpu_counters() -> Optional[tuple]:
    """(monotonic s, busy CPU-seconds of the whole machine, CPU-seconds of this process tree).

    None without psutil.  Busy = user + nice + system + irq + softirq + steal,
    summed over all CPUs; this process tree = this process, its reaped children
    (os.times) and its live children (the spawned memory processes).
    """
    try:
        import psutil
    except ImportError:
        return None
    t = psutil.cpu_times()
    busy = sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))
    own = os.times()
    mine = own.user + own.system + own.children_user + own.children_system
    try:
        for child in psutil.Process().children(recursive=True):
            try:
                ct = child.cpu_times()
                mine += ct.user + ct.system
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
    except psutil.Error:
        pass
    return time.monotonic(), busy, mine


def _others_busy_cores(c0, c1) -> Optional[float]:
    """Average number of cores kept busy by other processes between two _cpu_counters()."""
    if c0 is None or c1 is None or c1[0] - c0[0] <= 0:
        return None
    return max(0.0, (c1[1] - c0[1]) - (c1[2] - c0[2])) / (c1[0] - c0[0])


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def load_snapshot(sample_s: Optional[float] = None) -> dict:
    """The load averages now, and the cores other processes kept busy over the next sample_s s."""
    sample_s = LOAD_SAMPLE_S if sample_s is None else sample_s
    c0 = _cpu_counters()
    time.sleep(sample_s)
    others = _others_busy_cores(c0, _cpu_counters())
    return dict(loadavg=_loadavg(), others_busy_cores=None if others is None else round(others, 2),
                sample_s=sample_s)


class LoadSampler:
    """Other processes' busy cores during the sweep: the mean, and per LOAD_WINDOW_S window."""

    def __init__(self, window_s: Optional[float] = None):
        self.window_s = LOAD_WINDOW_S if window_s is None else window_s
        self.windows: List[float] = []
        self._stop = threading.Event()
        self._first = self._last = None
        self._thread = threading.Thread(target=self._loop, name="fastmine-load-sampler", daemon=True)

    def start(self) -> "LoadSampler":
        self._first = _cpu_counters()
        self._thread.start()
        return self

    def _loop(self):
        prev = self._first
        while not self._stop.wait(self.window_s):
            cur = _cpu_counters()
            v = _others_busy_cores(prev, cur)
            if v is not None:
                self.windows.append(v)
            prev = cur

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        self._last = _cpu_counters()
        mean = _others_busy_cores(self._first, self._last)
        peak = max(self.windows + ([mean] if mean is not None else []), default=None)
        return dict(others_busy_cores_mean=None if mean is None else round(mean, 2),
                    others_busy_cores_max=None if peak is None else round(peak, 2),
                    window_s=self.window_s, windows=len(self.windows))


def assess_load(before: dict, during: Optional[dict], after: Optional[dict],
                threshold: float = LOAD_THRESHOLD, cores: Optional[int] = None) -> dict:
    """machine_load for results.json: the measurements, loaded: true/false and the warning.

    Loaded if other processes kept more than threshold x cores busy just
    before, on average or in any window during, or just after the run; without
    a CPU measurement (no psutil), if the 1-minute load average before it
    exceeded that.
    """
    cores = cores or os.cpu_count() or 1
    limit = threshold * cores
    reasons = []

    def over(v):
        return v is not None and v > limit
    if over(before.get("others_busy_cores")):
        reasons.append(f"other processes kept {before['others_busy_cores']:.2f} cores busy "
                       "just before the run")
    if during:
        if over(during.get("others_busy_cores_mean")):
            reasons.append(f"{during['others_busy_cores_mean']:.2f} on average during it")
        elif over(during.get("others_busy_cores_max")):
            reasons.append(f"up to {during['others_busy_cores_max']:.2f} in a {during['window_s']:g} s "
                           "window during it")
    if after and over(after.get("others_busy_cores")):
        reasons.append(f"{after['others_busy_cores']:.2f} just after it")
    measured = before.get("others_busy_cores") is not None
    la = before.get("loadavg")
    if not measured and la and over(la[0]):
        reasons.append(f"the 1-minute load average was {la[0]:.2f} before the run")
    loaded = bool(reasons)
    warning = None
    if loaded:
        warning = (f"WARNING: the machine was loaded ({'; '.join(reasons)}; threshold "
                   f"{threshold:g} x {cores} cores = {limit:.2f}). Times are inflated by the other "
                   "work (a run next to a compile measured 48.89x the floor where a quiet run "
                   "measured 2.2x): rerun on a quiet machine before quoting them.")
    return dict(loaded=loaded, warning=warning, threshold=threshold, cpu_count=cores,
                threshold_cores=round(limit, 2), method="cpu_times" if measured else "loadavg",
                before=before, during=during, after=after)


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


def cuda_median_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream (events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_interleaved(calls: Sequence[Callable[[], None]], device: torch.device, repeats: int,
                     warmup: int, budget_s: float = float("inf")) -> List[List[float]]:
    """Seconds per timed call of each of ``calls``, timed in rounds: each round
    calls every one once, in order (after ``warmup`` untimed rounds).  Ratios
    between the calls then compare times taken under the same machine state:
    a drift of the clock or of another tenant's load during the run hits each
    call alike, where timing one call's repeats after the other's does not (on a
    shared 2-core VM a floor timed alone moved by up to 30 % between runs).  Once
    the rounds so far took ``budget_s`` in total no new round starts (at least
    one is timed)."""
    spent = 0.0
    for _ in range(warmup):
        for call in calls:
            t0 = time.perf_counter()
            call()
            _sync(device)
            spent += time.perf_counter() - t0
    times: List[List[float]] = [[] for _ in calls]
    for _ in range(repeats):
        if times[0] and spent > budget_s:
            break
        for k, call in enumerate(calls):
            _sync(device)
            t0 = time.perf_counter()
            call()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
            spent += times[k][-1]
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


def _memory_worker(provider_name: str, cells: List[dict], cfg: dict, out_path: str, announce=None):
    """Spawned child: measure CPU peak memory of one provider over ``cells``; writes JSON.

    Results are flushed after every cell, so a child killed by the OOM killer
    still reports the cells before the fatal one.  Before each cell (before its
    data is drawn) its key is put on ``announce`` (a queue), so the parent's
    progress bar names the cell being measured.
    """
    torch.set_num_threads(cfg["threads"])
    device = torch.device("cpu")
    provs, _ = P.all_providers(device)
    (provider,) = [p for p in provs if p.name == provider_name]
    out = []
    for cell in cells:
        if announce is not None:
            announce.put(cell["key"])
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


def cell_label(phase: str, provider: str, r: dict) -> str:
    """Progress label of one cell: 'time fastmine cpu: forward easy/hard N=1024 M=1024 (self) D=128 fp32'."""
    m = f"M={r['m']}" + (" (self)" if r["self_refs"] else "")
    return f"{phase} {provider}: {r['mode']} {r['strategy']} N={r['n']} {m} D={r['d']} {r['dtype']}"


def measure_cpu_memory(rows: List[dict], cfg: dict, progress, label=None) -> int:
    """Fill rows' peak_mem_bytes, one fresh spawned process per provider.

    Calls ``progress(1)`` per provider process and ``label(text)`` as each
    cell starts in the child; returns how many processes were started.
    """
    label = label or (lambda text: None)
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
            announce = ctx.Queue()
            label(f"memory {name}: starting a fresh process")
            proc = ctx.Process(target=_memory_worker, args=(name, cells, cfg, path, announce))
            proc.start()
            while True:  # relabel as the child starts each cell, until it exits
                try:
                    key = announce.get(timeout=0.2)
                except _queue.Empty:
                    if not proc.is_alive():
                        break
                    continue
                label(cell_label("memory", name, prow[key]))
            proc.join()
            announce.close()
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
    g.add_argument("--cpu-kernel", action="store_true",
                   help="issue #16's CPU table (fixed cells, all threads and 1 thread, margin 0.2)")
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
                    help="skip a provider whose estimated memory exceeds this (default: "
                         "default_mem_cap_gb: on CPU min(50%% of the RAM, 75%% of the available "
                         "RAM), 90%% of the GPU memory on CUDA)")
    ap.add_argument("--out", default=None,
                    help="output dir; refused if it exists and is not empty, unless --force "
                         "(default: a new <results root>/<device>-<date>-<HHMMSS>/ per run)")
    ap.add_argument("--force", action="store_true",
                    help="with --out: replace the results.json, results.md and plots already there")
    ap.add_argument("--results-root", default=None,
                    help=f"where the default per-run folders go (default: ${RESULTS_ENV}, else "
                         "benchmarks/results/ in the source tree)")
    ap.add_argument("--load-threshold", type=float, default=LOAD_THRESHOLD,
                    help="warn that the machine is loaded when other processes keep more than this "
                         "fraction of the cores busy before, during or after the run "
                         "(default %(default)s)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = "quick" if args.quick else "full" if args.full else (
        "gpu" if args.device.type == "cuda" else "quick")
    if args.cpu_kernel:
        preset = "cpu-kernel"  # its own cells and defaults (run_cpu_kernel)
    args.preset = preset
    for k, v in (PRESETS[preset].items() if preset in PRESETS else ()):
        if k == "providers" and not (args.quick or args.full):
            continue  # no preset named: every available provider
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.mem_cap_gb is None:
        args.mem_cap_gb = default_mem_cap_gb(args.device)
    for name in ("n", "m", "d"):
        for v in getattr(args, name) or []:
            if v <= 0:
                ap.error(f"--{name} values must be positive, got {v}")
    if args.force and not args.out:
        ap.error("--force only applies to --out (the default folder is new for every run)")
    if args.out:
        why = _out_conflict(Path(args.out))
        if why and (not args.force or not Path(args.out).is_dir()):
            ap.error(f"--out {args.out} {why}; refusing to overwrite a previous run"
                     + ("" if not Path(args.out).is_dir() else " (add --force to replace it)"))
    return args


def _out_conflict(out: Path) -> Optional[str]:
    """Why writing a run into ``out`` would overwrite something, or None."""
    if not out.exists():
        return None
    if not out.is_dir():
        return "exists and is not a directory"
    if any(out.iterdir()):
        return "exists and is not empty"
    return None


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def results_root(args) -> Path:
    """--results-root, else $FASTMINE_BENCH_RESULTS, else benchmarks/results/ in the source tree."""
    return Path(args.results_root or os.environ.get(RESULTS_ENV) or REPO / "benchmarks" / "results")


def _new_dir(base: Path) -> Path:
    """Create and return ``base``, or the first of base-2, base-3, ... that did not exist."""
    for i in itertools.count(1):
        path = base if i == 1 else base.with_name(f"{base.name}-{i}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue


def output_dir(args, started: _dt.datetime) -> Path:
    """The folder this run writes to, created: never one holding an earlier run (unless --force)."""
    if not args.out:
        return _new_dir(results_root(args) / f"{device_tag(args.device)}-{started:%Y-%m-%d-%H%M%S}")
    out = Path(args.out)
    if _out_conflict(out) and not args.force:
        # Filled by something else while this run went on: keep both rather than lose either.
        new = _new_dir(out)
        print(f"WARNING: --out {out} was filled while this run went on; writing to {new} instead",
              file=sys.stderr)
        return new
    out.mkdir(parents=True, exist_ok=True)
    if args.force:  # replace the previous run's outputs, keep anything else
        for old in [out / "results.json", out / "results.md", *out.glob("time_*.png"),
                    *out.glob("memory_*.png")]:
            if old.is_file():
                old.unlink()
    return out


def write_table_run(args, started: _dt.datetime, result: dict, suffix: str,
                    markdown) -> Path:
    """Write a one-table benchmark run (benchmarks.topk, benchmarks.contrastive):
    results.json and table.md (``markdown(result)``) in --out, else in a new
    ``<device>-<date>-<time>-<suffix>`` folder of the results root; print the
    table, the load warning and the folder.  Returns the folder."""
    if not args.out:
        args.out = str(results_root(args) /
                       f"{device_tag(args.device)}-{started:%Y-%m-%d-%H%M%S}-{suffix}")
    out = output_dir(args, started)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    md = markdown(result)
    (out / "table.md").write_text(md)
    print(md)
    if result["machine_load"]["loaded"]:
        print(result["machine_load"]["warning"], file=sys.stderr)
    print(f"written to {Path(out).resolve()}", file=sys.stderr, flush=True)
    return out


def table_main(argv, parse_args, run, suffix: str, markdown) -> dict:
    """``main`` of a one-table benchmark (benchmarks.topk, benchmarks.contrastive):
    parse ``argv``, ``run`` the parsed arguments, write the run with
    :func:`write_table_run`; returns the results dict."""
    args = parse_args(argv)
    started = _utcnow()
    result = run(args)
    write_table_run(args, started, result, suffix, markdown)
    return result


def _sizes(args) -> List[tuple]:
    """(N, M, self_refs) cells: the batch against itself, then query x bank."""
    sizes = [(n, n, True) for n in args.n]
    for m in args.m or []:
        for n in ([args.bank_n] if args.bank_n else args.n):
            sizes.append((n, m, False))
    return sizes


class Progress:
    """Cells done out of ``total`` and a label naming the cell now running.

    A tqdm bar when stderr is a terminal with a width (and tqdm is installed);
    otherwise one plain line "[done/total] label" per label, so logs show
    every cell.  (tqdm draws nothing at all on a zero-width pseudo-terminal.)
    """

    def __init__(self, total: int, enabled: bool, stream=None):
        self.total, self.done, self.label, self.enabled = total, 0, "", enabled
        self.stream = stream if stream is not None else sys.stderr
        self._bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)() and self._columns() > 0:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, unit="cell", dynamic_ncols=True, file=self.stream)
            except ImportError:
                pass

    def _columns(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            return 0

    def cell(self, label: str) -> None:
        """Name the cell about to run (call before it starts)."""
        self.label = label
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=True)
        elif self.enabled:
            print(f"[{self.done}/{self.total}] {label}", file=self.stream, flush=True)

    def update(self, k: int = 1) -> None:
        self.done += k
        if self._bar is not None:
            self._bar.update(k)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(f"[{self.done}/{self.total}] done", file=self.stream, flush=True)


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
    before = load_snapshot()
    pre = assess_load(before, None, None, args.load_threshold)
    if pre["loaded"]:
        print(pre["warning"], file=sys.stderr, flush=True)
    progress = Progress(total, not args.no_progress)
    # What the first pass does to a cell (the label's first word); subprocess memory comes after.
    phase = "time" if args.repeats > 0 else "run" if memory != "subprocess" else "check"
    if memory == "inprocess":
        phase += "+memory"
    rows: List[dict] = []
    prev_precision = torch.get_float32_matmul_precision()
    data_key, data = None, None
    sampler = LoadSampler().start()
    try:
        for seed_i, (n, m, self_refs, d, dt, strategy, mode) in enumerate(cells):
            dtype, precision = DTYPES[dt]
            torch.set_float32_matmul_precision(precision or "highest")
            seed = args.seed + 7919 * n + 104729 * m + 31 * d + sorted(DTYPES).index(dt)
            key = (n, m, self_refs, d, dt)
            if key != data_key:  # one fresh draw per size/dtype, shared by every provider
                progress.cell(f"drawing data: N={n} M={m}{' (self)' if self_refs else ''} D={d} {dt}")
                data = None
                gc.collect()
                data = make_data(n, None if self_refs else m, d, dtype, device, args.samples_per_class, seed)
                data_key = key
            elem = torch.empty((), dtype=dtype).element_size()
            for prov in provs:
                row = dict(provider=prov.name, mode=mode, strategy=strategy, n=n, m=m, d=d, dtype=dt,
                           self_refs=self_refs, seed=seed, status="ok", time_s=None, times_s=None,
                           peak_mem_bytes=None, mem_method=None)
                why = prov.unsupported(device, strategy, mode, not self_refs)
                est = prov.estimate_bytes(n, m, d, elem)
                if why:
                    progress.update()
                    continue  # not a result: e.g. BatchHardMiner in an easy/hard cell
                if est > args.mem_cap_gb * 2**30:
                    row["status"] = f"skipped (est. {est / 2**30:.1f} GB)"
                else:
                    progress.cell(cell_label(phase, prov.name, row))
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
                progress.update()
        if memory == "subprocess":
            measured = measure_cpu_memory(rows, dict(threads=torch.get_num_threads(),
                                                     spc=args.samples_per_class),
                                          progress.update, progress.cell)
            progress.update(len(provs) - measured)  # providers with nothing to measure
    finally:
        torch.set_float32_matmul_precision(prev_precision)
        progress.close()
        during = sampler.stop()
    after = load_snapshot()
    report.add_derived(rows)
    config = {k: v for k, v in vars(args).items() if k not in ("device",)}
    config["memory"] = memory
    result = dict(environment=environment(device), config=config, missing_providers=missing,
                  machine_load=assess_load(before, during, after, args.load_threshold),
                  results=rows)
    return result


# ---------------------------------------------------------------- --cpu-kernel
# Issue #16's table: fixed (N, D) cells of the batch against itself, fp32 at
# "highest", 8 samples per class (or --samples-per-class), forward only; the
# floor is the blocked matmul provider (torch.mm over row blocks of
# FLOOR_BLOCK_ELEMS outputs: 512 rows at N = 8192), easy/hard, and easy/semihard
# with margin 0.2 on the cpu backend; every cell with torch's threads and with
# one thread, in one run.  The three calls of a cell are timed in interleaved
# rounds (time_interleaved), so each ratio compares calls made side by side.
CPU_KERNEL_CELLS = [(8192, 32), (8192, 128), (8192, 512), (16384, 128)]
CPU_KERNEL_MARGIN = 0.2


def run_cpu_kernel(args) -> dict:
    """The --cpu-kernel preset: rows like run()'s, with a "threads" field."""
    repeats = args.repeats if args.repeats is not None else 9
    warmup = args.warmup if args.warmup is not None else 1
    all_threads = args.threads or torch.get_num_threads()
    cells = [(n, d) for (n, d) in CPU_KERNEL_CELLS
             if (not args.n or n in args.n) and (not args.d or d in args.d)]

    def mine(pos, neg, margin=None):
        def call(x, labels):
            with torch.no_grad():
                fastmine.mine(x, labels, pos_strategy=pos, neg_strategy=neg, margin=margin,
                              distance="euclidean", backend="cpu")
        return call
    runs = [(P.FLOOR, "floor", lambda x, labels: P.blocked_matmul(x, x)),
            ("fastmine cpu", "easy/hard", mine("easy", "hard")),
            ("fastmine cpu", "easy/semihard", mine("easy", "semihard", CPU_KERNEL_MARGIN))]
    before = load_snapshot()
    pre = assess_load(before, None, None, args.load_threshold)
    if pre["loaded"]:
        print(pre["warning"], file=sys.stderr, flush=True)
    progress = Progress(len(cells) * 2, not args.no_progress)
    prev_precision, prev_threads = torch.get_float32_matmul_precision(), torch.get_num_threads()
    rows: List[dict] = []
    sampler = LoadSampler().start()
    try:
        torch.set_float32_matmul_precision("highest")
        for n, d in cells:
            seed = args.seed + 7919 * n + 104729 * n + 31 * d + sorted(DTYPES).index("fp32")
            x, labels, _, _ = make_data(n, None, d, torch.float32, args.device,
                                        args.samples_per_class, seed)
            for threads in (all_threads, 1):
                torch.set_num_threads(threads)
                progress.cell(f"time floor, easy/hard, easy/semihard N={n} D={d} threads={threads}")
                timed = time_interleaved([functools.partial(fn, x, labels) for _, _, fn in runs],
                                         args.device, repeats, warmup, args.cell_budget_s)
                for (name, strategy, _), times in zip(runs, timed):
                    rows.append(dict(provider=name, mode="forward", strategy=strategy, n=n, m=n,
                                     d=d, dtype="fp32", self_refs=True, seed=seed, threads=threads,
                                     margin=CPU_KERNEL_MARGIN if "semihard" in strategy else None,
                                     status="ok", peak_mem_bytes=None, mem_method=None,
                                     times_s=times, time_s=statistics.median(times)))
                progress.update()
    finally:
        torch.set_float32_matmul_precision(prev_precision)
        torch.set_num_threads(prev_threads)
        progress.close()
        during = sampler.stop()
    after = load_snapshot()
    for r in rows:  # t/floor against the floor of the same cell and thread count
        f = next(q["time_s"] for q in rows if q["provider"] == P.FLOOR and q["n"] == r["n"]
                 and q["d"] == r["d"] and q["threads"] == r["threads"])
        r["t_over_floor"] = r["time_s"] / f
        r["tflops"] = 2.0 * r["n"] * r["m"] * r["d"] / r["time_s"] / 1e12
        r["pml_over_t"] = None
    config = {k: v for k, v in vars(args).items() if k not in ("device",)}
    config.update(preset="cpu-kernel", cells=cells, margin=CPU_KERNEL_MARGIN, repeats=repeats,
                  warmup=warmup, threads=[all_threads, 1], memory="off")
    return dict(environment=environment(args.device), config=config, missing_providers={},
                machine_load=assess_load(before, during, after, args.load_threshold), results=rows)


def cpu_kernel_markdown(result: dict) -> str:
    """Issue #16's table: one line per (N, D), columns per thread count."""
    env, rows = result["environment"], result["results"]
    threads = result["config"]["threads"]
    load = result["machine_load"]
    lines = []
    if load.get("loaded"):
        lines += [f"> **{load.get('warning')}**", ""]
    before, during = load.get("before") or {}, load.get("during") or {}
    lines += [
        f"**{env['cpu']}**, {env['cpu_count']} CPUs, torch {env['torch']}, fastmine "
        f"{env['fastmine']} ({env['fastmine_git']}), finished {env['date_utc']}",
        "", f"Build: {env.get('fastmine_build')}; ISA limits: {env.get('isa_env') or 'none'}.",
        "", f"Machine load: 1-minute load average {before.get('loadavg')} before the run; "
        f"other processes' busy cores {before.get('others_busy_cores')} before, mean "
        f"{during.get('others_busy_cores_mean')} / max {during.get('others_busy_cores_max')} "
        f"during (loaded: {load.get('loaded')}).",
        "", "fp32, forward (no_grad), batch = references, median of the timed repeats; "
        f"semi-hard with margin {result['config']['margin']}; x floor = time / floor time "
        "(same cell, same threads).", ""]
    head = "| N, D |"
    sep = "|---|"
    for t in threads:
        head += (f" floor ({t}t) | easy/hard ({t}t) | x floor | easy/semihard ({t}t) | x floor |")
        sep += "---:|---:|---:|---:|---:|"
    lines += [head, sep]
    for n, d in result["config"]["cells"]:
        line = f"| {n}, {d} |"
        for t in threads:
            get = {r["strategy"]: r for r in rows if r["n"] == n and r["d"] == d and r["threads"] == t}
            line += (f" {get['floor']['time_s'] * 1e3:.1f} ms | {get['easy/hard']['time_s'] * 1e3:.1f} ms"
                     f" | {get['easy/hard']['t_over_floor']:.2f} | "
                     f"{get['easy/semihard']['time_s'] * 1e3:.1f} ms | "
                     f"{get['easy/semihard']['t_over_floor']:.2f} |")
        lines.append(line)
    return "\n".join(lines) + "\n"


def write_cpu_kernel(result: dict, out: Path) -> str:
    """Write a --cpu-kernel run: cpu_kernel.json (all rows) and table.md (issue #16's table),
    and per thread count t, threads-<t>/results.json + results.md in the standard format
    (report.markdown, t/floor against the floor of the same thread count).  Returns table.md."""
    out = Path(out)
    (out / "cpu_kernel.json").write_text(json.dumps(result, indent=1, default=str))
    for t in result["config"]["threads"]:
        sub = dict(result, environment=dict(result["environment"], torch_threads=t),
                   results=[dict(r) for r in result["results"] if r["threads"] == t])
        report.add_derived(sub["results"])
        d = out / f"threads-{t}"
        d.mkdir(exist_ok=True)
        (d / "results.json").write_text(json.dumps(sub, indent=1, default=str))
        (d / "results.md").write_text(report.markdown(sub))
    md = cpu_kernel_markdown(result)
    (out / "table.md").write_text(md)
    return md


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = _utcnow()
    if args.cpu_kernel:
        result = run_cpu_kernel(args)
        out = output_dir(args, started)
        md = write_cpu_kernel(result, out)
        print(md)
        if result["machine_load"]["loaded"]:
            print(result["machine_load"]["warning"], file=sys.stderr)
        print(f"written to {out.resolve()}", file=sys.stderr, flush=True)
        return result
    result = run(args)
    out = output_dir(args, started)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    md = report.markdown(result)
    (out / "results.md").write_text(md)
    if not args.no_plots:
        report.plots(result, out)
    print(md)
    load = result["machine_load"]
    if load["loaded"]:
        print(load["warning"], file=sys.stderr)
    print(f"written to {out.resolve()}", file=sys.stderr, flush=True)
    return result


if __name__ == "__main__":
    main()
