"""The extension builds from a clean build directory with setuptools + pybind11 only (no
torch) in its CPU-only form (LRAG_NO_CUDA=1), and the CUDA sources compile with nvcc."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("pybind11", reason="building the extension needs pybind11")

CHECK = """
import sys
sys.path.insert(0, sys.argv[1])
import _C
assert "torch" not in sys.modules, "the extension imported torch"
m = _C.PagedMemory(2, 4, 2)
s = m.create_stream()
m.append([s], 2)
m.check_invariants()
print("with_cuda", _C.with_cuda)
"""


def _nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def test_cpu_only_extension_builds_and_imports(tmp_path):
    env = {**os.environ, "LRAG_NO_CUDA": "1"}
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "-j", "2", "--build-lib", str(tmp_path / "lib"),
                            "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    assert "LRAG_NO_CUDA is set; building the CPU-only extension" in build.stderr
    run = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path / "lib" / "lrag_engine")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "with_cuda False" in run.stdout


def test_cuda_sources_compile_with_nvcc(tmp_path):
    # The full CUDA-linked module is what `setup.py build_ext --inplace` makes when nvcc
    # exists; this checks the .cu sources alone, warnings as errors, in about a second.
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA_HOME, CUDA_PATH, /usr/local/cuda, PATH)")
    for src in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        out = subprocess.run([nvcc, "-std=c++17", "-O2", "-Werror", "all-warnings", "-Xcompiler", "-fPIC,-Wall",
                              f"-I{ROOT / 'csrc'}", "-c", str(src), "-o", str(tmp_path / (src.name + ".o"))],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
