"""Import of the compiled extension ``lrag_engine._C`` with a clear message when absent.

Build it with ``pip install -e .`` or, for an in-place build used by the tests,
``python setup.py build_ext --inplace`` (needs pybind11 and a C++17 compiler; nvcc is
optional, ``LRAG_NO_CUDA=1`` skips it).
"""
from __future__ import annotations

from types import ModuleType

_BUILD_HINT = ("build it with `pip install -e .` or `python setup.py build_ext --inplace` "
               "(needs pybind11 and a C++17 compiler)")

try:
    from lrag_engine import _C as _module
    _import_error: str | None = None
except ImportError as exc:  # not built, or built for another Python
    _module = None
    _import_error = f"lrag_engine._C is not importable ({exc}); {_BUILD_HINT}"


def extension_available() -> bool:
    """True when the compiled paged-memory extension imports."""
    return _module is not None


def missing_reason() -> str | None:
    """Why the extension is unavailable, or None when it imports."""
    return _import_error


def load() -> ModuleType:
    """The extension module; ImportError with the reason and the build command otherwise."""
    if _module is None:
        raise ImportError(_import_error)
    return _module


def cuda_copy_reason() -> str | None:
    """None when the extension's CUDA page copies can run here, else why not (CPU-only
    build, no device, driver older than the CUDA runtime the extension was built with)."""
    if _module is None:
        return _import_error
    if not _module.with_cuda:
        return "lrag_engine._C was built without CUDA (nvcc missing or LRAG_NO_CUDA=1)"
    status = _module.cuda_status()
    return status or None
