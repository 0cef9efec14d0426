"""fastmine's compiled code: loading the extension fastmine._C, and the opt-in
just-in-time build of the CUDA kernels when it has none.

Importing fastmine never fails without the extension.  The extension's C++ ABI
is bound to the torch it was built against (recorded by setup.py in
fastmine/_build_config.py): under another torch major.minor it is refused, not
loaded (:func:`abi_mismatch`).

Asking what is available (:func:`loaded`, :func:`why_missing`,
:func:`cuda_kernels_loaded`, :func:`cuda_why_missing`, hence
``fastmine.available_backends()`` and ``backend="auto"``) never builds
anything.  Only an explicit ``backend="cuda"`` on CUDA tensors under
``FASTMINE_JIT=1`` calls :func:`ensure_cuda_kernels`, which compiles the missing
kernels once per process (:func:`load_cuda_extension`, also callable
directly): ``torch.utils.cpp_extension.load`` with ninja, cached in torch's
extension directory (``TORCH_EXTENSIONS_DIR``) under a name that carries the
torch major.minor (:func:`library_name`), for the GPUs of
``TORCH_CUDA_ARCH_LIST`` as in setup.py.  When fastmine._C is missing or was
refused, the JIT library also defines the op schemas and the CPU kernels.

What is compiled, with which flags, is read from the build manifest
(fastmine/_build_manifest.json, shared with setup.py and CMakeLists.txt).
Sources are looked up in this order: ``$FASTMINE_SOURCE_DIR`` (a ``csrc``
folder), ``fastmine/_csrc`` (shipped inside wheels by setup.py), the
checkout's ``csrc`` (editable installs).
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import List, Optional

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
MANIFEST_PATH = os.path.join(_HERE, "_build_manifest.json")

try:  # written by setup.py next to the compiled extension (absent in a plain checkout)
    from ._build_config import TORCH_VERSION as BUILT_WITH_TORCH
except ImportError:
    BUILT_WITH_TORCH: Optional[str] = None


def _major_minor(version: str) -> Optional[tuple]:
    m = re.match(r"(\d+)\.(\d+)", str(version))
    return (int(m.group(1)), int(m.group(2))) if m else None


def abi_mismatch(built: Optional[str], running: str) -> str:
    """Why an extension built against torch `built` must not be loaded under
    torch `running` ('' when it may: same major.minor, or `built` unknown).

    The extension's C++ ABI is bound to the torch it was compiled against;
    loading it under another torch X.Y crashes or fails with undefined
    symbols, so fastmine refuses it and names both versions instead."""
    if built is None or _major_minor(built) == _major_minor(running):
        return ""
    want = ".".join(map(str, _major_minor(built) or ()))
    return (f"the compiled extension fastmine._C was built against torch {built}, but torch {running} "
            f"is running, and a compiled extension only loads under the torch major.minor it was built "
            f"with: rebuild fastmine against this torch (`pip install --no-build-isolation -e .` in a "
            f"checkout, or `pip install --no-build-isolation --no-deps --force-reinstall` its sdist) "
            f"or install torch {want}.x")


_C = None
_load_error: Optional[BaseException] = None
_refused = abi_mismatch(BUILT_WITH_TORCH, torch.__version__)
if not _refused:
    try:  # importing the module registers the fastmine:: C++ ops with torch
        from . import _C  # type: ignore[attr-defined,no-redef]
    except ImportError as exc:  # not built (e.g. a plain source checkout)
        _load_error = exc


def loaded() -> bool:
    """True when the compiled extension (CPU kernel, and CUDA if built) is importable."""
    return _C is not None


def why_missing() -> str:
    """A human-readable reason the extension is unavailable ('' when loaded)."""
    if loaded():
        return ""
    if _refused:
        return _refused
    return (f"the compiled extension fastmine._C is not available ({_load_error}); "
            "build it with `pip install --no-build-isolation -e .`")


def _built_with_cuda() -> bool:
    return loaded() and "cuda=on" in _C.build_info()


# --------------------------------------------------------------- the JIT build
_jit_loaded = False
_jit_error: Optional[BaseException] = None


class JitBuildError(RuntimeError):
    """The CUDA kernels cannot be JIT-built here; the message says why."""


def jit_enabled() -> bool:
    """True when FASTMINE_JIT=1: an explicit backend="cuda" may JIT-build missing CUDA kernels."""
    return os.environ.get("FASTMINE_JIT", "0").lower() in ("1", "on", "true")


def jit_loaded() -> bool:
    """True once :func:`load_cuda_extension` succeeded in this process."""
    return _jit_loaded


def jit_error() -> Optional[BaseException]:
    """The remembered failure of :func:`load_cuda_extension`, if any."""
    return _jit_error


def manifest() -> dict:
    """The build manifest (fastmine/_build_manifest.json)."""
    with open(MANIFEST_PATH) as f:
        return json.load(f)


def manifest_sources(patterns: List[str], root: str) -> List[str]:
    """The files the manifest's source `patterns` name (globs, relative to the
    repository root) under `root`, sorted per pattern; a pattern naming no file
    is an error (a renamed source must not silently drop out of a build)."""
    files = []
    for pattern in patterns:
        found = sorted(glob.glob(os.path.join(root, pattern)))
        if not found:
            raise JitBuildError(f"the build manifest names {pattern!r}, which matches no file under {root}")
        files += found
    return files


def source_dir() -> str:
    """The production sources' ``csrc`` folder (see the module docstring)."""
    candidates = [os.environ.get("FASTMINE_SOURCE_DIR", ""), os.path.join(_HERE, "_csrc"),
                  os.path.join(os.path.dirname(_HERE), "csrc")]
    for cand in candidates:
        if cand and os.path.isfile(os.path.join(cand, "cuda", "mine_cuda.cu")):
            return cand
    raise JitBuildError(
        "fastmine's C++/CUDA sources were not found (looked in "
        f"{[c for c in candidates if c]}); set FASTMINE_SOURCE_DIR to a checkout's csrc/ folder")


def _in_csrc(csrc: str, paths: List[str]) -> List[str]:
    """Manifest paths (csrc/...) as paths under the source folder `csrc`."""
    return [os.path.join(csrc, os.path.relpath(p, "csrc")) for p in paths]


def jit_sources(csrc: str, with_ops: bool) -> List[str]:
    """What the JIT library compiles: the CUDA kernels, and, when fastmine._C is
    missing (`with_ops`), the op schemas and CPU kernels too (not the Python
    module: the library is loaded with torch.ops, not imported)."""
    m = manifest()
    patterns = (m["ops"]["sources"] if with_ops else []) + m["cuda"]["sources"]
    return manifest_sources(_in_csrc(csrc, patterns), "")


def check_toolchain() -> None:
    """Raise JitBuildError unless torch has CUDA, a toolkit (nvcc) and ninja exist."""
    if torch.version.cuda is None:
        raise JitBuildError(
            f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None): the CUDA "
            "kernels need a CUDA build of torch (see https://pytorch.org/get-started/locally/)")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        raise JitBuildError(
            "no CUDA toolkit found: install one matching torch's CUDA "
            f"{torch.version.cuda} and set CUDA_HOME (nvcc must be at $CUDA_HOME/bin/nvcc)")
    if not cpp_extension.is_ninja_available():
        raise JitBuildError("the JIT build needs ninja: `pip install ninja`")


def library_name(with_ops: bool) -> str:
    """The JIT library's name, hence its cache folder in TORCH_EXTENSIONS_DIR.

    It names the torch major.minor: torch's cache is keyed by sources and flags
    only, and a library cached under another torch would not load (its C++ ABI
    is bound to the torch it was built with, as for fastmine._C)."""
    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    tag = f"_torch{m.group(1)}_{m.group(2)}" if m else ""
    return "fastmine_cuda_jit" + ("_full" if with_ops else "") + tag


def load_cuda_extension(verbose: bool = False) -> None:
    """Compile (or load from torch's cache) the CUDA kernels and register them
    as the CUDA implementations of the fastmine ops.

    Idempotent: the first failure is remembered and re-raised.  Raises
    :class:`JitBuildError` (a RuntimeError) with the reason when torch has no
    CUDA, no toolkit or ninja is found, or the sources are missing.
    """
    global _jit_loaded, _jit_error
    if _jit_loaded:
        return
    if _jit_error is not None:
        raise _jit_error
    try:
        check_toolchain()
        csrc = source_dir()
        from torch.utils.cpp_extension import load

        m = manifest()
        with_ops = not loaded()
        openmp = m["openmp_flags"] if with_ops else []
        defines = [f"-D{d}" for d in m["cuda"]["defines"]]  # every source, as in setup.py
        load(name=library_name(with_ops),
             sources=jit_sources(csrc, with_ops),
             extra_include_paths=_in_csrc(csrc, m["include_dirs"] + m["cuda"]["include_dirs"]),
             extra_cflags=m["cxx_flags"] + openmp + defines,
             extra_cuda_cflags=m["cuda"]["nvcc_flags"] + defines,
             extra_ldflags=openmp,
             is_python_module=False, verbose=verbose)
        _jit_loaded = True
    except JitBuildError as exc:
        _jit_error = exc
        raise
    except Exception as exc:  # compiler errors etc.: keep the cause
        _jit_error = JitBuildError(f"JIT build of fastmine's CUDA kernels failed: {exc}")
        _jit_error.__cause__ = exc
        raise _jit_error


# ------------------------------------------------------------- the CUDA kernels
def cuda_kernels_loaded() -> bool:
    """True when CUDA kernels are registered: built into fastmine._C, or JIT-built
    in this process.  A query: never builds."""
    return _built_with_cuda() or _jit_loaded


def ensure_cuda_kernels() -> bool:
    """The explicit request for the CUDA kernels (``backend="cuda"``): True when
    they are registered; otherwise, with FASTMINE_JIT=1, a CUDA torch and a
    visible GPU, JIT-build them once (a failure is remembered, see
    :func:`cuda_why_missing`, and gives False).  Availability queries use
    :func:`cuda_kernels_loaded` / :func:`cuda_why_missing` instead."""
    if cuda_kernels_loaded():
        return True
    if jit_enabled() and _jit_error is None and torch.cuda.is_available():
        try:
            load_cuda_extension()
        except JitBuildError:
            return False
        return True
    return False


def cuda_why_missing() -> str:
    """Why no CUDA kernels are available ('' when they are), for error messages.
    Never builds (it checks the toolchain the JIT build would need)."""
    if cuda_kernels_loaded():
        return ""
    if _jit_error is not None:
        return str(_jit_error)
    base = _refused or "fastmine was built without its CUDA kernels"
    if not jit_enabled():
        if _refused:
            return base + "; or set FASTMINE_JIT=1 to compile the CUDA kernels for this torch on first use"
        return (base + "; rebuild with a CUDA torch and toolkit (FASTMINE_CUDA=1), or set "
                "FASTMINE_JIT=1 to compile them on first use")
    try:
        check_toolchain()
    except JitBuildError as exc:
        return f"{base} and the JIT build cannot run: {exc}"
    return base + " (JIT build not attempted: no CUDA device is visible, or backend='cuda' not yet asked for)"


def build_info() -> str:
    """Compiler/OpenMP/CUDA flags of the compiled extension and the torch it was
    built against ('not built' without it);
    '; cuda=jit' is appended once the CUDA kernels were JIT-built in this process."""
    if loaded():
        info = _C.build_info() + (f"; torch={BUILT_WITH_TORCH}" if BUILT_WITH_TORCH else "")
    else:
        info = "not loaded (torch ABI mismatch)" if _refused else "not built"
    return info + "; cuda=jit" if _jit_loaded else info
