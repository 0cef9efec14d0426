"""Build fastmine's compiled extension.

    pip install --no-build-isolation -e .        # or a wheel: python -m build --wheel --no-isolation

What is compiled, with which flags, is read from the build manifest
fastmine/_build_manifest.json (shared with the JIT build and CMakeLists.txt).
The CPU extension is always built.  The manifest's CUDA sources are added
only when torch has CUDA *and* a CUDA toolkit is found; FASTMINE_CUDA=0/1
forces it off/on.  Installing never fails because CUDA is absent.  torch must
already be installed (it is deliberately not a build requirement: pip would
otherwise fetch a multi-GB CUDA build into an isolated environment), so a
wheel or an install needs --no-build-isolation.  An sdist needs no torch:
`python -m build --sdist` works in build's isolated environment.

A compiled extension is bound to the torch it was built against, so a build
with torch X.Y records that version in fastmine/_build_config.py (read by
fastmine/_extension.py, which refuses to load the extension under another
torch X.Y) and pins the wheel's metadata to torch>=X.Y,<X.(Y+1).  The sdist
keeps the open range (dependencies are dynamic in pyproject.toml).

Release builds carry no debug info (-g0; Python's own CFLAGS have -g);
FASTMINE_DEBUG=1 keeps it.
"""
import glob
import json
import os
import re
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "fastmine._C"
BUILD_CONFIG = "_build_config.py"   # written next to the extension (fastmine/)
TORCH_FLOOR = "torch>=2.4"          # the sdist's (source) range
DEPENDENCIES = ["numpy"]            # besides torch; keep in sync with pyproject's note

# setuptools commands that compile (or install a compiled) extension; sdist,
# egg_info and dist_info do not.  setuptools.build_meta runs setup.py with the
# command in sys.argv (sdist -> 'sdist', wheel -> 'bdist_wheel', editable ->
# 'editable_wheel', metadata -> 'egg_info' / 'dist_info').
_COMPILING = {"build", "build_ext", "bdist", "bdist_wheel", "bdist_egg", "install", "develop",
              "editable_wheel"}
_commands = {a for a in sys.argv[1:] if not a.startswith("-")}
_SDIST = "sdist" in _commands

def _cuda_home_from_nvcc() -> None:
    """torch guesses CUDA_HOME from `which nvcc`; when nvcc is a symlink or a
    wrapper script (e.g. /usr/local/bin/nvcc running /usr/local/cuda/bin/nvcc)
    the guess (/usr/local) has no libcudart and the link fails.  Take the
    toolkit the link resolves to, else /usr/local/cuda, before torch looks;
    only a folder with the toolkit's headers counts."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    import shutil

    nvcc = shutil.which("nvcc")
    if not nvcc:
        return
    for home in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"):
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


_cuda_home_from_nvcc()

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:
    torch = None
    if _commands & _COMPILING:
        raise SystemExit(
            f"fastmine: cannot build the compiled extension: torch is not importable here ({exc}).\n"
            "fastmine compiles against the torch already installed, which an isolated build "
            "environment (pip's or `python -m build`'s default) does not see; torch is "
            "deliberately not a build requirement (pip would fetch a multi-GB CUDA build).\n"
            "Install torch first, then build without isolation:\n"
            "    pip install --no-build-isolation -e .          (a checkout)\n"
            "    pip install --no-build-isolation fastmine-*.tar.gz\n"
            "    python -m build --wheel --no-isolation\n"
            "An sdist needs no torch: python -m build --sdist") from exc


def _torch_minor() -> str:
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    if m is None:  # pragma: no cover - torch always has X.Y...
        raise SystemExit(f"fastmine: cannot parse torch.__version__ {torch.__version__!r}")
    return f"{m.group(1)}.{m.group(2)}"


def torch_requirement() -> str:
    """The torch requirement of what this command builds.

    An sdist (or a metadata query without torch) keeps the source range; a
    wheel / install is pinned to the building torch's X.Y, since the compiled
    extension's C++ ABI is bound to it."""
    if torch is None or _SDIST:
        return TORCH_FLOOR
    from torch.torch_version import TorchVersion

    minor = _torch_minor()
    major, mnr = (int(p) for p in minor.split("."))
    low = minor
    if TorchVersion(torch.__version__) < minor:  # a pre-release such as 2.14.0.dev20260101
        low = f"{minor}.0.dev0"
    return f"torch>={low},<{major}.{mnr + 1}"


def _want_cuda() -> bool:
    flag = os.environ.get("FASTMINE_CUDA", "auto").lower()
    have = torch.version.cuda is not None and CUDA_HOME is not None
    if flag in ("0", "off", "false"):
        return False
    if flag in ("1", "on", "true"):
        if not have:
            raise SystemExit("FASTMINE_CUDA=1 but torch has no CUDA or no CUDA toolkit was found")
        return True
    return have


def _debug() -> bool:
    return os.environ.get("FASTMINE_DEBUG", "0").lower() in ("1", "on", "true")


def _manifest() -> dict:
    """The build manifest, fastmine/_build_manifest.json: source lists and flags,
    shared with fastmine/_extension.py (JIT build) and CMakeLists.txt."""
    with open(os.path.join(HERE, "fastmine", "_build_manifest.json")) as f:
        return json.load(f)


def _sources(patterns) -> list:
    """The manifest's source globs, as paths relative to HERE; each must match."""
    files = []
    for pattern in patterns:
        found = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
        if not found:
            raise SystemExit(f"fastmine: the build manifest names {pattern!r}, which matches no file")
        files += found
    return files


def extensions():
    if torch is None or _SDIST:  # the sdist ships csrc/ through MANIFEST.in
        return []
    m = _manifest()
    sources = _sources(m["python_module"]["sources"] + m["ops"]["sources"])
    include_dirs = [os.path.join(HERE, d) for d in m["include_dirs"]]
    # -g0 last: it overrides the -g of Python's CFLAGS (a 14 MB .so with it).
    cxx = [*m["cxx_flags"], *m["openmp_flags"], f"-std=c++{m['cxx_standard']}",
           "-g" if _debug() else "-g0"]
    if _want_cuda():
        # Target GPUs: TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0"), read by BuildExtension;
        # unset, torch builds for the visible GPU (or its default list without one).
        # No -std flag for nvcc: torch's BuildExtension picks the C++ standard its
        # headers need, and adds the manifest's torch_nvcc_defines itself.
        # -lineinfo (source lines for profilers, no host debug info) stays in release builds.
        cuda = m["cuda"]
        nvcc = cuda["nvcc_flags"] + (["-g"] if _debug() else [])
        return [CUDAExtension(
            EXT_NAME, sources + _sources(cuda["sources"]),
            include_dirs=include_dirs + [os.path.join(HERE, d) for d in cuda["include_dirs"]],
            define_macros=[(d, None) for d in cuda["defines"]],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=m["openmp_flags"])]
    return [CppExtension(EXT_NAME, sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx}, extra_link_args=m["openmp_flags"])]


def _build_config_text() -> str:
    return ("# Generated by setup.py when the compiled extension fastmine._C was built; do not edit.\n"
            "# fastmine/_extension.py refuses to load fastmine._C under another torch major.minor.\n"
            f"TORCH_VERSION = {torch.__version__!r}\n"
            f"TORCH_CUDA = {torch.version.cuda!r}\n")


if torch is not None:
    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        """BuildExtension, plus fastmine/_build_config.py (the torch it was built
        against) written next to the extension: in place for editable installs,
        into build_lib (hence the wheel) otherwise."""

        def run(self):
            super().run()
            if not self.extensions:
                return
            path = os.path.join(os.path.dirname(self.get_ext_fullpath(EXT_NAME)), BUILD_CONFIG)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(_build_config_text())

        def get_outputs(self):
            outs = super().get_outputs()
            if self.extensions:
                outs.append(os.path.join(os.path.dirname(self.get_ext_fullpath(EXT_NAME)), BUILD_CONFIG))
            return outs

    CMDCLASS = {"build_ext": BuildExt}
else:
    CMDCLASS = {}


class BuildPyWithSources(build_py):
    """Also ship csrc/ inside the package (fastmine/_csrc) for the JIT CUDA build
    (fastmine/_extension.py) of a wheel install; editable installs use the checkout's csrc/.
    Test-only C++ lives in tests/csrc/ and never ships in a wheel."""

    def run(self):
        super().run()
        if self.editable_mode:
            return
        src = os.path.join(HERE, "csrc")
        dst = os.path.join(self.build_lib, "fastmine", "_csrc")
        for path in glob.glob(os.path.join(src, "**", "*"), recursive=True):
            if os.path.isfile(path) and path.endswith((".h", ".cuh", ".cpp", ".cu")):
                self.copy_file(path, os.path.join(dst, os.path.relpath(path, src)), preserve_mode=False)
        return None

    def copy_file(self, infile, outfile, *args, **kwargs):
        os.makedirs(os.path.dirname(outfile), exist_ok=True)
        return super().copy_file(infile, outfile, *args, **kwargs)


setup(
    packages=find_packages(include=["fastmine", "fastmine.*"]),
    install_requires=[torch_requirement(), *DEPENDENCIES],
    ext_modules=extensions(),
    cmdclass={**CMDCLASS, "build_py": BuildPyWithSources},
)
