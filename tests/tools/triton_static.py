"""Compile fastmine's Triton kernels for a GPU without a GPU, and report their resources.

    python tests/tools/triton_static.py                # every forward config x dot path, sm_90
    python tests/tools/triton_static.py --arch 80 90 --all-kernels --check

Triton lowers a kernel to PTX and cubin for any target with its bundled
ptxas; no device is needed.  For each variant this prints the registers per
thread, spill bytes and shared memory (from ``ptxas -v``) and whether the
tensor-core instructions are used (wgmma on sm_90, mma on sm_80).  ``--check``
exits non-zero if any variant fails to compile, or if a forward config listed
for a dot path (fastmine/_triton.py: _FWD_CONFIG_PATHS) spills or exceeds the
architecture's shared memory — the static half of tuning: a CI gate, run by
tests/test_triton.py; the timing half needs a GPU (benchmarks/mine.py).

Run it without TRITON_INTERPRET (the kernels must be real JIT functions).
Launch-time specialisation is mimicked: unit strides along D are constants
and pointers / row strides are 16-aligned, as for contiguous inputs with D a
multiple of 8.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_static: unset TRITON_INTERPRET (it compiles real kernels)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastmine import _triton as ft  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
# Opt-in dynamic shared memory per block (bytes): A100 (sm_80), H100 (sm_90).
SMEM_LIMIT = {80: 166912, 90: 232448}
_TT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
       torch.float64: "fp64", torch.int64: "i64", torch.int32: "i32"}
PATH_DTYPE = {"tc16": (torch.float16, "ieee"), "tf32": (torch.float32, "tf32"),
              "fma32": (torch.float32, "ieee"), "fma64": (torch.float64, "ieee")}


def _ptr(dtype: torch.dtype) -> str:
    return "*" + _TT[dtype]


def compile_kernel(fn, types: Dict[str, str], constexprs: Dict[str, object], arch: int,
                   num_warps: int = 4, num_stages: int = 3) -> dict:
    """Compile ``fn`` for sm_<arch>; returns resources parsed from ``ptxas -v``.

    types: Triton type of every runtime argument ("*fp16", "i32", ...);
    constexprs: value of every constexpr argument (and of arguments fixed to a
    constant, such as unit strides).
    """
    jit = fn
    sig = {name: ("constexpr" if name in constexprs else types[name]) for name in jit.arg_names}
    aligned = [(i,) for i, name in enumerate(jit.arg_names)
               if name not in constexprs and (sig[name].startswith("*") or name.startswith("stride"))]
    attrs = {key: [["tt.divisibility", 16]] for key in aligned}
    src = ASTSource(jit, sig, constexprs, attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = kernel.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        report = subprocess.run([PTXAS, f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}", "-v",
                                 "-o", os.devnull, f.name], capture_output=True, text=True).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return {"regs": int(regs.group(1)) if regs else -1,
            "spill": int(spills.group(1)) if spills else -1,
            "smem": int(kernel.metadata.shared),
            "tensor_cores": ("wgmma" in ptx) if arch >= 90 else (" mma." in ptx or "mma.sync" in ptx)}


def forward_variant(path: str, key: tuple, arch: int, pass_: int = ft.FUSED,
                    distance: int = 1, has_ids: bool = True, nearest: bool = True) -> dict:
    """Compile one forward variant; distance is a contract code (1 Gram, 2 cosine);
    nearest=False compiles the farthest-positive / farthest-negative selection."""
    dtype, precision = PATH_DTYPE[path]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    bm, bn, bk, warps, stages = key
    types = dict(X=_ptr(dtype), R=_ptr(dtype), XT=_ptr(acc), RT=_ptr(acc), QL="*i64", RL="*i64",
                 QID="*i64", RID="*i64", LO=_ptr(acc), HI=_ptr(acc), POS_KEY=_ptr(acc),
                 POS_IDX="*i64", NEG_KEY=_ptr(acc), NEG_IDX="*i64", N="i32", M="i32", D="i32",
                 SPLITS="i32", stride_xn="i32", stride_rm="i32")
    const = dict(stride_xd=1, stride_rd=1, PASS=pass_, DISTANCE=distance, HAS_IDS=has_ids,
                 POS_NEAREST=nearest, NEG_NEAREST=nearest, DOT_PRECISION=precision, UPCAST=False,
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return compile_kernel(ft._mine_fwd_kernel, types, const, arch, warps, stages)


def other_variants() -> List[tuple]:
    """(name, kernel, types, constexprs) for every other kernel, per input dtype."""
    out = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        x, a, dn = _ptr(dtype), _ptr(acc), _TT[dtype]
        rows = dict(stride_xd=1, stride_rd=1)
        out.append((f"_row_sumsq_kernel {dn}", ft._row_sumsq_kernel,
                    dict(X=x, OUT=a, N="i32", D="i32", stride_n="i32"),
                    dict(stride_d=1, BLOCK_R=32, BLOCK_K=64)))
        for dist in (0, 1, 2):
            out.append((f"_pair_distance_kernel {dn} d{dist}", ft._pair_distance_kernel,
                        dict(X=x, R=x, IDX="*i64", OUT=a, N="i32", D="i32", stride_xn="i32",
                             stride_rm="i32"),
                        dict(rows, DISTANCE=dist, BLOCK_R=16, BLOCK_K=ft.bwd_block_k(dtype, 512))))
            for atomic in (True, False):
                out.append((f"_pair_grad_kernel {dn} d{dist} {'atomic' if atomic else 'sorted'}",
                            ft._pair_grad_kernel,
                            dict(X=x, R=x, POS_IDX="*i64", NEG_IDX="*i64", G_POS=a, G_NEG=a,
                                 GRAD_X=a, GRAD_R=a, COEF=a, N="i32", D="i32", stride_xn="i32",
                                 stride_rm="i32"),
                            dict(rows, DISTANCE=dist, ATOMIC=atomic, BLOCK_R=16,
                                 BLOCK_K=ft.bwd_block_k(dtype, 512))))
        out.append((f"_scatter_sorted_kernel {dn}", ft._scatter_sorted_kernel,
                    dict(X=x, R=x, GRAD_R=a, COEF=a, ORDER="*i64", OFFSETS="*i64", N="i32",
                         D="i32", stride_xn="i32", stride_rm="i32"),
                    dict(rows, BLOCK_D=128)))
        if dtype in (torch.float32, torch.float64):
            out.append((f"_merge_splits_kernel {dn}", ft._merge_splits_kernel,
                        dict(KEY=a, IDX="*i64", OUT_KEY=a, OUT_IDX="*i64", N="i32", SPLITS="i32"),
                        dict(BLOCK=256)))
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(SMEM_LIMIT))
    ap.add_argument("--paths", nargs="+", default=list(PATH_DTYPE), choices=list(PATH_DTYPE))
    ap.add_argument("--all-passes", action="store_true",
                    help="also the semi-hard passes, cosine, no ids and farthest picks, on each "
                         "path's first config (default: the fused Gram pass with ids)")
    ap.add_argument("--all-kernels", action="store_true", help="also every non-forward kernel")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 on a compile error, a spill or too much shared memory")
    args = ap.parse_args(argv)

    failures = []
    first_config = {p: next(k for k, ps in ft._FWD_CONFIG_PATHS.items() if p in ps)
                    for p in PATH_DTYPE}
    print(f"{'arch':>4} {'kernel / path':<44} {'config (BM,BN,BK,warps,stages)':<32} "
          f"{'regs':>5} {'spill':>6} {'smem':>7} tc")
    for arch in args.arch:
        for path in args.paths:
            for key, paths in ft._FWD_CONFIG_PATHS.items():
                if path not in paths:
                    continue
                variants = [(ft.FUSED, 1, True, True)]
                if args.all_passes and key == first_config[path]:
                    variants += [(ft.POS_ONLY, 1, True, True), (ft.NEG_WINDOW, 1, True, True),
                                 (ft.FUSED, 2, True, True), (ft.NEG_WINDOW, 2, False, True),
                                 (ft.FUSED, 1, True, False), (ft.POS_ONLY, 2, False, False)]
                for pass_, dist, ids, near in variants:
                    name = (f"_mine_fwd_kernel {path} pass{pass_} d{dist}"
                            f"{'' if ids else ' no-ids'}{'' if near else ' far'}")
                    try:
                        r = forward_variant(path, key, arch, pass_, dist, ids, near)
                    except Exception as exc:  # report every failure, not only the first
                        failures.append(f"sm_{arch} {name} {key}: {type(exc).__name__}: {exc}")
                        print(f"{arch:>4} {name:<44} {str(key):<32} COMPILE ERROR")
                        continue
                    print(f"{arch:>4} {name:<44} {str(key):<32} {r['regs']:>5} {r['spill']:>6} "
                          f"{r['smem']:>7} {'y' if r['tensor_cores'] else '-'}", flush=True)
                    # The register/spill survey behind _FWD_CONFIG_PATHS is for sm_90.
                    if arch == 90 and r["spill"] != 0:
                        failures.append(f"sm_{arch} {name} {key}: spills {r['spill']} bytes")
                    if r["smem"] > SMEM_LIMIT[arch]:
                        failures.append(f"sm_{arch} {name} {key}: {r['smem']} B shared memory")
                    if path in ("tc16", "tf32") and key[2] >= 32 and not r["tensor_cores"]:
                        failures.append(f"sm_{arch} {name} {key}: no tensor-core instructions")
        for name, kernel, types, const in (other_variants() if args.all_kernels else []):
            try:
                r = compile_kernel(kernel, types, const, arch)
            except Exception as exc:
                failures.append(f"sm_{arch} {name}: {type(exc).__name__}: {exc}")
                print(f"{arch:>4} {name:<44} {'':<32} COMPILE ERROR")
                continue
            print(f"{arch:>4} {name:<44} {'':<32} {r['regs']:>5} {r['spill']:>6} "
                  f"{r['smem']:>7}", flush=True)
    for f in failures:
        print("FAIL", f)
    return 1 if (args.check and failures) else 0


if __name__ == "__main__":
    sys.exit(main())
