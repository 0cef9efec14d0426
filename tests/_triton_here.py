"""Whether the Triton kernels can run on this machine's CPU tensors."""


def triton_interpreted() -> bool:
    """Triton is installed and runs kernels on CPU tensors (TRITON_INTERPRET=1, which
    tests/conftest.py sets before fastmine is imported)."""
    try:
        from fastmine import _triton
    except ImportError:
        return False
    return _triton.triton is not None and _triton.INTERPRETED
