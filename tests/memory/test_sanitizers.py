"""csrc/core under AddressSanitizer + UBSan: builds csrc/tests/core_selftest.cpp with the
core sources and runs its randomised sequences (exit code 0 and no sanitizer report)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
         "-fno-sanitize-recover=all"]
PROBE = r"""
#include <climits>
#include <cstdlib>
#include <cstring>
int main(int argc, char** argv) {
  char* p = static_cast<char*>(std::malloc(8));
  std::memset(p, 1, 8);
  std::free(p);
  if (argc > 1 && std::strcmp(argv[1], "use-after-free") == 0) return p[0];
  if (argc > 1 && std::strcmp(argv[1], "signed-overflow") == 0) return INT_MAX - 2 + argc;
  return 0;
}
"""


def _compiler():
    for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def sanitizer_env(tmp_path_factory):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (CXX, g++, clang++ or c++) on PATH")
    tmp = tmp_path_factory.mktemp("sanitize")
    (tmp / "probe.cpp").write_text(PROBE)
    built = subprocess.run([cxx, *FLAGS, str(tmp / "probe.cpp"), "-o", str(tmp / "probe")],
                           capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"{cxx} cannot link -fsanitize=address,undefined (sanitizer runtime missing?): "
                    f"{built.stderr.strip()[-300:]}")
    env = {**os.environ, "ASAN_OPTIONS": "abort_on_error=0:detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1"}
    clean = subprocess.run([str(tmp / "probe")], capture_output=True, text=True, env=env)
    if clean.returncode != 0:
        pytest.skip(f"sanitized binaries do not run here (exit {clean.returncode}): {clean.stderr.strip()[-300:]}")
    return cxx, tmp, env


@pytest.mark.parametrize("mode,report", [("use-after-free", "AddressSanitizer: heap-use-after-free"),
                                         ("signed-overflow", "runtime error: signed integer overflow")])
def test_sanitizers_are_active(sanitizer_env, mode, report):
    # guards against a build whose sanitizers are silently inactive
    _, tmp, env = sanitizer_env
    bad = subprocess.run([str(tmp / "probe"), mode, "x"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and report in bad.stderr, bad.stderr


def test_core_selftest_under_asan_ubsan(sanitizer_env):
    cxx, tmp, env = sanitizer_env
    sources = sorted(str(p) for p in (ROOT / "csrc" / "core").glob("*.cpp"))
    exe = tmp / "core_selftest"
    built = subprocess.run([cxx, *FLAGS, "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}", *sources,
                            str(ROOT / "csrc" / "tests" / "core_selftest.cpp"), "-o", str(exe)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    run = subprocess.run([str(exe), "100", "200"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "runtime error" not in run.stderr and "AddressSanitizer" not in run.stderr, run.stderr
    assert "100 seeds x 200 steps passed" in run.stdout
