"""Every engine test runs on both page-table backends (C++ and pure Python)."""
import pytest

from lrag_engine.testing import run_on_both_page_tables


@pytest.fixture(autouse=True, params=["cpp", "python"], ids=["cpp-table", "py-table"])
def page_table_backend(request, monkeypatch):
    return run_on_both_page_tables(request, monkeypatch)
