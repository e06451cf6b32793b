"""benchmarks/compare_revisions.py's table and verdict on synthetic timings (no suite run)."""
import json

import pytest

from benchmarks import compare_revisions as cr

MS = 1e-3


def _rounds(per_key: dict) -> list[dict]:
    """{key: [t_round0, t_round1, ...]} -> one {key: t} per round."""
    n = len(next(iter(per_key.values())))
    return [{k: v[i] for k, v in per_key.items() if v[i] is not None} for i in range(n)]


def _row(summary, key):
    return next(r for r in summary["rows"] if r["contender"] == key)


def test_slower_only_beyond_the_spread():
    a = _rounds({"bench_step/optimizers/sgd/steps/mmmod:cpu": [10 * MS, 10.2 * MS, 9.8 * MS],
                 "bench_modulate/cases/x/contenders/cpu": [10 * MS, 11 * MS, 9 * MS],
                 "bench_modulate/cases/x/contenders/paper": [70 * MS, 70 * MS, 70 * MS]})
    b = _rounds({"bench_step/optimizers/sgd/steps/mmmod:cpu": [12 * MS, 12.1 * MS, 11.9 * MS],
                 "bench_modulate/cases/x/contenders/cpu": [11 * MS, 10.5 * MS, 11.5 * MS],
                 "bench_modulate/cases/x/contenders/paper": [50 * MS, 50 * MS, 50 * MS]})
    s = cr.summarize(a, b)
    step = _row(s, "bench_step/optimizers/sgd/steps/mmmod:cpu")
    # 20 % slower, each side spreads 4 % / 1.7 %: beyond the spread
    assert step["ratio_b_over_a"] == pytest.approx(1.2)
    assert step["spread"] == pytest.approx(0.04)
    assert step["verdict"] == "slower" and step["library"]
    mod = _row(s, "bench_modulate/cases/x/contenders/cpu")
    # 10 % slower but A alone spreads 20 %: not flagged
    assert mod["ratio_b_over_a"] == pytest.approx(1.1) and mod["spread"] == pytest.approx(0.2)
    assert mod["verdict"] == "within spread"
    paper = _row(s, "bench_modulate/cases/x/contenders/paper")
    assert paper["verdict"] == "faster" and not paper["library"]
    assert s["slower"] == s["slower_library"] == ["bench_step/optimizers/sgd/steps/mmmod:cpu"]
    assert s["faster"] == ["bench_modulate/cases/x/contenders/paper"]


def test_equal_times_and_a_single_round():
    s = cr.summarize([{"k/cpu": 5 * MS}], [{"k/cpu": 5 * MS}])
    assert _row(s, "k/cpu")["verdict"] == "within spread"
    s = cr.summarize([{"k/cpu": 5 * MS}], [{"k/cpu": 5.05 * MS}])  # no spread from one round
    assert _row(s, "k/cpu")["verdict"] == "slower"


def test_medians_resist_one_outlier_round_and_missing_contenders_are_listed():
    a = _rounds({"k/cpu": [10 * MS, 10 * MS, 10 * MS, 10 * MS, 10 * MS], "old/cpu": [1 * MS] * 5})
    b = _rounds({"k/cpu": [10 * MS, 10 * MS, 30 * MS, 10 * MS, 10 * MS]})
    b = [dict(r, **{"new/cpu": MS}) for r in b]
    s = cr.summarize(a, b)
    row = _row(s, "k/cpu")
    assert row["median_b_s"] == pytest.approx(10 * MS) and row["max_b_s"] == pytest.approx(30 * MS)
    assert row["verdict"] == "within spread"
    assert s["only_a"] == ["old/cpu"] and s["only_b"] == ["new/cpu"]
    # a contender absent from one round is compared over the rounds that have it
    b[1].pop("k/cpu")
    assert _row(cr.summarize(a, b), "k/cpu")["rounds_b"] == 4


def test_timings_and_disagreements_walk_a_suite_document(tmp_path):
    doc = {"env": {"x": {"median_s": 9.0}},
           "cases": [{"workload": "w", "mode": "ogm", "contenders": {
               "cpu": {"median_s": 0.5, "agrees": True},
               "paper": {"median_s": 2.0, "agrees": False, "interleaved": {"median_s": 2.5}}}}],
           "optimizers": {"sgd": {"steps": {"mmmod:cpu fused": {"median_s": 0.1}}}}}
    (tmp_path / "bench_x_cpu.json").write_text(json.dumps(doc))
    (tmp_path / "bench_x_cuda.json").write_text(json.dumps(doc))  # another device: not read
    times, bad = cr.collect(str(tmp_path))
    assert times == {"bench_x/cases/workload=w,mode=ogm/contenders/cpu": 0.5,
                     "bench_x/cases/workload=w,mode=ogm/contenders/paper": 2.0,
                     "bench_x/cases/workload=w,mode=ogm/contenders/paper/interleaved": 2.5,
                     "bench_x/optimizers/sgd/steps/mmmod:cpu fused": 0.1}
    assert bad == ["bench_x/cases/workload=w,mode=ogm/contenders/paper"]
    assert cr.is_library("bench_x/optimizers/sgd/steps/mmmod:cpu fused")
    assert not cr.is_library("bench_x/cases/workload=w,mode=ogm/contenders/paper/interleaved")


def test_markdown_names_the_verdict_the_commits_and_every_row():
    a = _rounds({"s/mmmod:cpu": [10 * MS, 10 * MS], "s/paper": [50 * MS, 52 * MS]})
    b = _rounds({"s/mmmod:cpu": [13 * MS, 13 * MS], "s/paper": [51 * MS, 50 * MS]})
    meta = {"a": {"commit": "aaaa", "path": "/a"}, "b": {"commit": "bbbb", "path": "/b"},
            "rounds": 2, "date": "2026-12-06", "nproc": 2, "loadavg": "A1 1.0/1.2"}
    md = cr.markdown(cr.summarize(a, b), meta)
    assert "`aaaa`" in md and "`bbbb`" in md and "A1 1.0/1.2" in md
    assert "1 of 1 mmmod contenders slower than A beyond the run-to-run spread (s/mmmod:cpu)" in md
    row = next(line for line in md.splitlines() if line.startswith("| s/mmmod:cpu"))
    assert "| 1.300 |" in row and row.rstrip().endswith("| slower |")
    assert next(line for line in md.splitlines() if line.startswith("| s/paper")).rstrip().endswith(
        "| within spread |")
