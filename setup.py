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
        sources += rel("csrc/cuda/*.cu")
        return [CUDAExtension(
            "fastmine._C", sources, include_dirs=include_dirs,
            define_macros=[("FASTMINE_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-std=c++17"]},
            extra_link_args=["-fopenmp"])]
    return [CppExtension("fastmine._C", sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]


setup(
    packages=find_packages(include=["fastmine", "fastmine.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
