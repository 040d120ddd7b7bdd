"""Where a result came from: the git commit of the checkout, library versions, the date.

    git_commit()   # {"commit": sha, "dirty": bool, "root": path}; all None outside a checkout
    versions()     # python, torch, triton, cuda, cudnn
    now()          # timezone-aware UTC datetime
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

# The directory above the installed package: the checkout itself for an in-place or
# editable install, site-packages otherwise.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]
GIT_TIMEOUT_S = 10
UNKNOWN_COMMIT = {"commit": None, "dirty": None, "root": None}


def _git(cwd: Path, *args: str) -> str | None:
    """stdout of ``git args`` run in ``cwd``, or None (no git, not a checkout, any error)."""
    try:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True,
                              timeout=GIT_TIMEOUT_S).stdout.strip()
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def find_checkout(*candidates: str | Path | None) -> Path | None:
    """Top directory of the first git checkout, among ``candidates`` (default: the package's
    location, then the current directory), that holds the ``lrag_engine`` package: the
    checkout whose code runs, never an unrelated repository that merely encloses it."""
    if not candidates:
        candidates = (PACKAGE_PARENT, Path.cwd())
    for candidate in candidates:
        if candidate is None or not Path(candidate).is_dir():
            continue
        top = _git(Path(candidate), "rev-parse", "--show-toplevel")
        if top and (Path(top) / "lrag_engine" / "__init__.py").is_file():
            return Path(top)
    return None


def git_commit(repo: str | Path | None = None) -> dict:
    """{"commit": sha, "dirty": bool, "root": path} of the checkout holding the code that
    runs (``repo``, else found from the package's location or the current directory);
    every field None when there is no such checkout or git is missing. Never raises."""
    try:
        root = find_checkout(repo) if repo is not None else find_checkout()
    except OSError:  # e.g. the current directory was removed
        root = None
    if root is None:
        return dict(UNKNOWN_COMMIT)
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status), "root": os.fspath(root)}


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def versions() -> dict:
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
