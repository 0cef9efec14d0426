"""Build fastmine's compiled extension.

    pip install --no-build-isolation -e .

The CPU extension is always built.  CUDA sources (csrc/cuda/*.cu) are added
only when torch has CUDA *and* a CUDA toolkit is found; FASTMINE_CUDA=0/1
forces it off/on.  Installing never fails because CUDA is absent.  torch must
already be installed (it is deliberately not a build requirement: pip would
otherwise fetch a multi-GB CUDA build into an isolated environment).
"""
import glob
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - message for users
    raise SystemExit(
        "fastmine builds against an installed torch: `pip install torch` first, then "
        "`pip install --no-build-isolation -e .`") from exc

HERE = os.path.dirname(os.path.abspath(__file__))


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


def extensions():
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-std=c++17"]
    if _want_cuda():
        # Target GPUs: TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0"), read by BuildExtension;
        # unset, torch builds for the visible GPU (or its default list without one).
        # No -std flag: torch's BuildExtension picks the C++ standard its headers need.
        # selftest.cu is a stand-alone program (it has main()); the extension
        # takes the launcher only, like fastmine/_jit.py's source list.
        sources += [p for p in rel("csrc/cuda/*.cu") if os.path.basename(p) != "selftest.cu"]
        return [CUDAExtension(
            "fastmine._C", sources, include_dirs=include_dirs + [os.path.join(HERE, "csrc", "cuda")],
            define_macros=[("FASTMINE_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
            extra_link_args=["-fopenmp"])]
    return [CppExtension("fastmine._C", sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]


class BuildPyWithSources(build_py):
    """Also ship csrc/ inside the package (fastmine/_csrc) for the JIT CUDA build
    (fastmine/_jit.py) of a wheel install; editable installs use the checkout's csrc/."""

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
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": BuildPyWithSources},
)
