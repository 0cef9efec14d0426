"""Turn a ``benchmarks.mine`` results JSON into Markdown (and plots).

    python -m benchmarks.report benchmarks/results/cpu-2026-11-23/results.json > table.md
    python -m benchmarks.report RESULTS.json --plots OUTDIR

The README's performance section is generated with this from committed
results; never edit those numbers by hand.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

FLOOR = "matmul (blocked floor)"
PML = "pml BatchEasyHardMiner"


def _size_key(r: dict) -> tuple:
    return (r["n"], r["m"], r["self_refs"], r["d"], r["dtype"])


def add_derived(rows: List[dict]) -> None:
    """Fill tflops, t_over_floor and pml_over_t in place.

    tflops = 2 N M D / t; t_over_floor = t / t(floor, same size & dtype,
    forward) (both None in backward mode); pml_over_t = t(PML BatchEasyHardMiner, same cell) / t.
    """
    floor: Dict[tuple, float] = {}
    pml: Dict[tuple, float] = {}
    for r in rows:
        if r.get("time_s") is None:
            continue
        if r["provider"] == FLOOR:
            floor.setdefault(_size_key(r), r["time_s"])
        elif r["provider"] == PML:
            pml[_size_key(r) + (r["strategy"], r["mode"])] = r["time_s"]
    for r in rows:
        t = r.get("time_s")
        # The backward alone does no N x M work: a rate or a floor ratio would mislead.
        gram = r["mode"] != "backward"
        r["tflops"] = 2.0 * r["n"] * r["m"] * r["d"] / t / 1e12 if (t and gram) else None
        f = floor.get(_size_key(r)) if gram else None
        r["t_over_floor"] = t / f if (t and f) else None
        p = pml.get(_size_key(r) + (r["strategy"], r["mode"]))
        r["pml_over_t"] = p / t if (t and p) else None


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def _mem(r: dict) -> str:
    b = r.get("peak_mem_bytes")
    if b is None:
        meth = r.get("mem_method") or ""
        return meth if meth.startswith(("OOM", "process died")) else ""
    return f"{b / 2**20:.1f}"


def _load_line(load: dict) -> str:
    """One line summarising machine_load (results written before it existed have none)."""
    def cores(v):
        return "?" if v is None else f"{v:.2f}"
    before, during, after = load.get("before") or {}, load.get("during") or {}, load.get("after") or {}
    la = before.get("loadavg")
    return (f"Machine load: {'**LOADED**' if load.get('loaded') else 'quiet'} (threshold "
            f"{cores(load.get('threshold_cores'))} of {load.get('cpu_count')} cores); other processes' busy "
            f"cores {cores(before.get('others_busy_cores'))} before, "
            f"{cores(during.get('others_busy_cores_mean'))} mean / "
            f"{cores(during.get('others_busy_cores_max'))} max during, "
            f"{cores(after.get('others_busy_cores'))} after"
            + (f"; 1-min load average {la[0]:.2f} before" if la else "") + "  ")


def markdown(result: dict) -> str:
    """Machine-load warning (if any), environment summary, one table row per (cell, provider)."""
    env = result["environment"]
    hw = env.get("gpu") or env.get("cpu")
    load = result.get("machine_load")
    lines = []
    if load and load.get("loaded"):
        lines += [f"> **{load.get('warning') or 'WARNING: the machine was loaded during this run.'}**", ""]
    if load:
        lines.append(_load_line(load))
    lines += [
        f"**{hw}** ({env['device']}, {env.get('torch_threads')} torch threads"
        + (f", driver {env['driver']}" if env.get("driver") else "") + ")  ",
        f"torch {env['torch']}, triton {env.get('triton')}, numpy {env.get('numpy')}, "
        f"PML {env.get('pytorch_metric_learning')}, fastmine {env.get('fastmine')} "
        f"({env.get('fastmine_git')}), {env['date_utc']}"
        + (f", load average {env['loadavg'][0]:.1f}" if env.get("loadavg") else ""),
        "",
        "| provider | mode | strategy | dtype | N | M | D | time (ms) | TFLOP/s | t/floor | PML/t "
        "| peak mem (MiB) | status |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    rows = sorted(result["results"], key=lambda r: (
        r["mode"], r["strategy"], r["dtype"], r["d"], not r["self_refs"], r["n"], r["m"], r["provider"]))
    for r in rows:
        m = r["m"] if not r["self_refs"] else f"{r['m']} (self)"
        lines.append(
            f"| {r['provider']} | {r['mode']} | {r['strategy']} | {r['dtype']} | {r['n']} | {m} | "
            f"{r['d']} | {_fmt(r['time_s'] and r['time_s'] * 1e3, '.2f')} | {_fmt(r.get('tflops'), '.3f')} | "
            f"{_fmt(r.get('t_over_floor'), '.2f')} | {_fmt(r.get('pml_over_t'), '.2f')} | {_mem(r)} | "
            f"{r['status']} |")
    missing = result.get("missing_providers") or {}
    if missing:
        lines += ["", "Not run: " + "; ".join(f"{k} ({v})" for k, v in sorted(missing.items()))]
    lines += ["", "time: median of the timed repeats; TFLOP/s = 2·N·M·D/t; t/floor: time over the "
              "blocked X@R.T matmul (same size and dtype); PML/t: speed-up over PML "
              "BatchEasyHardMiner in the same cell; peak mem: extra memory of one call above the "
              f"inputs ({result['config'].get('memory')})."]
    return "\n".join(lines) + "\n"


def plots(result: dict, out: Path) -> List[Path]:
    """time-vs-size and memory-vs-size log-log PNGs, one pair per (mode, strategy, dtype, D, kind)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = Path(out)
    groups: Dict[tuple, List[dict]] = {}
    for r in result["results"]:
        groups.setdefault((r["mode"], r["strategy"], r["dtype"], r["d"], r["self_refs"]), []).append(r)
    written = []
    for (mode, strategy, dtype, d, self_refs), rows in sorted(groups.items()):
        axis = "n" if self_refs else "m"
        for metric, label, scale in (("time_s", "time (s)", 1.0), ("peak_mem_bytes", "peak extra memory (MiB)", 2**-20)):
            fig, ax = plt.subplots(figsize=(6, 4))
            plotted = False
            for prov in sorted({r["provider"] for r in rows}):
                pts = sorted((r[axis], r[metric] * scale) for r in rows
                             if r["provider"] == prov and r.get(metric) and r[metric] > 0)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=prov)
                    plotted = True
            if not plotted:
                plt.close(fig)
                continue
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (batch = references)" if self_refs else "M (memory bank rows)")
            ax.set_ylabel(label)
            ax.set_title(f"{mode}, {strategy}, {dtype}, D={d}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            kind = "self" if self_refs else "bank"
            name = f"{'time' if metric == 'time_s' else 'memory'}_{mode.replace('+', '_')}_" \
                   f"{strategy.replace('/', '-')}_{dtype}_d{d}_{kind}.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            written.append(out / name)
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    ap.add_argument("json", help="results.json written by python -m benchmarks.mine")
    ap.add_argument("--plots", metavar="DIR", help="also write the PNG plots to DIR")
    args = ap.parse_args(argv)
    result = json.loads(Path(args.json).read_text())
    add_derived(result["results"])
    sys.stdout.write(markdown(result))
    if args.plots:
        Path(args.plots).mkdir(parents=True, exist_ok=True)
        plots(result, Path(args.plots))


if __name__ == "__main__":
    main()
