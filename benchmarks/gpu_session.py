"""Issue #13 in one lent-GPU call: every GPU check, time-boxed, prepared on the CPU.

A lent GPU comes with 15 minutes of device time for a whole session, the
machine's start (a minute or two) included, and one command may run 10
minutes: the lease is one call.  ``run`` executes the steps of :data:`STEPS` in
order under one deadline, each in its own process group with its own time cap
(a step that hangs or crashes costs only its cap); a step is skipped when less
than :data:`MIN_STEP_S` would be left for it.  Every log and result folder
goes into one archive (``gpu_session.tgz``) and a ``summary.md``, both
rewritten in $OUT after each step, so a call cut short still brings back all
that finished.

Before the call, on the CPU machine (minutes; once per change of csrc/)::

    bash benchmarks/gpu_prebuild.sh

builds what the call carries: ``.gpu_build/`` (fastmine._C for the GPU image's
Python 3.12 and torch 2.11.0+cu130, for sm_90; the CUDA self-test) and
``.gpu_wheels/`` (PML's wheel: the image has no PML).  The call (the device
tool's ``run``)::

    carry [".gpu_build", ".gpu_wheels"], timeout_s 600, command
    FASTMINE_GIT_SHA=<git rev-parse HEAD> python3 -m benchmarks.gpu_session run --budget-s 560

and after it, here::

    python -m benchmarks.gpu_session unpack <files_at>/gpu_session.tgz

which puts the run under ``benchmarks/results/<gpu>-<date>/``.

Without a carried build (or when it does not load there: another Python or
torch), the first step builds the extension on the device (16 cores).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
PREBUILT = REPO / ".gpu_build"  # written by benchmarks/gpu_prebuild.sh
WHEELS = REPO / ".gpu_wheels"
ARCHIVE = "gpu_session.tgz"
SUMMARY = "summary.md"
MIN_STEP_S = 20.0  # a step is not started with less than this left
RESERVE_S = 10.0  # kept back at the end for the last archive
PY = sys.executable

# ------------------------------------------------------------------ the steps


@dataclass
class Step:
    """One command of the lease: ``argv`` (``{stage}`` is replaced by the step's
    own folder), run with ``env`` added, killed after ``cap_s`` seconds (or at the
    deadline).  ``when`` decides, at its turn, whether it runs ('' = yes, else why
    not)."""
    name: str
    cap_s: float
    argv: List[str]
    env: Dict[str, str] = field(default_factory=dict)
    when: Optional[Callable[["Session"], str]] = None
    why: str = ""  # what the step is for (the summary's last column)


def _needs_extension(s: "Session") -> str:
    return "" if s.extension_ok else "no CUDA extension (see build / extension.log)"


def _needs_build(s: "Session") -> str:
    return "" if not s.extension_ok else "the carried extension loaded"


def _needs_selftest(s: "Session") -> str:
    return "" if (PREBUILT / "fastmine_cuda_selftest").is_file() else "no carried self-test"


def _mine(*args: str) -> List[str]:
    return [PY, "-m", "benchmarks.mine", "--device", "cuda", "--no-plots", "--no-progress", *args]


# The tests on the GPU (issue #13 item 1), in three steps by priority: the tests
# marked gpu; the contract suites on CUDA tensors (every backend); then, in what
# time is left, the whole suite as the issue names it.  12 xdist workers share
# the GPU (16 cores; Triton compiles on the host); JUnit XML and the slowest 30.
TEST_ENV = {"FASTMINE_TEST_GPU": "1", "FASTMINE_TEST_DEVICE": "cuda"}


def _pytest(*args: str) -> List[str]:
    return [PY, "-m", "pytest", "-q", "-n", "12", "--timeout", "120", "-p", "no:cacheprovider",
            "-rfE", "--durations", "30", "--junitxml", "{stage}/junit.xml", *args]


STEPS: List[Step] = [
    Step("probe", 60, [PY, "-m", "benchmarks.gpu_session", "probe", "--out", "{stage}"],
         why="GPU, driver, versions; measured ceilings (bf16 / tf32 GEMM, copy)"),
    Step("build", 300, ["bash", "-c", "FASTMINE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "
                        f"{PY} setup.py build_ext --inplace -q && {PY} -m benchmarks.gpu_session "
                        "check-extension"], when=_needs_build,
         why="the CUDA extension, built here when the carried one does not load"),
    Step("bench-target", 150, _mine(
        "--n", "8192", "--d", "512", "--dtype", "tf32", "bf16",
        "--strategies", "easy/hard", "easy/semihard", "--modes", "forward", "backward",
        "--providers", "triton", "cuda", "torch", "BatchEasyHardMiner", "floor",
        "--repeats", "10", "--warmup", "3", "--cell-budget-s", "10", "--out", "{stage}/run"),
         why="N = M = 8192, D = 512, tf32 + bf16: fused vs torch.mm floor, PML, reference"),
    Step("tests-gpu", 150, _pytest("tests", "-m", "gpu"), env=TEST_ENV,
         why="the tests marked gpu (compiled Triton and CUDA kernels on the device)"),
    Step("tests-contract", 150, _pytest("tests/test_contract.py", "tests/test_topk_backends.py"),
         env=TEST_ENV, why="the contract suites on CUDA tensors, every backend"),
    Step("small-batch", 60, [PY, "-m", "benchmarks.call_overhead", "--device", "cuda", "--only",
                             "timing", "--out", "{stage}"],
         why="N = 256, D = 128 loss fwd+bwd (target 50 us), CUDA graph capture"),
    Step("bench-large", 90, _mine(
        "--n", "65536", "--m", "1048576", "--bank-n", "8192", "--d", "128", "512", "--dtype", "bf16",
        "--strategies", "easy/hard", "--modes", "forward", "backward",
        "--providers", "triton", "cuda", "floor", "--repeats", "5", "--warmup", "2",
        "--cell-budget-s", "8", "--out", "{stage}/run"),
         why="N = 65536 (memory beyond inputs), 8192 x bank 1,000,000 bf16"),
    Step("tune", 90, [PY, "-m", "benchmarks.triton_tune", "--out", "{stage}"],
         why="every Triton forward config timed alone (the data for tuning _FWD_CONFIG_PATHS)"),
    Step("sanitizer", 60, ["bash", "-c",
                           f"{PREBUILT}/fastmine_cuda_selftest && "
                           f"compute-sanitizer --tool memcheck --error-exitcode 9 "
                           f"{PREBUILT}/fastmine_cuda_selftest && "
                           f"compute-sanitizer --tool racecheck --error-exitcode 9 "
                           f"{PREBUILT}/fastmine_cuda_selftest"], when=_needs_selftest,
         why="the CUDA self-test, under memcheck and racecheck"),
    Step("topk", 45, [PY, "-m", "benchmarks.topk", "--device", "cuda", "--no-pml",
                      "--out", "{stage}/run"], why="top-k / distance-weighted at N = 8192"),
    Step("contrastive", 60, [PY, "-m", "benchmarks.contrastive", "--device", "cuda",
                             "--large-n", "65536", "--out", "{stage}/run"],
         why="SupCon / NT-Xent / MS on triton vs floor and PML"),
    # Less what CI runs on the CPU alone: the nvcc compile checks (minutes of host
    # compiling), the CUDA emulation and the packaging checks.
    Step("tests-all", 600, _pytest("tests", "--ignore", "tests/test_cuda_emulation.py",
                                   "--ignore", "tests/test_packaging.py", "-k", "not compiles_with_nvcc"),
         env=TEST_ENV, why="the whole suite as issue #13 names it (less CPU-only checks), in the time left"),
]


# ------------------------------------------------------------------ the driver


class Session:
    """State of one ``run``: the deadline, the stage folder, the results so far."""

    def __init__(self, out: Path, budget_s: float, steps: Sequence[Step], python_path: str):
        self.t0 = time.monotonic()
        self.deadline = self.t0 + budget_s
        self.out = out
        self.stage = out / "stage"
        self.stage.mkdir(parents=True, exist_ok=True)
        self.steps = list(steps)
        self.python_path = python_path
        self.extension_ok = False
        self.rows: List[dict] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def env(self, extra: Dict[str, str]) -> Dict[str, str]:
        env = dict(os.environ, PYTHONPATH=self.python_path, PYTHONUNBUFFERED="1")
        env.update(extra)
        return env

    def run_step(self, step: Step) -> dict:
        row = dict(step=step.name, status="", seconds=0.0, note="", why=step.why)
        why_not = step.when(self) if step.when else ""
        room = self.left() - RESERVE_S
        if why_not:
            row["status"] = "skipped"
            row["note"] = why_not
        elif room < MIN_STEP_S:
            row["status"] = "skipped"
            row["note"] = f"no time left ({room:.0f} s)"
        else:
            folder = self.stage / step.name
            folder.mkdir(parents=True, exist_ok=True)
            argv = [a.replace("{stage}", str(folder)) for a in step.argv]
            limit = min(step.cap_s, room)
            row["limit_s"] = round(limit)
            t = time.monotonic()
            rc = run_limited(argv, folder / "log.txt", limit, self.env(step.env))
            row["seconds"] = round(time.monotonic() - t, 1)
            row["rc"] = rc
            row["status"] = "ok" if rc == 0 else "timed out" if rc is None else f"failed (rc {rc})"
            row["note"] = last_words(folder / "log.txt")
        self.rows.append(row)
        print(f"[{time.monotonic() - self.t0:6.1f} s] {step.name}: {row['status']} "
              f"({row['seconds']} s) {row['note']}", flush=True)
        self.write()
        return row

    def write(self) -> None:
        """summary.md and the archive of the stage folder, replaced atomically."""
        md = summary_markdown(self.rows, time.monotonic() - self.t0)
        (self.stage / SUMMARY).write_text(md)
        (self.stage / "steps.json").write_text(json.dumps(self.rows, indent=1))
        tmp = self.out / (SUMMARY + ".tmp")
        tmp.write_text(md)
        tmp.replace(self.out / SUMMARY)
        tmp = self.out / (ARCHIVE + ".tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(self.stage, arcname=".")
        tmp.replace(self.out / ARCHIVE)


def run_limited(argv: Sequence[str], log: Path, limit_s: float, env: Dict[str, str]) -> Optional[int]:
    """Run ``argv`` in the repository with stdout and stderr into ``log``, in its
    own process group, killed (the whole group) after ``limit_s`` seconds.
    Returns the exit status, or None when it was killed for time."""
    with open(log, "w") as f:
        proc = subprocess.Popen(list(argv), cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            f.write(f"\n[gpu_session: killed after {limit_s:.0f} s]\n")
            return None


_PYTEST_TAIL = re.compile(r"=+ (.*(passed|failed|error|skipped).*) =+$")


def last_words(log: Path, width: int = 160) -> str:
    """The line that says how a step ended: pytest's final count, else the last
    non-empty line of its log (cut to ``width``)."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except FileNotFoundError:
        return ""
    for ln in reversed(lines):
        m = _PYTEST_TAIL.match(ln)
        if m:
            return m.group(1)[:width]
    return (lines[-1] if lines else "")[:width]


def summary_markdown(rows: List[dict], elapsed_s: float) -> str:
    lines = ["# GPU session (benchmarks/gpu_session.py)", "",
             f"{len(rows)} steps in {elapsed_s:.0f} s", "",
             "| step | status | s | how it ended | what it is for |", "|---|---|---|---|---|"]
    for r in rows:
        note = r["note"].replace("|", "/")
        lines.append(f"| {r['step']} | {r['status']} | {r['seconds']} | {note} | {r['why']} |")
    return "\n".join(lines) + "\n"


def install_carried(session: Session, log: Path, prebuilt: Path = PREBUILT,
                    wheel_dir: Path = WHEELS) -> None:
    """Put the carried wheels (``wheel_dir``) on the path and the carried extension
    (``prebuilt``) in fastmine/, then check (in a fresh process) that it loads with
    its CUDA kernels; the outcome goes to ``log`` and ``session.extension_ok``."""
    notes = []
    site = session.out / "site"
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    if wheels:
        r = subprocess.run([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                            "--no-compile", "--target", str(site), *map(str, wheels)],
                           capture_output=True, text=True)
        notes.append(f"wheels {[w.name for w in wheels]}: rc {r.returncode} {r.stderr[-500:]}")
        session.python_path = f"{session.python_path}:{site}"
    built = sorted(prebuilt.glob("_C.*.so")) if prebuilt.is_dir() else []
    digest = prebuilt / DIGEST_FILE
    carried = digest.read_text().strip() if digest.is_file() else None
    if built and carried != source_digest(REPO):
        notes.append(f"carried build NOT installed: built from sources {carried}, this tree's are "
                     f"{source_digest(REPO)} (csrc/, the manifest or setup.py changed since "
                     f"benchmarks/gpu_prebuild.sh ran)")
        built = []
    for f in built + (sorted(prebuilt.glob("_build_config.py")) if built else []):
        shutil.copy2(f, REPO / "fastmine" / f.name)
        notes.append(f"installed {f.name}")
    r = subprocess.run([PY, "-m", "benchmarks.gpu_session", "check-extension"], cwd=REPO,
                       env=session.env({}), capture_output=True, text=True)
    session.extension_ok = r.returncode == 0
    notes.append(f"check-extension rc {r.returncode}:\n{r.stdout}{r.stderr}")
    log.write_text("\n".join(notes) + "\n")
    print(f"carried extension {'loads' if session.extension_ok else 'does NOT load'}: "
          f"{(r.stdout + r.stderr).strip().splitlines()[-1:]}", flush=True)


def run(args, steps: Sequence[Step] = STEPS, prebuilt: Path = PREBUILT,
        wheel_dir: Path = WHEELS) -> List[dict]:
    """The lease: the carried build installed, then ``steps`` (those named by
    ``args.only``, if any) in order under ``args.budget_s``; returns the summary rows."""
    out = Path(args.out or os.environ.get("OUT") or "/tmp/fastmine-gpu-session")
    session = Session(out, args.budget_s, [s for s in steps if not args.only or s.name in args.only],
                      python_path=str(REPO))
    install_carried(session, session.stage / "extension.log", prebuilt, wheel_dir)
    for step in session.steps:
        row = session.run_step(step)
        if step.name == "build" and row["status"] == "ok":
            session.extension_ok = True  # built here, and check-extension passed
    print(summary_markdown(session.rows, time.monotonic() - session.t0))
    return session.rows


# ------------------------------------------------------------------ the carried build

DIGEST_FILE = "source_digest"  # in .gpu_build/, written by benchmarks/gpu_prebuild.sh
BUILD_INPUTS = ("csrc", "fastmine/_build_manifest.json", "setup.py")


def source_digest(root: Path) -> str:
    """sha256 over what the compiled extension is built from (BUILD_INPUTS under
    ``root``: each file's path relative to ``root`` and its bytes, in sorted
    order): a carried build is used only when this matches the tree it runs in."""
    import hashlib
    h = hashlib.sha256()
    files = []
    for rel in BUILD_INPUTS:
        p = root / rel
        files += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------ probe


def check_extension() -> int:
    """Exit status 0 when fastmine's compiled extension loads with CUDA kernels."""
    import fastmine
    from fastmine import _extension
    print("build:", fastmine.build_info())
    print("backends on cuda:", fastmine.available_backends("cuda"))
    if not _extension.cuda_kernels_loaded():
        print("no CUDA kernels:", _extension.cuda_why_missing())
        return 1
    return 0


def probe(out: Path) -> dict:
    """The machine and its two ceilings, measured (METHOD.md): GEMM rates on
    random data (8192^3 bf16, tf32, fp32 'highest') and a device-to-device copy
    (bytes read + written).  Writes probe.json into ``out``."""
    import torch

    from benchmarks.mine import cuda_median_ms, environment
    dev = torch.device("cuda")
    info = environment(dev)
    p = torch.cuda.get_device_properties(dev)
    info.update(sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                l2_bytes=getattr(p, "L2_cache_size", None))
    n = 8192
    prev = torch.get_float32_matmul_precision()
    for name, dtype, precision in (("bf16", torch.bfloat16, "highest"), ("tf32", torch.float32, "high"),
                                   ("fp32", torch.float32, "highest")):
        torch.set_float32_matmul_precision(precision)
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        ms = cuda_median_ms(lambda: torch.mm(a, b), 10, 3)
        info[f"gemm_{name}_tflops"] = round(2 * n ** 3 / ms / 1e9, 1)
        del a, b
    torch.set_float32_matmul_precision(prev)
    src = torch.randn(2 ** 29 // 2, device=dev)  # 1 GiB of float32
    dst = torch.empty_like(src)
    ms = cuda_median_ms(lambda: dst.copy_(src), 10, 3)
    info["copy_tb_s"] = round(2 * src.numel() * 4 / ms / 1e9, 2)
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True,
                                            timeout=30).stdout
    except Exception as e:  # noqa: BLE001
        info["nvidia_smi"] = f"{type(e).__name__}: {e}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(info, indent=1, default=str))
    for k in ("gpu", "driver", "cuda", "torch", "triton", "python", "sm_count", "fastmine_build",
              "gemm_bf16_tflops", "gemm_tf32_tflops", "gemm_fp32_tflops", "copy_tb_s"):
        print(f"{k}: {info.get(k)}")
    return info


# ------------------------------------------------------------------ unpack


def results_folder(probe_info: dict, root: Path) -> Path:
    """benchmarks/results/<gpu>-<date>[-N]/ for a probe.json: the GPU's name in
    lower case with words joined by '-' (NVIDIA dropped), the run's UTC date."""
    gpu = re.sub(r"[^a-z0-9]+", "-", probe_info.get("gpu", "gpu").lower().replace("nvidia", "")).strip("-")
    date = str(probe_info.get("date_utc", _dt.datetime.now(_dt.timezone.utc).isoformat()))[:10]
    base = root / f"{gpu or 'gpu'}-{date}"
    folder, k = base, 1
    while folder.exists():
        k += 1
        folder = base.with_name(f"{base.name}-{k}")
    return folder


def unpack(archive: Path, root: Path) -> Path:
    """Extract a session's archive into a new results folder; returns it."""
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:  # nothing outside the folder, no links
            if m.name.startswith("/") or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
                raise ValueError(f"{archive}: refusing member {m.name!r}")
        probe_member = next((m for m in members if Path(m.name).parts[-2:] == ("probe", "probe.json")),
                            None)
        info = json.load(tar.extractfile(probe_member)) if probe_member else {}
        folder = results_folder(info, root)
        folder.mkdir(parents=True)
        tar.extractall(folder)
    return folder


# ------------------------------------------------------------------ CLI


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the whole lease (on the GPU machine)")
    r.add_argument("--budget-s", type=float, default=560.0,
                   help="seconds from start to the last archive (default %(default)s)")
    r.add_argument("--only", nargs="+", choices=[s.name for s in STEPS],
                   help="run these steps only (in their usual order)")
    r.add_argument("--out", default=None, help="default: $OUT")
    p = sub.add_parser("probe", help="the machine and its ceilings")
    p.add_argument("--out", required=True)
    sub.add_parser("check-extension", help="exit 0 when the CUDA extension loads")
    sub.add_parser("digest", help="the digest of the extension's sources in this tree")
    u = sub.add_parser("unpack", help="a session's archive into benchmarks/results/<gpu>-<date>/")
    u.add_argument("archive")
    u.add_argument("--results-root", default=str(REPO / "benchmarks" / "results"))
    sub.add_parser("list", help="the steps, their caps and what each is for")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        rows = run(args)
        return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1
    if args.cmd == "probe":
        probe(Path(args.out))
        return 0
    if args.cmd == "check-extension":
        return check_extension()
    if args.cmd == "digest":
        print(source_digest(REPO))
        return 0
    if args.cmd == "unpack":
        print(unpack(Path(args.archive), Path(args.results_root)))
        return 0
    for s in STEPS:
        print(f"{s.name:14s} {s.cap_s:5.0f} s  {s.why}")
    print(f"{'total caps':14s} {sum(s.cap_s for s in STEPS):5.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
