"""Result files: the environment record every result starts with, and JSON output.

    env = environment(device)                  # date, commit, versions, device info, argv
    write_json(path, result)                   # indented, parents created, NaN/inf as null
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from .devices import device_info
from .provenance import git_commit, now, versions


def environment(device: torch.device | str) -> dict:
    """The provenance block every result file starts with."""
    return {"date": now().isoformat(timespec="seconds"), "git": git_commit(), "versions": versions(),
            "device": device_info(device), "argv": sys.argv}


def _finite(obj):
    """JSON has no NaN/inf: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: dict) -> Path:
    """Writes ``obj`` as indented JSON (parents created, NaN/inf as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(obj), indent=2, default=str) + "\n")
    return path
