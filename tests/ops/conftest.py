"""Kernel tests run compiled on CUDA, else in the Triton CPU interpreter.

Triton picks compiling or interpreting at decoration time, so ``TRITON_INTERPRET=1``
only takes effect when set before ``triton`` is first imported. Setting it here covers
``pytest tests/ops``; a run of the whole suite, where earlier test modules import
triton first, needs it exported (``TRITON_INTERPRET=1 pytest``) or set in the
top-level ``tests/conftest.py``. Otherwise the kernel tests fail with a message that
says so.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where the small-size kernel tests run: the GPU if there is one, else the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
