"""Makes the oracle module importable as ``naive`` whatever pytest's import mode."""
import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402

from lrag_engine.testing import run_on_both_page_tables  # noqa: E402


@pytest.fixture(autouse=True, params=["cpp", "python"], ids=["cpp-table", "py-table"])
def page_table_backend(request, monkeypatch):
    return run_on_both_page_tables(request, monkeypatch)
