"""The benchmark scripts run as files from any directory and as ``python -m benchmarks.X``
with no ``sys.path`` edits; their support code (``lrag_engine.bench``) imports without
pynvml or matplotlib, and its git provenance never fails."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if 'if __name__ == "__main__"' in p.read_text())
SUPPORT = sorted(f"lrag_engine.bench.{p.stem}" for p in (REPO / "lrag_engine" / "bench").glob("*.py")
                 if p.stem != "__init__")
LAZY = ("pynvml", "matplotlib")
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def package_only(tmp_path_factory) -> Path:
    """A folder holding only a link to this checkout's ``lrag_engine``: on PYTHONPATH it
    stands for the installed package while ``benchmarks`` stays unimportable, so a script
    that still needed the checkout on sys.path would fail."""
    folder = tmp_path_factory.mktemp("site")
    (folder / "lrag_engine").symlink_to(REPO / "lrag_engine", target_is_directory=True)
    return folder


def _env(pythonpath: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(pythonpath)  # replaces any PYTHONPATH pointing at the checkout
    return env


def _run(args: list[str], cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(pythonpath), capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def test_the_scripts_are_found():
    assert {p.stem for p in SCRIPTS} >= {"latency", "bench_kernels", "bench_memory"}
    assert not (BENCHMARKS / "common.py").exists() and not (BENCHMARKS / "flops.py").exists()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_help_as_a_file_from_another_directory(script, tmp_path, package_only):
    done = _run([str(script), "--help"], cwd=tmp_path, pythonpath=package_only)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_help_as_a_module(script, package_only):
    done = _run(["-m", f"benchmarks.{script.stem}", "--help"], cwd=REPO, pythonpath=package_only)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_no_sys_path_edits_under_benchmarks():
    offenders = []
    for path in BENCHMARKS.rglob("*"):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        if "sys.path" in text:
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, offenders


def test_support_modules_import_without_pynvml_or_matplotlib(tmp_path, package_only):
    """torch itself imports pynvml when it is installed, so the check starts after
    ``import torch``: those names leave sys.modules and a finder notes every later attempt
    to import them, installed or not, while the support modules import and the CPU paths
    (environment record, NVML sampler) run."""
    code = (
        "import importlib, json, sys\n"
        "import torch\n"
        f"LAZY = {LAZY!r}\n"
        "tried = []\n"
        "class Note:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] in LAZY:\n"
        "            tried.append(name)\n"
        "        return None\n"
        "for name in [m for m in sys.modules if m.partition('.')[0] in LAZY]:\n"
        "    del sys.modules[name]\n"
        "sys.meta_path.insert(0, Note())\n"
        f"for name in {SUPPORT!r}:\n"
        "    importlib.import_module(name)\n"
        "from lrag_engine.bench.records import environment\n"
        "from lrag_engine.bench.nvml import NvmlSampler\n"
        "environment('cpu')\n"
        "with NvmlSampler('cpu'):\n"
        "    pass\n"
        "print(json.dumps(sorted(set(tried))))\n"
    )
    done = _run(["-c", code], cwd=tmp_path, pythonpath=package_only)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_git_commit_outside_a_checkout_is_unknown(tmp_path, monkeypatch):
    from lrag_engine.bench.provenance import git_commit
    monkeypatch.chdir(tmp_path)
    assert git_commit(tmp_path) == {"commit": None, "dirty": None, "root": None}
    assert git_commit(tmp_path / "missing") == {"commit": None, "dirty": None, "root": None}


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout")
def test_git_commit_finds_this_checkout_from_any_directory(tmp_path, monkeypatch):
    from lrag_engine.bench.provenance import git_commit
    monkeypatch.chdir(tmp_path)
    record = git_commit()
    if record["commit"] is None:
        pytest.skip("git is not usable here")
    assert re.fullmatch(r"[0-9a-f]{40}", record["commit"]) and isinstance(record["dirty"], bool)
    assert Path(record["root"]).resolve() == REPO.resolve()
