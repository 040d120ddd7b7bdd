"""benchmarks/long_run.py at 12 blocks: it runs, writes its JSON with every field the
report promises (timings are not asserted) and refuses bad arguments."""
import json

import pytest
import torch

from benchmarks import long_run
from lrag_engine.memory import _ext


@pytest.mark.parametrize("page_table", ["python", pytest.param("cpp", marks=pytest.mark.skipif(
    not _ext.extension_available(), reason=str(_ext.missing_reason())))])
def test_long_run_writes_its_json(tmp_path, capsys, page_table):
    threads = torch.get_num_threads()
    out = tmp_path / "long.json"
    assert long_run.main(["--blocks", "12", "--page-table", page_table, "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads   # restored after the run
    report = json.loads(out.read_text())
    assert report["benchmark"] == "long_run" and report["page_table"] == page_table
    env = report["environment"]
    assert env["versions"]["torch"] == torch.__version__ and env["device"]["type"] == "cpu" and "git" in env
    assert report["engine"]["page_table"] == page_table and report["config"]["blocks"] == 12

    rows = report["per_block"]
    for key in ("block_seconds", "block_cpu_seconds", "rss_bytes", "pool_reserved_bytes", "pool_used_bytes", "history_frames",
                "history_kv_bytes", "history_index_bytes"):
        assert len(rows[key]) == 12, key
    assert all(t > 0 for t in rows["block_seconds"])
    assert rows["history_frames"][-1] > rows["history_frames"][0]
    assert rows["pool_used_bytes"][-1] == rows["history_kv_bytes"][-1] > 0

    s = report["summary"]
    assert s["start_blocks"] == [4, 6] and s["end_blocks"] == [7, 12] and s["reference_block"] == 6
    for key in ("start_block_ms", "end_block_ms"):
        assert set(s[key]) >= {"median", "iqr"} and s[key]["median"] > 0
    for key in ("end_over_start", "rss_bytes_at_reference", "rss_bytes_at_end", "rss_growth_bytes",
                "pool_reserved_bytes_at_reference", "pool_reserved_bytes_at_end",
                "history_bytes_at_reference", "history_bytes_at_end", "history_growth_bytes", "chunk_bytes"):
        assert s[key] is not None, key
    assert s["history_bytes_at_end"] == s["history_kv_bytes_at_end"] + s["history_index_bytes_at_end"]
    assert s["chunk_bytes"] == report["pool_at_end"]["page_bytes"] * report["pool_at_end"]["chunk_pages"]
    checks = report["checks"]
    assert isinstance(checks["end_time_within_5pct_of_start"], bool)
    assert isinstance(checks["rss_growth_within_history_growth_plus_one_chunk"], bool)
    assert isinstance(checks["interleaved_control_within_5pct"], bool)
    control = report["control"]
    assert control["rounds"] == 3 and control["fresh_blocks"] == [4, 6] and control["long_blocks"] == [13, 15]
    assert control["long_over_fresh"] > 0 and control["fresh_block_ms"]["median"] > 0
    assert len(control["per_round_ms"]["fresh"]) == len(control["per_round_ms"]["long"]) == 3
    assert report["history_at_end"]["num_frames"] == rows["history_frames"][-1]
    assert "end / start" in capsys.readouterr().out


def test_plot_and_bad_arguments(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    assert long_run.main(["--blocks", "4", "--control-rounds", "0", "--out", str(out), "--plot", str(png)]) == 0
    assert png.stat().st_size > 0
    report = json.loads(out.read_text())
    assert report["control"] is None and report["checks"]["interleaved_control_within_5pct"] is None
    assert long_run.main(["--blocks", "3", "--out", str(out)]) == 2
    assert "--blocks" in capsys.readouterr().err
    assert long_run.main(["--blocks", "4", "--control-rounds", "-1", "--out", str(out)]) == 2
    assert "--control-rounds" in capsys.readouterr().err


def test_windows_of_a_full_run():
    assert long_run.windows(1000) == ((50, 100), (950, 1000))
    assert long_run.windows(12) == ((3, 6), (6, 12))
