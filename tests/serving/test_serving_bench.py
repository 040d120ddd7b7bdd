"""benchmarks/serving.py: its seeded plan, its block accounting (which must catch lost,
duplicated, unexpected and misplaced blocks), and a tiny run of both modes through the
real Scheduler that must account for every block and give every page back (timings are
not asserted)."""
import json

import pytest
import torch

from benchmarks import serving
from benchmarks.serving import Ledger, StreamPlan, make_plan


def test_plan_is_seeded_and_keeps_its_rules():
    assert make_plan(16, 0, 12, 24, 2) == make_plan(16, 0, 12, 24, 2)
    assert make_plan(16, 0, 12, 24, 2) != make_plan(16, 1, 12, 24, 2)
    kinds = {"endless": 0, "cancelled_mid": 0, "cancelled_at_0": 0, "timeline": 0, "live": 0}
    for seed in range(40):
        plans = make_plan(16, seed, 3, 9, 2)
        assert plans[0].join_step == 0
        assert all(0 <= b.join_step - a.join_step <= 2 for a, b in zip(plans, plans[1:]))
        assert len({p.seed for p in plans}) == len(plans)
        for p in plans:
            if p.blocks is None:
                kinds["endless"] += 1
                assert p.cancel_after >= 1 and p.expected_status == "cancelled"
            else:
                assert 3 <= p.blocks <= 9
                if p.cancel_after is not None:
                    assert 0 <= p.cancel_after < p.blocks
                    kinds["cancelled_at_0" if p.cancel_after == 0 else "cancelled_mid"] += 1
            for switches, kind in ((p.prompt_timeline, "timeline"), (p.live_switches, "live")):
                assert all(1 <= k < p.expected_blocks for k in switches)
                kinds[kind] += bool(switches)
    assert all(count > 0 for count in kinds.values()), kinds
    with pytest.raises(ValueError, match="max_blocks"):
        make_plan(4, 0, 5, 2, 1)


def _finished(blocks: int) -> StreamPlan:
    return StreamPlan(index=0, join_step=0, seed=1, prompt="p", blocks=blocks)


def _feed(ledger: Ledger, rid: str, blocks: list[int], final_at: int | None, end=None) -> None:
    for b in blocks:
        ledger.block(rid, b, (b, b + 1), final=b == final_at)
    if end is not None:
        ledger.end(rid, *end, None)


def test_ledger_counts_every_kind_of_wrong_delivery():
    ledger = Ledger(frames_per_block=1)
    ledger.expect("good", _finished(3))
    _feed(ledger, "good", [0, 1, 2], 2, ("finished", 3))
    assert ledger.report()["ok"]

    cases = {
        "lost": ([0, 2], 2, ("finished", 3)),
        "duplicated": ([0, 1, 1, 2], 2, ("finished", 3)),
        "out_of_order": ([0, 2, 1], 2, ("finished", 3)),
        "wrong_final_flags": ([0, 1, 2], 1, ("finished", 3)),
        "missing_end": ([0, 1, 2], 2, None),
        "wrong_end": ([0, 1, 2], 2, ("cancelled", 3)),
    }
    for counter, (blocks, final_at, end) in cases.items():
        ledger = Ledger(frames_per_block=1)
        ledger.expect("r", _finished(3))
        _feed(ledger, "r", blocks, final_at, end)
        report = ledger.report()
        assert report[counter] >= 1 and not report["ok"], (counter, report)

    cancelled = StreamPlan(index=1, join_step=0, seed=2, prompt="p", blocks=None, cancel_after=2)
    ledger = Ledger(frames_per_block=1)
    ledger.expect("c", cancelled)
    _feed(ledger, "c", [0, 1, 2], None, ("cancelled", 3))   # one block past the cancel point
    report = ledger.report()
    assert report["unexpected"] == 1 and report["wrong_end"] == 1 and not report["ok"]

    ledger = Ledger(frames_per_block=2)
    ledger.expect("f", _finished(1))
    ledger.block("f", 0, (1, 3), final=True)                 # frames must be [0, 2)
    ledger.block("stranger", 0, (0, 2), final=True)
    ledger.end("f", "failed", 1, "boom")
    report = ledger.report()
    assert report["wrong_frames"] == 1 and report["unknown_request_ids"] == 1 and report["failed"] == 1
    assert report["errors"] == ["stream 0: boom"]


def _seed_with_every_event(n: int, min_blocks: int, max_blocks: int) -> int:
    for seed in range(500):
        plans = make_plan(n, seed, min_blocks, max_blocks, 1)
        if (any(p.cancel_after == 0 for p in plans) and any(p.cancel_after for p in plans)
                and any(p.blocks is None for p in plans) and any(p.prompt_timeline for p in plans)
                and any(p.live_switches for p in plans) and any(p.expected_blocks >= 6 for p in plans)):
            return seed
    raise AssertionError("no plan with every event")


def test_both_modes_account_for_every_block(tmp_path, capsys):
    # Blocks of 3 frames, window 12: a stream keeps history pages from its 5th block on.
    seed = _seed_with_every_event(6, 2, 7)
    threads = torch.get_num_threads()
    out, png = tmp_path / "serving.json", tmp_path / "serving.png"
    assert serving.main(["--streams", "1,6", "--reps", "1", "--warmup", "0", "--min-blocks", "2", "--max-blocks",
                         "7", "--stagger", "1", "--seed", str(seed), "--out", str(out), "--plot", str(png)]) == 0
    assert torch.get_num_threads() == threads
    assert png.stat().st_size > 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "serving" and report["config"]["streams"] == [1, 6]
    assert report["environment"]["device"]["type"] == "cpu"
    assert [(r["streams"], r["mode"]) for r in report["results"]] == \
        [(1, "batched"), (1, "one_at_a_time"), (6, "batched"), (6, "one_at_a_time")]
    for r in report["results"]:
        plan = report["plans"][str(r["streams"])]["summary"]
        acc = r["accounting"]
        assert acc["ok"], acc
        assert acc["blocks_received"] == acc["blocks_expected"] == plan["expected_blocks"] == r["blocks_per_run"]
        assert r["memory"]["back_to_baseline"], r["memory"]
        assert r["memory"]["after_last_stream"]["pages_used"] == r["memory"]["before"]["pages_used"]
        if r["streams"] == 6:
            assert r["memory"]["peak_pages_used"] > r["memory"]["before"]["pages_used"]
        assert r["blocks_per_s"]["median"] > 0 and r["blocks_per_cpu_s_median"] > 0
        assert r["block_latency_ms"]["p99"] >= r["block_latency_ms"]["p50"] > 0
        assert r["time_to_first_block_ms"]["samples"] == \
            sum(1 for s in report["plans"][str(r["streams"])]["streams"] if (s["cancel_after"] is None or
                                                                              s["cancel_after"] > 0))
        if r["mode"] == "one_at_a_time":
            assert r["max_batch_seen"] == 1
        else:
            assert 1 <= r["max_batch_seen"] <= r["streams"]
    summary = report["plans"]["6"]["summary"]
    assert summary["cancelled_before_first_block"] >= 1 and summary["endless"] >= 1
    assert summary["live_switches"] >= 1 and summary["timeline_switches"] >= 1
    checks = report["checks"]
    assert checks["accounting_ok"] and checks["zero_lost_or_duplicated_blocks"] and checks["memory_back_to_baseline"]
    assert isinstance(checks["batched_above_one_at_a_time_at_n_ge_4"], bool)
    assert [p["streams"] for p in report["paired"]] == [1, 6]
    assert all(len(p["per_rep"]) == len(p["per_rep_cpu_time"]) == 1 for p in report["paired"])
    assert "accounting ok: True" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--streams", "0"], ["--streams", "2,x"], ["--min-blocks", "5", "--max-blocks", "2"],
                                  ["--reps", "0"]], ids=["streams-0", "streams-x", "blocks", "reps"])
def test_bad_arguments_exit_2(argv, capsys):
    assert serving.main(argv) == 2
    assert "serving:" in capsys.readouterr().err
