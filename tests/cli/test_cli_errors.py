"""The command line on bad input: one ``lrag-engine: error:`` line naming the file or the
option, exit code 2, no traceback, nothing built or lost; and its --help text."""
import argparse
import os
import re
import subprocess
import sys

import pytest
import torch

from lrag_engine import Engine
from lrag_engine.cli import build_parser, main
from lrag_engine.models.checkpoint import save_checkpoint


class _OpensFile:
    """Unpickling this creates ``path``: what a refused pickle must never get to do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "empty.pt").write_bytes(b"")
    (d / "empty_lora.pt").write_bytes(b"")
    (d / "random.safetensors").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                                         generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    torch.save({"text": _OpensFile(d / "marker")}, d / "refused.pt")
    save_checkpoint(Engine("tiny").model, d / "weights.pt")
    (d / "a_file").write_text("not a directory")
    # The payload does run when a pickle is trusted, so a missing marker means something.
    torch.save({"text": _OpensFile(d / "control_marker")}, d / "control.pt")
    torch.load(d / "control.pt", weights_only=False)
    assert (d / "control_marker").exists()
    return d


def _start_cli(*args, cwd):
    """The CLI as a user runs it, without the Triton interpreter the test process may have."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.Popen([sys.executable, "-m", "lrag_engine.cli", "generate", "--device", "cpu",
                             "--frames", "6", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(process):
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _run_cli(*args, cwd):
    return _finish(_start_cli(*args, cwd=cwd))


def _assert_one_error_line(run, names):
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("lrag-engine: error: "), run.stderr
    assert sum(line.startswith("lrag-engine: error:") for line in lines) == 1, run.stderr
    for name in names:
        assert name in lines[-1], lines[-1]


BAD_INPUTS = [
    pytest.param(["--checkpoint", "{d}/empty.pt"], ["empty.pt"], id="empty-checkpoint"),
    pytest.param(["--text", "{d}/empty.pt"], ["--text", "empty.pt"], id="empty-text"),
    pytest.param(["--encoder", "{d}/empty.pt"], ["empty.pt"], id="empty-encoder"),
    pytest.param(["--checkpoint", "{d}/weights.pt", "--lora", "{d}/empty_lora.pt"], ["empty_lora.pt"],
                 id="empty-lora"),
    pytest.param(["--text", "{d}/random.safetensors"], ["random.safetensors"], id="random-bytes-text"),
    pytest.param(["--text", "{d}/refused.pt"], ["refused.pt"], id="refused-pickle-text"),
    pytest.param(["--frames", "3000000000"], ["--frames", "3000000000"], id="frames-3e9"),
    pytest.param(["--kernels", "triton"], ["--kernels", "TRITON_INTERPRET=1"], id="triton-without-interpreter"),
    pytest.param(["--top-k", "11"], ["--top-k (11)"], id="top-k-flag-name"),
    pytest.param(["--out", "{d}/a_file"], ["--out", "a_file"], id="out-is-a-file"),
    pytest.param(["--out", "{d}/a_file/run"], ["--out", "a_file/run"], id="out-under-a-file"),
    pytest.param(["--out", "/proc/lrag_out"], ["--out", "/proc/lrag_out"], id="out-unwritable-proc"),
]


@pytest.fixture(scope="module")
def bad_runs(files, tmp_path_factory):
    """Every case of BAD_INPUTS, all started at once: each is mostly Python importing torch."""
    runs = {}
    for case in BAD_INPUTS:
        args, _ = case.values
        if "/proc/lrag_out" in args and not os.path.isdir("/proc/self"):
            continue
        cwd = tmp_path_factory.mktemp(case.id)
        runs[case.id] = _start_cli("--out", str(cwd / "out"), *[a.format(d=files) for a in args], cwd=cwd)
    return runs


@pytest.mark.parametrize("args, names", BAD_INPUTS)
def test_bad_input_is_one_error_line(files, bad_runs, request, args, names):
    case = request.node.callspec.id
    if case not in bad_runs:
        pytest.skip("no /proc")
    _assert_one_error_line(_finish(bad_runs[case]), names)
    assert not (files / "marker").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes through mode 0o555")
def test_read_only_out_is_one_error_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _assert_one_error_line(_run_cli("--out", str(locked / "run"), cwd=tmp_path), ["--out", "locked/run"])
    finally:
        locked.chmod(0o755)


def test_unwritable_out_fails_before_any_work(files, tmp_path, monkeypatch, capsys):
    run = _run_cli("--out", str(files / "a_file" / "run"), cwd=tmp_path)
    _assert_one_error_line(run, ["--out"])
    assert run.stdout == "" and "block" not in run.stderr   # no engine summary, no progress bar

    def no_engine(*args, **kwargs):
        raise AssertionError("an engine was built for an unwritable --out")
    monkeypatch.setattr("lrag_engine.engine.Engine", no_engine)
    assert main(["generate", "--frames", "6", "--out", str(files / "a_file" / "run")]) == 2
    assert "--out" in capsys.readouterr().err


def test_outputs_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "latents.pt").write_bytes(b"an earlier run")

    def failing_save(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", failing_save)
    assert main(["generate", "--frames", "6", "--out", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert (out / "latents.pt").read_bytes() == b"an earlier run"
    # no temporary file left; the video, finished before the failing save, is whole
    assert sorted(p.name for p in out.iterdir()) == ["latents.pt", "video.mp4"]


def _help_entries(command, monkeypatch, capsys):
    """Each option's help entry of ``lrag-engine <command> --help``, on one line."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        main([command, "--help"])
    entries = []
    for line in capsys.readouterr().out.split("options:", 1)[1].splitlines():
        if re.match(r"  -", line):
            entries.append(line.strip())
        elif line.strip() and entries:
            entries[-1] += " " + line.strip()
    return entries


@pytest.mark.parametrize("command", ["generate", "collect-latents", "train-encoder", "eval-retrieval"])
def test_help_gives_every_option_a_text_and_its_default_once(command, monkeypatch, capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    actions = [a for a in sub.choices[command]._actions if a.option_strings and a.dest != "help"]
    for action in actions:
        assert action.help, f"{command} {action.option_strings[0]} has no help text"
    entries = {entry.split()[0].rstrip(","): entry for entry in _help_entries(command, monkeypatch, capsys)}
    for action in actions:
        entry = entries[action.option_strings[0]]
        assert entry.count("default:") <= 1, entry
        if action.default is not None and action.default is not False and action.default != []:
            assert f"(default: {action.default})" in entry, entry
