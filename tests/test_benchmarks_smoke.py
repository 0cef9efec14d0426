"""Smoke test of the benchmark suite (benchmarks/): the quick path at tiny sizes.

Checks the outputs (JSON fields, Markdown rows, plots, report regeneration),
the fresh-process memory measurement, and that the compared providers really
solve the same problem (PML with LpDistance(normalize_embeddings=False) selects
the same distances as fastmine euclidean).
"""
import json

import pytest
import torch

pytest.importorskip("pytorch_metric_learning")

from benchmarks import mine as M  # noqa: E402
from benchmarks import providers as P  # noqa: E402
from benchmarks import report  # noqa: E402

QUICK = ["fastmine cpu", "fastmine torch", P.PML_EASY_HARD, P.FLOOR]


def test_quick_path_outputs(tmp_path, capsys):
    out = tmp_path / "res"
    result = M.main(["--quick", "--device", "cpu", "--n", "256", "--repeats", "1", "--warmup", "0",
                     "--memory", "inprocess", "--no-progress", "--out", str(out)])
    rows = result["results"]
    assert sorted(r["provider"] for r in rows) == sorted(QUICK)
    assert "fastmine triton" not in {r["provider"] for r in rows}  # never under the interpreter
    for r in rows:
        assert r["status"] == "ok", r
        assert (r["n"], r["m"], r["d"], r["dtype"], r["mode"]) == (256, 256, 128, "fp32", "forward")
        assert r["time_s"] > 0 and len(r["times_s"]) == 1
        assert r["tflops"] == pytest.approx(2 * 256 * 256 * 128 / r["time_s"] / 1e12)
        assert r["peak_mem_bytes"] is not None and r["peak_mem_bytes"] >= 0
    by = {r["provider"]: r for r in rows}
    assert by[P.FLOOR]["t_over_floor"] == pytest.approx(1.0)
    assert by[P.PML_EASY_HARD]["pml_over_t"] == pytest.approx(1.0)
    assert by["fastmine cpu"]["pml_over_t"] == pytest.approx(
        by[P.PML_EASY_HARD]["time_s"] / by["fastmine cpu"]["time_s"])

    saved = json.loads((out / "results.json").read_text())
    env = saved["environment"]
    for key in ("date_utc", "cpu", "torch", "triton", "numpy", "pytorch_metric_learning",
                "fastmine_git", "torch_threads"):
        assert key in env, key
    assert saved["config"]["n"] == [256]
    md = (out / "results.md").read_text()
    for name in QUICK:
        assert f"| {name} | forward | easy/hard | fp32 | 256 |" in md
    # The README table is regenerated from the JSON, identically.
    report.main([str(out / "results.json")])
    assert capsys.readouterr().out.endswith(md)
    assert (out / "time_forward_easy-hard_fp32_d128_self.png").stat().st_size > 0


def test_memory_is_measured_in_a_fresh_process():
    row = dict(provider="fastmine torch", status="ok", n=512, m=512, d=64, dtype="fp32", mode="forward",
               strategy="easy/hard", seed=1, self_refs=True)
    done = []
    M.measure_cpu_memory([row], dict(threads=1, spc=8), done.append)
    assert done == [1]
    assert row["mem_method"] in ("VmHWM-reset", "ru_maxrss"), row
    # The torch reference materialises the 512 x 512 fp32 distance matrix (1 MiB).
    assert row["peak_mem_bytes"] >= 512 * 512 * 4, row


def test_cap_skips_instead_of_running(tmp_path):
    result = M.main(["--device", "cpu", "--n", "256", "--d", "16", "--providers", "BatchEasyHardMiner",
                     "--repeats", "1", "--warmup", "0", "--memory", "off", "--mem-cap-gb", "1e-6",
                     "--no-progress", "--no-plots", "--out", str(tmp_path)])
    (row,) = result["results"]
    assert row["status"].startswith("skipped (est. ") and row["time_s"] is None


@pytest.mark.parametrize("strategy", ["easy/hard", "easy/semihard", "hard/hard"])
def test_providers_solve_the_same_problem(strategy):
    device = torch.device("cpu")
    x, labels, _, _ = M.make_data(200, None, 16, torch.float64, device, 8, seed=3)
    pos, neg = strategy.split("/")
    provs, _ = P.all_providers(device)
    want = None
    for p in provs:
        if p.name == P.FLOOR or p.unsupported(device, strategy, "forward", False):
            continue
        pd, nd = p.run(x, labels, None, None, pos, neg)
        got = (pd.sort().values, nd.sort().values)  # PML keeps valid anchors only, in order
        if want is None:
            want = got
        torch.testing.assert_close(got, want, msg=lambda m: f"{p.name}: {m}")


def test_backward_mode_rows(tmp_path):
    result = M.main(["--device", "cpu", "--n", "128", "--d", "16", "--providers", "torch", "floor",
                     "--modes", "forward", "backward", "--repeats", "1", "--warmup", "0",
                     "--memory", "off", "--no-progress", "--no-plots", "--out", str(tmp_path)])
    rows = {(r["provider"], r["mode"]): r for r in result["results"]}
    # The floor is a forward-only row; the backward alone gets no rate or floor ratio.
    assert set(rows) == {("fastmine torch", "forward"), ("fastmine torch", "backward"),
                         (P.FLOOR, "forward")}
    back = rows[("fastmine torch", "backward")]
    assert back["status"] == "ok" and back["time_s"] > 0
    assert back["tflops"] is None and back["t_over_floor"] is None
    assert rows[("fastmine torch", "forward")]["t_over_floor"] > 0


def test_time_budget_limits_repeats():
    import time
    calls = []

    def fn(_):
        calls.append(1)
        time.sleep(0.02)
    times = M.time_call(lambda: None, fn, torch.device("cpu"), repeats=5, warmup=2, budget_s=0.01)
    assert len(calls) == 2 and len(times) == 1 and times[0] >= 0.02  # 1 warm-up, then 1 timed run
    times = M.time_call(lambda: None, fn, torch.device("cpu"), repeats=3, warmup=0)
    assert len(times) == 3


def test_time_interleaved_times_the_calls_in_rounds():
    """--cpu-kernel's timing: warm-up rounds, then rounds calling each once, in order;
    the budget stops new rounds (one is always timed)."""
    import time
    log = []

    def call(name, sleep=0.0):
        def run():
            log.append(name)
            time.sleep(sleep)
        return run
    times = M.time_interleaved([call("a"), call("b", 0.01), call("c")], torch.device("cpu"),
                               repeats=3, warmup=1)
    assert log == ["a", "b", "c"] * 4 and [len(t) for t in times] == [3, 3, 3]
    assert min(times[1]) >= 0.01 > max(times[0] + times[2])
    log.clear()
    times = M.time_interleaved([call("a", 0.02), call("b")], torch.device("cpu"), repeats=5,
                               warmup=0, budget_s=0.01)
    assert log == ["a", "b"] and [len(t) for t in times] == [1, 1]


# ---------------------------------------------------------------- item 20: output folders, load, progress
import datetime as _dt  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

TINY = ["--device", "cpu", "--n", "64", "--d", "8", "--providers", "floor", "--repeats", "1",
        "--warmup", "0", "--memory", "off", "--no-plots", "--no-progress"]


@pytest.fixture(autouse=True)
def _short_load_samples(monkeypatch):
    monkeypatch.setattr(M, "LOAD_SAMPLE_S", 0.02)  # the idle samples before/after each run


def _written_to(err: str) -> Path:
    (line,) = [ln for ln in err.splitlines() if ln.startswith("written to ")]
    return Path(line[len("written to "):])


def test_each_run_gets_its_own_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(M.RESULTS_ENV, str(tmp_path / "root"))
    # Both runs start in the same second: the name alone would collide.
    monkeypatch.setattr(M, "_utcnow", lambda: _dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=_dt.timezone.utc))
    M.main(TINY)
    first = _written_to(capsys.readouterr().err)
    first_json = (first / "results.json").read_text()
    M.main(TINY)
    second = _written_to(capsys.readouterr().err)
    assert first == (tmp_path / "root" / "cpu-2026-01-02-030405").resolve()
    assert second == first.with_name(first.name + "-2")
    assert (first / "results.json").read_text() == first_json  # the first run is untouched
    assert json.loads((second / "results.json").read_text())["results"]
    # --results-root beats the environment variable.
    M.main(TINY + ["--results-root", str(tmp_path / "other")])
    third = _written_to(capsys.readouterr().err)
    assert third.parent == (tmp_path / "other").resolve()


def test_out_refuses_a_previous_run_without_force(tmp_path, monkeypatch, capsys):
    out = tmp_path / "prev"
    out.mkdir()
    (out / "results.json").write_text("previous")
    (out / "time_forward_old.png").write_text("stale plot")
    (out / "notes.txt").write_text("mine")

    def no_sweep(args):
        raise AssertionError("refused only after the sweep")
    monkeypatch.setattr(M, "run", no_sweep)
    with pytest.raises(SystemExit) as e:
        M.main(TINY + ["--out", str(out)])
    assert e.value.code == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "results.json").read_text() == "previous"
    monkeypatch.undo()
    monkeypatch.setattr(M, "LOAD_SAMPLE_S", 0.02)
    M.main(TINY + ["--out", str(out), "--force"])
    assert _written_to(capsys.readouterr().err) == out.resolve()
    assert json.loads((out / "results.json").read_text())["results"]
    assert not (out / "time_forward_old.png").exists()  # a previous run's plot would mislead
    assert (out / "notes.txt").read_text() == "mine"


def _fake_counters(others_cores):
    """_cpu_counters as if other processes kept ``others_cores`` cores busy all along."""
    def counters():
        t = M.time.monotonic()
        return t, others_cores * t, 0.0
    return counters


def _load_run(tmp_path, capsys):
    M.main(TINY + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    saved = json.loads((tmp_path / "o" / "results.json").read_text())
    md = (tmp_path / "o" / "results.md").read_text()
    return err, saved["machine_load"], md


def test_load_warning_when_the_machine_is_busy(tmp_path, monkeypatch, capsys):
    cores = os.cpu_count()
    monkeypatch.setattr(M, "_cpu_counters", _fake_counters(0.9 * cores))
    err, load, md = _load_run(tmp_path, capsys)
    assert load["loaded"] is True and load["method"] == "cpu_times"
    assert load["before"]["others_busy_cores"] == pytest.approx(0.9 * cores, rel=0.05)
    assert load["during"]["others_busy_cores_mean"] == pytest.approx(0.9 * cores, rel=0.05)
    assert load["warning"].startswith("WARNING: the machine was loaded")
    # At the start (from the sample before the run), and in full at the end.
    assert err.count("WARNING: the machine was loaded") == 2 and load["warning"] in err
    assert md.startswith(f"> **{load['warning']}**")
    assert "Machine load: **LOADED**" in md


def test_no_load_warning_on_a_quiet_machine(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(M, "_cpu_counters", _fake_counters(0.0))
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))  # stale: the previous run's threads
    err, load, md = _load_run(tmp_path, capsys)
    assert load["loaded"] is False and load["warning"] is None
    assert "WARNING" not in err and "WARNING" not in md
    assert md.startswith("Machine load: quiet")


def test_load_warning_falls_back_to_the_load_average(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(M, "_cpu_counters", lambda: None)  # as without psutil
    monkeypatch.setattr(os, "getloadavg", lambda: (os.cpu_count() * 1.0, 1.0, 1.0))
    err, load, md = _load_run(tmp_path, capsys)
    assert load["loaded"] is True and load["method"] == "loadavg"
    assert "1-minute load average" in load["warning"] and load["warning"] in err
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    err, load, md = _load_run(tmp_path / "quiet", capsys)
    assert load["loaded"] is False


def test_load_threshold_boundary():
    before = dict(loadavg=None, others_busy_cores=0.5)
    assert not M.assess_load(before, None, None, threshold=0.25, cores=2)["loaded"]  # = limit
    assert M.assess_load(dict(before, others_busy_cores=0.51), None, None, 0.25, 2)["loaded"]
    during = dict(others_busy_cores_mean=0.1, others_busy_cores_max=1.5, window_s=5.0, windows=3)
    load = M.assess_load(before, during, dict(others_busy_cores=0.0), 0.25, 2)
    assert load["loaded"] and "window" in load["warning"]  # a compile during part of the run


def test_progress_names_the_cell_before_it_runs(tmp_path, monkeypatch, capsys):
    real_call, real_make = M._call, M.make_data

    def call(provider, mode, data, strategy):
        x, _, r, _ = data
        m = f"M={x.shape[0]} (self)" if r is None else f"M={r.shape[0]}"
        print(f"RUN {provider.name}: {mode} {strategy} N={x.shape[0]} {m} D={x.shape[1]} fp32",
              file=sys.stderr)
        return real_call(provider, mode, data, strategy)

    def make(n, m, d, *a, **k):
        print(f"DRAW N={n} D={d}", file=sys.stderr)
        return real_make(n, m, d, *a, **k)
    monkeypatch.setattr(M, "_call", call)
    monkeypatch.setattr(M, "make_data", make)
    M.main(["--device", "cpu", "--n", "64", "96", "--d", "8", "--providers", "torch", "--repeats", "1",
            "--warmup", "0", "--memory", "subprocess", "--no-plots", "--out", str(tmp_path / "o")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    label = None
    runs = 0
    for ln in err:  # stderr is not a terminal here: one "[done/total] label" line per label
        if ln.startswith("["):
            label = ln.split("] ", 1)[1]
        elif ln.startswith("RUN "):
            assert label == "time " + ln[4:], (label, ln)
            runs += 1
        elif ln.startswith("DRAW "):
            n, d = ln.split()[1:]
            assert label.startswith("drawing data: ") and f" {n} " in label and f" {d} " in label, label
    assert runs == 2
    # The memory pass runs in a spawned child; each of its cells is named too, in order.
    labels = [ln.split("] ", 1)[1] for ln in err if ln.startswith("[")]
    mem = [lab for lab in labels if lab.startswith("memory ")]
    assert mem == ["memory fastmine torch: starting a fresh process",
                   "memory fastmine torch: forward easy/hard N=64 M=64 (self) D=8 fp32",
                   "memory fastmine torch: forward easy/hard N=96 M=96 (self) D=8 fp32"]
    assert labels[-1] == "done"


def test_progress_falls_back_to_lines_without_a_terminal_width():
    import io

    class ZeroWidthTTY(io.StringIO):
        def isatty(self):
            return True  # but fileno() fails: no width, tqdm would draw nothing at all
    stream = ZeroWidthTTY()
    bar = M.Progress(3, True, stream)
    bar.cell("time fastmine cpu: forward easy/hard N=64 M=64 (self) D=8 fp32")
    bar.update()
    bar.close()
    assert stream.getvalue().splitlines() == [
        "[0/3] time fastmine cpu: forward easy/hard N=64 M=64 (self) D=8 fp32", "[1/3] done"]


def test_memory_child_announces_each_cell_before_running_it(tmp_path, monkeypatch):
    events = []

    class Announce:
        def put(self, key):
            events.append(("announce", key))
    real_make = M.make_data

    def make(n, *a, **k):
        events.append(("draw", n))
        return real_make(n, *a, **k)

    def measure(setup, fn):
        events.append(("measure",))
        return 0, "fake"
    monkeypatch.setattr(M, "make_data", make)
    monkeypatch.setattr(M, "measure_cpu_peak", measure)
    cells = [dict(key=i, n=n, m=None, d=8, dtype="fp32", mode="forward", strategy="easy/hard", seed=1)
             for i, n in enumerate((64, 96))]
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    try:  # in this process, so that the order is observable
        M._memory_worker("fastmine torch", cells, dict(threads=threads, spc=8), str(tmp_path / "m.json"),
                         Announce())
    finally:
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)
    assert events == [("announce", 0), ("draw", 64), ("measure",),
                      ("announce", 1), ("draw", 96), ("measure",)]


_COMMITTED = sorted((Path(M.REPO) / "benchmarks" / "results").glob("**/results.json"))


@pytest.mark.parametrize("path", _COMMITTED, ids=lambda p: p.parent.name)
def test_report_regenerates_committed_results(path):
    """Results written before machine_load existed still give exactly their committed Markdown."""
    md = path.parent / "results.md"
    if not md.exists():
        pytest.skip("no results.md next to it")
    result = json.loads(path.read_text())
    report.add_derived(result["results"])
    assert report.markdown(result) == md.read_text()


def test_call_overhead_benchmark_runs():
    """benchmarks/call_overhead.py (the one-op-per-device targets): timing cells run
    and report every figure (the memory cells are the same calls on a big bank)."""
    from benchmarks import call_overhead

    rows = call_overhead.timing_cells(repeats=3, warmup=1)
    assert [(r["n"], r["d"]) for r in rows] == [(16, 64), (128, 64), (512, 128), (2048, 128)]
    for r in rows:
        assert all(r[k] > 0 for k in ("raw_op_us", "mine_us", "mine_fwd_bwd_us", "loss_fwd_bwd_us",
                                      "pml_fwd_bwd_us"))


def test_call_overhead_markdown_gpu_rows():
    """The GPU table of benchmarks/call_overhead.py (its cells need a GPU): every
    row's figures, and a step that could not be captured in a CUDA graph shows the
    capture's error instead of a time."""
    from benchmarks import call_overhead

    env = dict(date_utc="2026-12-03T00:00:00+00:00", device="cuda", gpu="NVIDIA H200",
               driver="580.159.04", cuda="13.0", triton="3.6.0", torch="2.11.0+cu130",
               fastmine_git="abc")
    row = dict(backend="triton", n=256, d=128, dtype="float32", mine_us=20.5, mine_fwd_bwd_us=41.0,
               plain_fwd_bwd_us=30.25, loss_fwd_bwd_us=45.0, graph_fwd_bwd_us=12.5, graph_error=None,
               pml_fwd_bwd_us=900.0, pml_over_loss=20.0)
    bad = dict(row, backend="cuda", graph_fwd_bwd_us=None,
               graph_error="RuntimeError: operation not permitted when stream is capturing")
    md = call_overhead.markdown(dict(environment=env, load_before=[0.1], load_after=[0.2],
                                     timing=[row, bad], memory=[]))
    assert "GPU: NVIDIA H200 (driver 580.159.04, CUDA 13.0), triton 3.6.0" in md
    assert "| triton | 256 | 128 | float32 | 20.5 | 41.0 | 30.2 | 45.0 | 12.5 | 900.0 | 20.0 |" in md
    assert "| cuda | 256 | 128 | float32 | 20.5 | 41.0 | 30.2 | 45.0 | not capturable: " \
           "RuntimeError: operation not permitted when stream is capturing | 900.0 | 20.0 |" in md


def test_topk_benchmark_runs(tmp_path):
    """benchmarks.topk (issue #17's table) at a tiny size: every row timed, ratios
    against the floor, mine k=1 and PML's DistanceWeightedMiner of the same cell,
    the distance-weighted and PML rows' peak memory from fresh processes."""
    from benchmarks import topk as T
    from fastmine import _backends
    result = T.main(["--device", "cpu", "--n", "96", "--d", "16", "--repeats", "1",
                     "--warmup", "0", "--out", str(tmp_path / "topk")])
    rows = {(r["row"], r["backend"]): r for r in result["results"]}
    has_kernel = {"topk", "distance_weighted"} <= _backends.get("cpu").rules
    want = {("floor", ""), (T.PML_DW, "")}
    if has_kernel:
        want |= {("mine k=1", "cpu"), ("distance_weighted k=1", "cpu"),
                 (f"distance_weighted k={T.DW_K}", "cpu")}
        want |= {(f"mine_topk k={k}", "cpu") for k in T.KS}
    else:
        assert "cpu" in result["missing"]
    assert set(rows) == want
    for r in rows.values():
        assert r["time_s"] > 0 and r["t_over_floor"] == pytest.approx(
            r["time_s"] / rows[("floor", "")]["time_s"])
    pml = rows[(T.PML_DW, "")]
    assert pml["peak_mem_bytes"] is not None and pml["peak_mem_bytes"] > 0
    if has_kernel:
        dw = rows[("distance_weighted k=1", "cpu")]
        assert dw["t_over_mine"] == pytest.approx(dw["time_s"] / rows[("mine k=1", "cpu")]["time_s"])
        assert dw["pml_over_t"] == pytest.approx(pml["time_s"] / dw["time_s"])
        assert dw["peak_mem_bytes"] is not None
    table = (tmp_path / "topk" / "table.md").read_text()
    assert T.PML_DW in table and "x mine" in table


def test_contrastive_benchmark_runs(tmp_path):
    """benchmarks.contrastive (issue #18's table) at tiny sizes: the floor and every
    loss timed (fastmine's cpu backend and PML), ratios against the floor and PML of
    the same cell, the memory and large-N rows measured in fresh processes; a memory
    cap below PML's estimate reports PML "OOM (needs est. ...)" without running it."""
    from benchmarks import contrastive as T
    from fastmine import contrastive as FC
    result = T.main(["--device", "cpu", "--n", "64", "--d", "8", "--repeats", "1",
                     "--warmup", "0", "--mem-n", "96", "--large-n", "128",
                     "--out", str(tmp_path / "c")])
    has_cpu = FC._CPU_OPS
    rows = {(r["part"], T._name(r), r["backend"]): r for r in result["results"]}
    want = {("time", T.FLOOR, "")} | {("time", f"pml {T.PML_NAMES[x]}", "") for x in T.LOSSES}
    want |= {("memory", "pml SupConLoss", ""), ("large", "pml SupConLoss", "")}
    if has_cpu:
        want |= {("time", f"fastmine {x}", "cpu") for x in T.LOSSES}
        want |= {("memory", "fastmine supcon", "cpu"), ("large", "fastmine supcon", "cpu")}
    else:
        assert "cpu" in result["missing"]
    assert set(rows) == want
    floor = rows[("time", T.FLOOR, "")]
    for r in rows.values():
        assert r["status"] == "ok", r
        if r["part"] == "time":
            assert r["time_s"] > 0
        else:
            assert r["peak_mem_bytes"] is not None and r["peak_mem_bytes"] > 0, r
    for x in T.LOSSES if has_cpu else ():
        r, pml = rows[("time", f"fastmine {x}", "cpu")], rows[("time", f"pml {T.PML_NAMES[x]}", "")]
        assert r["t_over_floor"] == pytest.approx(r["time_s"] / floor["time_s"])
        assert r["pml_over_t"] == pytest.approx(pml["time_s"] / r["time_s"])
    if has_cpu:
        m, pm = rows[("memory", "fastmine supcon", "cpu")], rows[("memory", "pml SupConLoss", "")]
        assert m["pml_mem_over_mem"] == pytest.approx(pm["peak_mem_bytes"] / m["peak_mem_bytes"])
        assert len(result["targets"]) == 5 and all(t["met"] in (True, False)
                                                   for t in result["targets"])
    table = (tmp_path / "c" / "table.md").read_text()
    assert "pml NTXentLoss" in table and "Issue #18's targets" in table
    # the cap: PML's estimate exceeds it, so PML is not started; fastmine runs
    capped = T.main(["--device", "cpu", "--n", "64", "--d", "8", "--repeats", "1", "--warmup",
                     "0", "--losses", "ntxent", "--mem-n", "0", "--large-n", "0",
                     "--mem-cap-gb", "1e-6", "--out", str(tmp_path / "capped")])
    (pml,) = [r for r in capped["results"] if r["row"] == T.PML]
    assert pml["status"].startswith("OOM (needs est. ") and pml["time_s"] is None
    assert pml["est_mem_bytes"] > 1e-6 * 2**30


def test_one_default_memory_cap(monkeypatch):
    # Both benchmarks take --mem-cap-gb's default from M.default_mem_cap_gb; an
    # explicit value is kept as given.
    from benchmarks import contrastive as C
    rule = M.default_mem_cap_gb
    monkeypatch.setattr(M, "default_mem_cap_gb", lambda device: 12.5)
    assert M.parse_args(["--device", "cpu"]).mem_cap_gb == 12.5
    assert C.parse_args(["--device", "cpu"]).mem_cap_gb == 12.5
    assert C.parse_args(["--device", "cpu", "--mem-cap-gb", "3"]).mem_cap_gb == 3.0
    # The rule on CPU: min(50 % of the RAM, 75 % of the available RAM).
    psutil = pytest.importorskip("psutil")

    class VM:
        total, available = 64 * 2**30, 20 * 2**30
    monkeypatch.setattr(psutil, "virtual_memory", lambda: VM)
    assert rule(torch.device("cpu")) == 15.0
    VM.available = 60 * 2**30
    assert rule(torch.device("cpu")) == 32.0
