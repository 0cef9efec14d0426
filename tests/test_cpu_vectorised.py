"""The CPU kernels' selection loops are vectorised in every ISA clone.

The hot loops (``scan_block``, ``scan_block_band`` of csrc/cpu/mine_cpu.cpp and
``scan_tile_topk`` of csrc/cpu/mine_topk_cpu.cpp) are compiled once per ISA by
GCC's ``target_clones`` (csrc/cpu/cpu_clones.h).  GCC vectorises them only when it
can if-convert the masked key arithmetic; on AVX2 (no mask registers) that needs
``-fno-trapping-math`` (fastmine/_build_manifest.json, "about").  Without it the
avx2 clone of every such loop was scalar code -- correct, so no other test notices,
but 2-3x slower on AVX2-only CPUs (issue #16).  This test reads the machine code of
the loaded extension: every avx2 clone of these loops must use 256-bit registers
(ymm), every avx512f clone 512-bit ones (zmm).
"""
import importlib.util
import re
import shutil
import subprocess
from collections import defaultdict

import pytest

import fastmine

LOOPS = ("scan_block", "scan_block_band", "scan_tile_topk")
# The register each clone's vector code must use.
CLONE_REGISTER = {"avx2": "ymm", "avx512f": "zmm"}


def _extension_path():
    spec = importlib.util.find_spec("fastmine._C")
    return spec.origin if spec is not None else None


def _clone_registers(path):
    """{(loop, clone): set of vector register kinds used} over every instantiation."""
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", path],
                         check=True, capture_output=True, text=True).stdout
    header = re.compile(r"^[0-9a-f]+ <(.*)>:$")
    name_re = re.compile(r"::(%s)<.*\[clone \.(\w+)\]$" % "|".join(LOOPS))
    per_function = []  # [(loop, clone, registers used)]
    current = None
    for line in asm.splitlines():
        m = header.match(line)
        if m:
            n = name_re.search(m.group(1))
            current = (n.group(1), n.group(2), set()) if n else None
            if current:
                per_function.append(current)
        elif current is not None:
            for reg in ("ymm", "zmm"):
                if reg in line:
                    current[2].add(reg)
    return per_function


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed")
def test_every_isa_clone_of_the_selection_loops_is_vectorised():
    path = _extension_path()
    if path is None:
        pytest.skip("compiled extension not built")
    info = fastmine.build_info()  # "...; cpu_clones=avx512f,avx2,default (runs ...); ..."
    clones = re.search(r"cpu_clones=([\w,]+)", info)
    if clones is None or "avx2" not in clones.group(1).split(","):
        pytest.skip(f"no ISA clones in this build ({info})")
    functions = _clone_registers(path)
    seen = defaultdict(int)
    scalar = []
    for loop, clone, regs in functions:
        want = CLONE_REGISTER.get(clone)
        if want is None:  # default (SSE2) and the resolver
            continue
        seen[(loop, clone)] += 1
        if want not in regs:
            scalar.append(f"{loop} [clone .{clone}]")
    # Every loop has clones for avx2 (and avx512f unless the measurement build
    # FASTMINE_CPU_NO_AVX512 left it out), several instantiations each.
    for loop in LOOPS:
        assert seen[(loop, "avx2")] > 0, f"no avx2 clone of {loop} found in {path}"
    assert not scalar, f"{len(scalar)} ISA clones without vector code: {sorted(set(scalar))}"
