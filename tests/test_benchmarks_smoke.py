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
