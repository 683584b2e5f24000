"""bench.report's pairing and goal verdicts (pure logic, no engine)."""

from __future__ import annotations

from bench import report


def _run(workload: str, target: str, repeat: int, **metrics: float) -> dict:
    return {"workload": workload, "target": target, "repeat": repeat, "metrics": metrics}


RUNS = [
    _run("c8", "A", 1, tok_s=1000.0, ttft_p50_ms=10.0),
    _run("c8", "B", 1, tok_s=990.0, ttft_p50_ms=12.0),
    _run("c8", "A", 2, tok_s=2000.0, ttft_p50_ms=10.0),
    _run("c8", "B", 2, tok_s=1800.0, ttft_p50_ms=11.0),
    _run("c8", "A", 3, tok_s=1500.0, ttft_p50_ms=20.0),
    _run("c8", "B", 3, tok_s=1470.0, ttft_p50_ms=30.0),
    _run("c8", "B", 4, tok_s=5000.0, ttft_p50_ms=1.0),  # no A in repeat 4: not paired
]


def test_values_are_paired_within_a_repeat_in_repeat_order():
    assert report.paired_values(RUNS, "c8", "B", "A", "tok_s", "ratio") == [0.99, 0.9, 0.98]
    assert report.paired_values(RUNS, "c8", "B", "A", "ttft_p50_ms", "diff") == [2.0, 1.0, 10.0]
    assert report.comparisons(RUNS)["c8"]["B/A"]["tok_s_ratio"] == 0.98  # their median


def test_spread_is_a_targets_own_range_over_repeats():
    assert report.spread(RUNS) == {"c8": (1000.0, 2000.0)}
    assert "c8 1000-2000 tok/s (max/min 2.00)" in report.noise_line(report.spread(RUNS))


def test_goal_rows_count_the_repeats_that_pass_on_their_own():
    comps = report.comparisons(RUNS)
    assert comps["c8"]["B/A"]["per_repeat"]["tok_s_ratio"] == [0.99, 0.9, 0.98]
    rows = {g["goal"]: g for g in report.goals(comps, {}, {})}
    thr = rows["B throughput/A c8"]
    assert (thr["value"], thr["verdict"], thr["repeats_passing"]) == (0.98, "PASS", [2, 3])
    ttft = rows["B TTFT p50 overhead c8 (ms)"]
    assert (ttft["value"], ttft["verdict"], ttft["repeats_passing"]) == (2.0, "PASS", [2, 3])
    table = report.table({}, comps, list(rows.values()))
    assert "PASS        2/3" in table
