"""Comparison helper shared by the test suites: one tolerance table, one report format."""
from __future__ import annotations

import torch

# Tolerances per compute dtype; never loosened to make a test pass.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (1e-3, 1e-3),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for ``dtype``."""
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 atol: float | None = None, rtol: float | None = None, name: str = "tensor") -> None:
    """Fail unless ``|actual - expected| <= atol + rtol * |expected|`` everywhere.

    NaN/inf must agree position by position. The message gives max/mean error and the
    first bad indices. ``dtype`` picks the row of ``TOLERANCES`` (default: ``actual``'s).
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    default_atol, default_rtol = tolerance(dtype or actual.dtype)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    a_bad, e_bad = ~torch.isfinite(a), ~torch.isfinite(e)
    mismatch = (a_bad != e_bad) | (a_bad & e_bad & ~((a == e) | (a.isnan() & e.isnan())))
    if mismatch.any():
        where = mismatch.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: non-finite values disagree at {where}")
    finite = ~a_bad
    err = (a - e).abs().where(finite, torch.zeros_like(a))
    bad = err > atol + rtol * e.abs().where(finite, torch.zeros_like(e))
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements off (atol={atol:g}, rtol={rtol:g}); "
            f"max err {err.max().item():.3e}, mean err {err.mean().item():.3e}; first bad at {where}: "
            f"got {[a[tuple(i)].item() for i in where]}, expected {[e[tuple(i)].item() for i in where]}")


def run_on_both_page_tables(request, monkeypatch) -> str:
    """Body of an autouse fixture parametrised over ``["cpp", "python"]`` that runs a
    test's engines on that page-table backend (``RuntimeConfig.page_table="auto"``
    follows the LRAG_PAGE_TABLE environment variable); skips "cpp" when the extension
    is not built."""
    import pytest

    from .memory import _ext
    from .memory.page_table import ENV_VAR
    if request.param == "cpp" and not _ext.extension_available():
        pytest.skip(f"the C++ page table is not built: {_ext.missing_reason()}")
    monkeypatch.setenv(ENV_VAR, request.param)
    return request.param
