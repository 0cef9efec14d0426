"""Every forward tile config of the Triton mining kernel, timed one by one (issue #13, item 3).

    python -m benchmarks.triton_tune --out DIR       # GPU: N = M = 8192, D 128 / 512, bf16 tf32 fp32

The autotuner (fastmine/_triton.py, ``_mine_fwd_tuned``) times only the
configs that ``prune_fwd_configs`` keeps for a launch's dot path and keeps the
fastest; tuning the list itself (``_FWD_CONFIG_PATHS``) needs every config's
time.  For each (dtype, D) cell this times the fused easy/hard selection
(``fastmine._triton.select`` with ``config=``: the tile, warps and stages of one
entry, bypassing the autotuner) for every config listed for the cell's dot
path -- also those the prune drops, marked ``pruned`` -- then the autotuned
call, and names the config the autotuner picked.  Same random data for every
config of a cell; the median of --repeats calls after --warmup, CUDA events.
Writes tune.json and tune.md into --out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, List, Optional

import torch

from benchmarks.mine import DTYPES, cuda_median_ms, environment

SELECT_ARGS = ("easy", "hard", "squared_euclidean", None)  # pos, neg, distance, margin


def config_dict(key: tuple) -> dict:
    """A _FWD_CONFIG_PATHS key (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) as the
    ``config`` argument of ``fastmine._triton.select``."""
    bm, bn, bk, warps, stages = key
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)


def tune_cell(n: int, d: int, dt: str, device: torch.device, repeats: int, warmup: int,
              timer: Optional[Callable] = None, seed: int = 0) -> List[dict]:
    """The rows of one (N, D, dtype) cell: one per config of its dot path, then
    the autotuned call (``config`` None).  ``timer(fn, repeats, warmup)`` returns
    milliseconds (default: CUDA events)."""
    from fastmine import _triton as ft
    timer = timer or cuda_median_ms
    dtype, precision = DTYPES[dt]
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision or "highest")
    try:
        g = torch.Generator(device=device).manual_seed(seed + n + d)
        x = torch.randn(n, d, generator=g, device=device).to(dtype)
        y = torch.randint(0, max(2, n // 8), (n,), generator=g, device=device)
        dot = ft._dot_precision(dtype)
        path = ft.dot_path(dtype, dot)
        kept = {ft._config_key(c) for c in
                ft.prune_fwd_configs(ft._fwd_configs(), dict(X=x, D=d), DOT_PRECISION=dot)}
        rows = []
        for key, paths in ft._FWD_CONFIG_PATHS.items():
            if path not in paths:
                continue
            row = dict(n=n, d=d, dtype=dt, path=path, config=list(key), pruned=key not in kept)
            try:
                cfg = config_dict(key)
                row["ms"] = timer(lambda: ft.select(x, y, x, y, None, None, *SELECT_ARGS, config=cfg),
                                  repeats, warmup)
            except Exception as e:  # noqa: BLE001 - a config that fails to launch is a result
                row["ms"], row["error"] = None, f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
        before = dict(ft._mine_fwd_tuned.cache)
        auto = dict(n=n, d=d, dtype=dt, path=path, config="autotuned", pruned=False)
        auto["ms"] = timer(lambda: ft.select(x, y, x, y, None, None, *SELECT_ARGS), repeats, warmup)
        new = [c for k, c in ft._mine_fwd_tuned.cache.items() if k not in before]
        auto["picked"] = list(ft._config_key(new[0])) if new else None
        rows.append(auto)
        best = min((r["ms"] for r in rows if r.get("ms") is not None), default=None)
        for r in rows:
            r["over_best"] = None if r.get("ms") is None or not best else r["ms"] / best
        return rows
    finally:
        torch.set_float32_matmul_precision(prev)


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Triton forward configs, one by one ({env['date_utc']})", "",
             f"{env.get('gpu', env['device'])}, torch {env['torch']}, triton {env['triton']}, fastmine "
             f"{env['fastmine_git']}; fused easy/hard selection, N = M, squared Euclidean; median "
             f"of {result['repeats']} calls", "",
             "| dtype | D | path | config (BM, BN, BK, warps, stages) | pruned | ms | × best |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cfg = r["config"] if r["config"] == "autotuned" else "×".join(map(str, r["config"]))
        if r["config"] == "autotuned":
            cfg += f" (picked {'×'.join(map(str, r['picked'])) if r.get('picked') else '?'})"
        ms = f"{r['ms']:.3f}" if r.get("ms") is not None else "error: " + r.get("error", "")[:80]
        over = f"{r['over_best']:.2f}" if r.get("over_best") is not None else "–"
        lines.append(f"| {r['dtype']} | {r['d']} | {r['path']} | {cfg} | "
                     f"{'yes' if r['pruned'] else ''} | {ms} | {over} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192, help="N = M (default %(default)s)")
    ap.add_argument("--d", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16", "tf32", "fp32"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", required=True)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda")
    rows = []
    for dt in args.dtype:
        for d in args.d:
            cell = tune_cell(args.n, d, dt, device, args.repeats, args.warmup)
            rows += cell
            timed = [r for r in cell[:-1] if r.get("ms") is not None]
            best = min(timed, key=lambda r: r["ms"]) if timed else None
            print(f"{dt} D={d}: autotuned {cell[-1]['ms']:.3f} ms (picked {cell[-1].get('picked')}); "
                  f"best {best['config'] if best else None} {best['ms'] if best else float('nan'):.3f} ms",
                  flush=True)
    result = dict(environment=environment(device), repeats=args.repeats, rows=rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "tune.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
