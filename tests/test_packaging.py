"""Packaging: the compiled extension is bound to the torch it was built with.

setup.py records that torch (fastmine/_build_config.py, next to the extension)
and pins a built wheel's metadata to its X.Y; fastmine/_extension.py refuses
to load an extension built against another torch X.Y, and backend="cpu" then
reports why while the torch backend keeps working.  The sdist and the wheel
themselves are built and installed into a fresh virtualenv by
.ci/package_check.  The build manifest (fastmine/_build_manifest.json) names
every production source, and test-only C++ stays out of csrc/.
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import fastmine
from fastmine import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_XY = tuple(int(p) for p in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    """A fresh interpreter in the repository root (it imports this fastmine)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("built,running", [
    ("2.13.0", "2.13.0"), ("2.13.0+cpu", "2.13.1+cu128"), ("2.13.0", "2.13.0a0+git1234"), (None, "2.13.0"),
])
def test_same_major_minor_loads(built, running):
    assert _extension.abi_mismatch(built, running) == ""


@pytest.mark.parametrize("built,running", [("2.13.0+cpu", "2.14.0"), ("2.13.0", "2.12.1"), ("2.13.0", "3.13.0")])
def test_other_major_minor_is_refused_naming_both(built, running):
    msg = _extension.abi_mismatch(built, running)
    assert built in msg and running in msg
    assert "--no-build-isolation" in msg and f"install torch {built[:4]}.x" in msg


def test_recorded_build_torch_matches_the_running_one():
    if not _extension.loaded():
        pytest.skip("the compiled extension is not built")
    if _extension.BUILT_WITH_TORCH is None:
        pytest.skip("extension built before setup.py recorded the torch version")
    assert _extension._major_minor(_extension.BUILT_WITH_TORCH) == TORCH_XY
    assert f"torch={_extension.BUILT_WITH_TORCH}" in fastmine.build_info()


def test_mismatched_extension_is_refused_and_cpu_backend_says_why():
    # What a wheel built against the next torch minor would record.
    other = f"{TORCH_XY[0]}.{TORCH_XY[1] + 1}.0"
    proc = _run("""
        import sys, types
        import torch
        fake = types.ModuleType("fastmine._build_config")
        fake.TORCH_VERSION = sys.argv[1]
        sys.modules["fastmine._build_config"] = fake
        import fastmine
        from fastmine import _extension
        assert "fastmine._C" not in sys.modules, "extension loaded despite the mismatch"
        assert not _extension.loaded()
        x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        try:
            fastmine.mine(x, y, backend="cpu")
        except RuntimeError as exc:
            print("CPU:", exc)
        else:
            raise AssertionError("backend='cpu' ran")
        assert fastmine.mine(x, y, backend="torch").valid.any()
        assert fastmine.mine(x, y).valid.any()          # auto -> torch
        print("BACKENDS:", fastmine.available_backends())
        print("INFO:", fastmine.build_info())
        print("WHY:", _extension.why_missing())
        """, other)
    assert proc.returncode == 0, proc.stderr
    out = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert "cpu" not in out["BACKENDS"]
    assert out["INFO"] == "not loaded (torch ABI mismatch)"
    expected = _extension.abi_mismatch(other, torch.__version__)
    assert out["WHY"] == expected
    assert out["CPU"] == f"backend 'cpu' is not available: {expected}"
    assert f"built against torch {other}" in out["CPU"] and f"torch {torch.__version__} is running" in out["CPU"]


_SETUP = """
    import runpy, sys
    if sys.argv[1] == "no-torch":
        sys.modules["torch"] = None                 # as in build's isolated environment
    sys.argv = ["setup.py", "-q", *sys.argv[2:]]
    runpy.run_path("setup.py", run_name="__main__")
    """


def _requires(tmp_path, mode, *cmd):
    proc = _run(_SETUP, mode, *cmd, "egg_info", "--egg-base", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "fastmine.egg-info" / "requires.txt") as f:
        return f.read().split("\n\n")[0].split()


def test_setup_pins_torch_to_the_building_xy(tmp_path):
    x, y = TORCH_XY
    assert _requires(tmp_path, "torch") == [f"torch<{x}.{y + 1},>={x}.{y}", "numpy"]


def test_setup_without_torch_writes_sdist_metadata_and_refuses_to_compile(tmp_path):
    assert _requires(tmp_path, "no-torch") == ["torch>=2.4", "numpy"]
    proc = _run(_SETUP, "no-torch", "build_ext", "--build-lib", str(tmp_path / "lib"),
                "--build-temp", str(tmp_path / "tmp"))
    assert proc.returncode != 0
    assert "torch is not importable" in proc.stderr and "--no-build-isolation" in proc.stderr
    assert "python -m build --sdist" in proc.stderr


def test_jit_library_is_cached_per_torch_major_minor():
    # torch's JIT cache is keyed by sources and flags only: the name carries torch X.Y.
    x, y = TORCH_XY
    assert _extension.library_name(False) == f"fastmine_cuda_jit_torch{x}_{y}"
    assert _extension.library_name(True) == f"fastmine_cuda_jit_full_torch{x}_{y}"


# ------------------------------------------------------------- the build manifest
MANIFEST = _extension.manifest()
_PARTS = {name: part for name, part in MANIFEST.items() if isinstance(part, dict)}
_TEST_ONLY = ("cuda_selftest", "cuda_emulation")


def _sources_of(part: dict) -> list:
    return [p for key, value in part.items() if key in ("sources", "runtime", "selftest", "checks",
                                                          "launcher") for p in value]


def test_manifest_names_every_production_source_and_only_existing_files():
    """Every .cpp/.cu under csrc/ is compiled by some part of the manifest (a new
    source cannot silently stay out of the builds), and every entry matches files."""
    import glob

    named = set()
    for part in _PARTS.values():
        for pattern in _sources_of(part):
            found = glob.glob(os.path.join(ROOT, pattern))
            assert found, f"manifest entry {pattern!r} matches no file"
            named.update(os.path.relpath(p, ROOT) for p in found)
    production = {os.path.relpath(p, ROOT) for ext in ("cpp", "cu")
                  for p in glob.glob(os.path.join(ROOT, "csrc", "**", f"*.{ext}"), recursive=True)}
    assert production <= named, f"not in the build manifest: {sorted(production - named)}"


def test_test_only_cxx_lives_outside_csrc():
    """Test-only C++ (the self-test, the CUDA emulation) is under tests/csrc, which
    neither the sdist nor the wheel ships (.ci/package_check checks both), and
    production sources include the emulation in one place only (the shim)."""
    for name in _TEST_ONLY:
        part = _PARTS[name]
        for path in _sources_of(part) + part.get("include_dirs", []):
            assert path.startswith("tests/csrc/"), (name, path)
    for name, part in _PARTS.items():
        if name not in _TEST_ONLY:
            for path in _sources_of(part) + part.get("include_dirs", []):
                assert path.startswith("csrc/"), (name, path)
    naming = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "csrc")):
        for f in files:
            with open(os.path.join(dirpath, f)) as fh:
                if '#include "cuda_emulation.h"' in fh.read():
                    naming.append(os.path.relpath(os.path.join(dirpath, f), ROOT))
    assert naming == ["csrc/cuda/cuda_runtime_shim.cuh"], naming


def test_manifest_torch_nvcc_defines_are_torchs():
    """The builds without torch's BuildExtension (CMake, the emulation) take
    torch's nvcc -D flags from the manifest: they must be torch's."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    torch_defines = [f[2:] for f in COMMON_NVCC_FLAGS if f.startswith("-D")]
    assert MANIFEST["cuda"]["torch_nvcc_defines"] == torch_defines
