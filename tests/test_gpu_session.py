"""benchmarks/gpu_session.py, the one-call lent-GPU lease (issue #13), on the CPU:
the driver's deadline, caps, process-group kills and archive, the unpacking of
its archive, and that every benchmark step's arguments parse (a typo found on
the GPU would cost the lease)."""
import argparse
import json
import os
import re
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from benchmarks import call_overhead, contrastive, gpu_session as G, mine as B, topk, triton_tune

PY = sys.executable


def _args(out, budget_s=60.0, only=None):
    return argparse.Namespace(out=str(out), budget_s=budget_s, only=only)


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie that nobody reaped yet counts as gone)."""
    for _ in range(20):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state in ("Z", "X"):
            return False
        time.sleep(0.1)
    return True


def _py(code):
    return [PY, "-c", code]


def test_run_caps_kills_skips_and_archives(tmp_path, monkeypatch):
    """A failing step is reported with its status; a step whose `when` says no is
    skipped; a step that hangs is killed with its children at the deadline (less
    the reserve), and the steps after it are skipped for lack of time; the summary
    and the archive hold every step's log, and $OUT holds only names the device
    tool brings back."""
    monkeypatch.setattr(G, "MIN_STEP_S", 2.0)
    monkeypatch.setattr(G, "RESERVE_S", 1.0)
    pid_file = tmp_path / "grandchild.pid"
    steps = [
        G.Step("ok", 30, _py("print('hello'); print('=== 3 passed, 1 skipped in 0.1s ===')"), why="w1"),
        G.Step("fails", 30, _py("import sys; print('bad'); sys.exit(3)")),
        G.Step("not-wanted", 30, _py("print('never')"), when=lambda s: "no reason to"),
        # a child that starts a grandchild and hangs: both must go at the deadline
        G.Step("hangs", 1000, ["bash", "-c", f"sleep 300 & echo $! > {pid_file}; sleep 300"]),
        G.Step("too-late", 30, _py("print('never')")),
    ]
    budget = 25.0
    t0 = time.monotonic()
    rows = G.run(_args(tmp_path / "out", budget), steps, prebuilt=tmp_path / "none",
                 wheel_dir=tmp_path / "none")
    assert time.monotonic() - t0 < budget + 10
    by = {r["step"]: r for r in rows}
    assert [r["step"] for r in rows] == ["ok", "fails", "not-wanted", "hangs", "too-late"]
    assert by["ok"]["status"] == "ok" and by["ok"]["note"] == "3 passed, 1 skipped in 0.1s"
    assert by["ok"]["why"] == "w1"
    assert by["fails"]["status"] == "failed (rc 3)" and by["fails"]["note"] == "bad"
    assert by["not-wanted"] == dict(step="not-wanted", status="skipped", seconds=0.0,
                                    note="no reason to", why="")
    assert by["hangs"]["status"] == "timed out"
    assert not _alive(int(pid_file.read_text()))
    assert by["too-late"]["status"] == "skipped" and by["too-late"]["note"].startswith("no time left")

    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["gpu_session.tgz", "stage", "summary.md"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)
    md = (out / "summary.md").read_text()
    assert "| ok | ok |" in md and "| hangs | timed out |" in md and "| too-late | skipped |" in md
    with tarfile.open(out / "gpu_session.tgz") as tar:
        files = {m.name.lstrip("./") for m in tar.getmembers() if m.isfile()}
        assert {"ok/log.txt", "fails/log.txt", "hangs/log.txt", "summary.md", "steps.json",
                "extension.log"} <= files
        assert "killed after" in tar.extractfile("./hangs/log.txt").read().decode()
        steps_json = json.load(tar.extractfile("./steps.json"))
    assert [r["status"] for r in steps_json] == [r["status"] for r in rows]


def test_steps_needing_the_extension_wait_for_it(tmp_path):
    """Nothing carried and no CUDA here: the extension does not load, so the
    build step is due and the steps that need the CUDA kernels are not."""
    rows = G.run(_args(tmp_path, only=["probe"]), [G.Step("probe", 30, _py("pass"))],
                 prebuilt=tmp_path / "none", wheel_dir=tmp_path / "none")
    assert rows[0]["status"] == "ok"
    log = (tmp_path / "stage" / "extension.log").read_text()
    assert "check-extension rc 1" in log
    s = G.Session(tmp_path / "s", 10, [], "")
    assert G._needs_build(s) == "" and G._needs_extension(s) != ""
    s.extension_ok = True
    assert G._needs_build(s) != "" and G._needs_extension(s) == ""


def test_only_runs_the_named_steps(tmp_path):
    steps = [G.Step("a", 30, _py("pass")), G.Step("b", 30, _py("pass"))]
    rows = G.run(_args(tmp_path, only=["b"]), steps, prebuilt=tmp_path / "x", wheel_dir=tmp_path / "x")
    assert [r["step"] for r in rows] == ["b"]


@pytest.mark.parametrize("text,want", [
    ("a\nb\n\n", "b"),
    ("x\n==== 1 failed, 2 passed, 3 skipped in 12.3s ====\nafter\n", "1 failed, 2 passed, 3 skipped in 12.3s"),
    ("", ""),
])
def test_last_words_cases(tmp_path, text, want):
    p = tmp_path / "log.txt"
    p.write_text(text)
    assert G.last_words(p) == want


def _archive(tmp_path, members):
    stage = tmp_path / "stage"
    for name, text in members.items():
        (stage / name).parent.mkdir(parents=True, exist_ok=True)
        (stage / name).write_text(text)
    arch = tmp_path / "gpu_session.tgz"
    with tarfile.open(arch, "w:gz") as tar:
        tar.add(stage, arcname=".")
    return arch


def test_unpack_names_the_folder_by_gpu_and_date(tmp_path):
    arch = _archive(tmp_path, {"probe/probe.json": json.dumps(dict(gpu="NVIDIA H200",
                                                                    date_utc="2027-01-05T10:00:00+00:00")),
                               "bench-target/log.txt": "x"})
    root = tmp_path / "results"
    first = G.unpack(arch, root)
    assert first == root / "h200-2027-01-05"
    assert (first / "bench-target" / "log.txt").read_text() == "x"
    assert G.unpack(arch, root) == root / "h200-2027-01-05-2"  # never over an earlier run


def test_unpack_refuses_paths_outside(tmp_path):
    arch = tmp_path / "evil.tgz"
    evil = tmp_path / "evil.txt"
    evil.write_text("x")
    with tarfile.open(arch, "w:gz") as tar:
        tar.add(evil, arcname="../evil.txt")
    with pytest.raises(ValueError, match="refusing member"):
        G.unpack(arch, tmp_path / "results")


def test_step_names_and_arguments(tmp_path, monkeypatch):
    """Every step's name is one the device tool brings back; every benchmark
    step's arguments parse with that benchmark's own parser (on a CPU machine:
    the GPU memory cap is the only thing looked up on the device)."""
    monkeypatch.setattr(B, "default_mem_cap_gb", lambda device: 100.0)
    parsers = {"benchmarks.mine": B.parse_args, "benchmarks.call_overhead": call_overhead.parse_args,
               "benchmarks.topk": topk.parse_args, "benchmarks.contrastive": contrastive.parse_args,
               "benchmarks.triton_tune": triton_tune.parse_args}
    seen = set()
    for step in G.STEPS:
        assert re.fullmatch(r"[a-z0-9-]+", step.name)
        argv = [a.replace("{stage}", str(tmp_path / step.name)) for a in step.argv]
        if argv[:2] == [G.PY, "-m"] and argv[2] in parsers:
            args = parsers[argv[2]](argv[3:])
            assert str(getattr(args, "device", "cuda")) == "cuda", step.name  # tune: GPU only
            seen.add(argv[2])
    assert seen == set(parsers)
    assert [s.name for s in G.STEPS][:3] == ["probe", "build", "bench-target"]


def test_results_folder_name():
    root = Path("/r")
    assert G.results_folder(dict(gpu="NVIDIA H100 80GB HBM3", date_utc="2027-02-01T00:00:00"), root) \
        == root / "h100-80gb-hbm3-2027-02-01"


def test_source_digest_follows_the_build_inputs(tmp_path):
    for rel, text in {"csrc/a.cpp": "int a;", "csrc/cuda/b.cu": "int b;",
                      "fastmine/_build_manifest.json": "{}", "setup.py": "", "README.md": "x"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    d0 = G.source_digest(tmp_path)
    (tmp_path / "README.md").write_text("y")  # not a build input
    assert G.source_digest(tmp_path) == d0
    (tmp_path / "csrc/cuda/b.cu").write_text("int b2;")
    assert G.source_digest(tmp_path) != d0
    (tmp_path / "csrc/cuda/b.cu").write_text("int b;")
    assert G.source_digest(tmp_path) == d0
    (tmp_path / "csrc/cuda/b.cu").rename(tmp_path / "csrc/cuda/c.cu")  # same bytes, other name
    assert G.source_digest(tmp_path) != d0


def test_a_stale_carried_build_is_not_installed(tmp_path):
    """A carried extension built from other sources than this tree's (csrc/
    changed after benchmarks/gpu_prebuild.sh) would run stale kernels: it is
    left out, and the build step becomes due."""
    prebuilt = tmp_path / "prebuilt"
    prebuilt.mkdir()
    fake = prebuilt / "_C.cpython-399-x86_64-linux-gnu.so"
    fake.write_text("not a library")
    (prebuilt / G.DIGEST_FILE).write_text("0" * 64)
    rows = G.run(_args(tmp_path / "out"), [G.Step("x", 30, _py("pass"))], prebuilt=prebuilt,
                 wheel_dir=tmp_path / "none")
    assert rows[0]["status"] == "ok"
    log = (tmp_path / "out" / "stage" / "extension.log").read_text()
    assert "carried build NOT installed" in log and "0" * 64 in log
    assert not (G.REPO / "fastmine" / fake.name).exists()


def test_triton_tune_cell_times_every_config_of_the_path():
    """benchmarks.triton_tune under the interpreter (tiny N; the timer counts
    calls instead of timing them): a row per config listed for the cell's dot
    path, the prune marked as the autotuner would apply it, the autotuned row
    last, ratios against the fastest."""
    pytest.importorskip("triton")
    from benchmarks import triton_tune
    from fastmine import _triton as ft
    if not ft.INTERPRETED:
        pytest.skip("runs the Triton kernels under the interpreter")
    calls = []

    def timer(fn, repeats, warmup):
        fn()
        calls.append(1)
        return float(len(calls))  # 1, 2, 3, ... ms: the first config is the fastest
    rows = triton_tune.tune_cell(40, 8, "fp32", torch.device("cpu"), 1, 0, timer=timer)
    listed = [k for k, paths in ft._FWD_CONFIG_PATHS.items() if "fma32" in paths]
    assert [tuple(r["config"]) for r in rows[:-1]] == listed
    assert rows[-1]["config"] == "autotuned" and len(calls) == len(listed) + 1
    # D = 8: BLOCK_K is capped at 16, so every fma32 config with BLOCK_K = 32 is pruned
    assert [r["pruned"] for r in rows[:-1]] == [k[2] > 16 for k in listed]
    assert rows[0]["over_best"] == 1.0 and rows[-1]["over_best"] == len(calls)
    md = triton_tune.markdown(dict(environment=dict(date_utc="d", device="cpu", torch="t", triton="tr",
                                                    fastmine_git="g"), repeats=1, rows=rows))
    assert md.count("\n| fp32 | 8 | fma32 |") == len(rows)
