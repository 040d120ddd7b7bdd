"""Where a C++ compiler exists the paged-memory extension must have been built: its tests
(and the host tier) would otherwise be skipped or fall back, and CI would pass on less."""
import shutil

from lrag_engine.memory import _ext


def test_extension_is_built_where_a_compiler_exists():
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        import pytest
        pytest.skip("no C++ compiler on this machine: the pure-PyTorch history store is expected")
    assert _ext.extension_available(), (
        f"a C++ compiler exists ({compiler}) but lrag_engine._C is missing: {_ext.missing_reason()}; "
        "reinstall with `pip install -e .` and read the build log")
