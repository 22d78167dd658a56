"""A few-second smoke run of the benchmark code paths: the helpers, and ``python -m bench.run
--quick`` end to end (the servers, the verdict checks, the load generator, the report). No
timed assertions: benchmarks are measured by ``make bench``, never by the test suite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import run
from bench.common import DUNNO, REJECT, postfwd_rules, request_mix, sqlite_rules, verdict, yardstick
from bench.loadgen import _answer_end, ask_all, run_load
from bench.policy_bench import check_verdicts, start_floor, start_tlsgate

ROOT = Path(__file__).resolve().parents[2]


def test_verdict_keeps_action_and_status() -> None:
    assert verdict("action=REJECT 5.7.10 TLS required by connector p1") == REJECT
    assert verdict("action=DEFER 4.7.10 x") == "DEFER 4.7.10"
    assert verdict("action=DUNNO") == DUNNO


def test_request_mix_is_realistic_and_expects_reject_only_without_tls() -> None:
    mix = request_mix(100, 400)
    for request, expected in mix:
        attrs = dict(line.split("=", 1) for line in request.decode().strip().split("\n"))
        assert len(attrs) >= 30 and attrs["mail_version"] and request.endswith(b"\n\n")
        partner = attrs["sender"].split("@")[1].startswith("partner")
        assert (expected == REJECT) == (partner and not attrs["encryption_protocol"])
    assert {e for _, e in mix} == {REJECT, DUNNO}


def test_yardstick_times_the_work_it_names() -> None:
    one, more = yardstick(repeats=1, rounds=200), yardstick(repeats=3, rounds=2000)
    assert 0 < one < 1e4 and 0 < more < 1e4  # microseconds for one request's split, not seconds


def test_answer_framing() -> None:
    assert _answer_end(b"action=DUNNO\n\nx", False) == 14
    assert _answer_end(b"action=DUNNO\n", False) == -1
    assert _answer_end(b"5:OK ab,", True) == 8
    assert _answer_end(b"5:OK a", True) == -1


def test_postfwd_rules_one_per_connector(tmp_path: Path) -> None:
    text = postfwd_rules(tmp_path / "r.cf", 3).read_text().splitlines()
    assert len(text) == 3 and "sender=~@partner2\\.test$" in text[2] and "REJECT 5.7.10" in text[2]


def test_tlsgate_gives_expected_verdicts_and_floor_serves_load(tmp_path: Path) -> None:
    server = start_tlsgate(tmp_path, 50)
    try:
        ok, note = check_verdicts(server, 60)
        assert ok, note
        answers = ask_all(server.address, [r for r, _ in request_mix(50, 10)])
        assert all(a.startswith("action=") for a in answers)
    finally:
        server.child.stop()
    floor = start_floor(tmp_path)
    try:
        result = run_load(floor.address, 4, [r for r, _ in request_mix(10, 20)], processes=2,
                          max_requests=200, duration=5)
        assert result.requests > 0 and result.errors == 0 and len(result.latencies_us) == result.requests
    finally:
        floor.child.stop()


def test_sqlite_rules_counts(tmp_path: Path) -> None:
    import sqlite3

    sqlite_rules(tmp_path / "r.sqlite", 25, outbound=4)
    con = sqlite3.connect(tmp_path / "r.sqlite")
    assert con.execute("SELECT count(*) FROM inbound_connector").fetchone()[0] == 26
    assert con.execute("SELECT count(*) FROM inbound_address").fetchone()[0] == 25
    assert con.execute("SELECT count(*) FROM outbound_domain").fetchone()[0] == 4
    con.close()


def _quick(tmp_path: Path, parts: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--no-postgresql", "--parts", parts,
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "REPORT.md").exists()
    return json.loads((tmp_path / "results.json").read_text())["results"]


def test_quick_run_policy_scale_socketmap(tmp_path: Path) -> None:
    results = _quick(tmp_path, "1,3,4")
    tlsgate = [s for s in results["1"]["servers"] if s["kind"] == "tlsgate"]
    assert tlsgate and all(s["valid"] for s in tlsgate)
    assert all(rows for s in tlsgate for rows in s["results"].values())
    # The daemon's own CPU per request: it answered, so it spent some, and far less than a second.
    assert all(0 < row["server_cpu_us"] < 1e6 for s in tlsgate for rows in s["results"].values() for row in rows)
    assert results["3"]["databases"]["SQLite"]["load"][0]["inbound"] == 501
    assert all(t >= 0 for ts in results["3"]["change_applied_s"].values() for t in ts)
    assert results["4"]["results"]["500"]["1"][0]["rate"] > 0
    report = (tmp_path / "REPORT.md").read_text()
    assert "## 1. Policy daemon" in report and "## 3. Scale of rules" in report
    assert "| yardstick at start |" in report and "| yardstick at end |" in report
    assert "| 1,000 connectors within 10% of 10, 4 conns |" in report  # the targets, computed
    assert "| load 500 connectors from SQLite ≤ 3 s, < 300 MB |" in report


@pytest.mark.postfix
def test_quick_run_through_postfix(tmp_path: Path) -> None:
    results = _quick(tmp_path, "2")
    if "skipped" in results["2"]:
        pytest.skip(results["2"]["skipped"])
    for config, modes in results["2"]["results"].items():
        for rows in modes.values():
            assert rows[0]["accepted"] > 0 and rows[0]["failed"] == 0, config
    assert results["2"]["policyd_decisions"] > 0 and results["2"]["milter_decisions"] > 0
    rows = [row for modes in results["2"]["results"].values() for rows in modes.values() for row in rows]
    assert all(row["postfix_cpu_us"] >= 0 and row["addon_cpu_us"] >= 0 for row in rows)
    assert sum(row["postfix_cpu_us"] for row in rows) > 0  # the processes under Postfix's master were counted
    assert all(row["addon_cpu_us"] == 0 for row in results["2"]["results"]["postfix alone"]["1"])


def test_targets_are_judged_from_the_medians() -> None:
    def server(kind: str, connectors: int, *rates: float) -> dict[str, object]:
        rows = [{"rate": r, "p99_ms": 1.5} for r in rates]
        return {"kind": kind, "connectors": connectors, "valid": True, "results": {"16": rows}}

    results = {"1": {"servers": [server("floor", 0, 100, 100, 100), server("tlsgate", 10, 60, 70, 90),
                                 server("tlsgate", 100_000, 60, 62, 99), server("postfwd1", 10, 7, 7, 7)]}}
    table = "\n".join(run.targets_md(results))
    assert "| tlsgate-policyd (10 connectors) ≥ 0.6x the floor, 16 conns | 0.70x | yes |" in table
    assert "| tlsgate-policyd (10 connectors) ≥ 10x postfwd1, 10 rules, 16 conns | 10.00x | yes |" in table
    assert "| 100,000 connectors within 10% of 10, 16 conns | 0.89 | **no** |" in table
    assert "| p99 < 2 ms at 16 conns | 1.50 ms | yes |" in table
    assert run.targets_md({}) == []


def test_runs_taken_in_turn_show_their_ratios_range() -> None:
    def rows(*rates: float) -> list[dict[str, float]]:
        return [{"rate": r, "p99_ms": 1.0} for r in rates]

    servers = [{"kind": "floor", "connectors": 0, "valid": True, "results": {"16": rows(100, 200, 100)}},
               {"kind": "tlsgate", "connectors": 10, "valid": True, "results": {"16": rows(50, 70, 90)}},
               {"kind": "postfwd1", "connectors": 10, "valid": True, "results": {"16": rows(5, 7, 9)}}]
    results = {"1": {"interleaved": True, "servers": servers},
               "2": {"results": {"postfix alone": {"1": rows(100, 100, 100)},
                                 "tlsgate-policyd": {"1": rows(90, 98, 104)}}}}
    table = "\n".join(run.targets_md(results))
    # The median's ratio decides; the runs paired one by one give the range (0.5, 0.35, 0.9).
    assert "| ≥ 0.6x the floor, 16 conns | 0.70x (run by run 0.35x–0.90x) | yes |" in table.replace(
        "tlsgate-policyd (10 connectors) ", "")
    # postfwd takes its runs on its own: no pairs, no range.
    assert "| tlsgate-policyd (10 connectors) ≥ 10x postfwd1, 10 rules, 16 conns | 10.00x | yes |" in table
    assert "| tlsgate-policyd ≥ 97% of postfix alone, 1 per connection | 98% (run by run 90%–104%) | yes |" in table
    part2 = "\n".join(run.part2_md({"runs": 3, "messages": 10, "processes": 1, **results["2"]}))
    assert "| tlsgate-policyd | 1 | 98.0 (90.0–104.0) | 0.98 (run by run 0.90–1.04) |\n" in part2
    assert "| postfix alone | 1 | 100.0 (100.0–100.0) | 1.00 |\n" in part2
    # With the CPU that Postfix and the add-on spent per message, two more columns.
    for config, extra in (("postfix alone", 0), ("tlsgate-policyd", 100)):
        for i, row in enumerate(results["2"]["results"][config]["1"]):
            row.update(postfix_cpu_us=3000 + 10 * i + extra, addon_cpu_us=extra + i)
    part2 = "\n".join(run.part2_md({"runs": 3, "messages": 10, "processes": 1, **results["2"]}))
    assert "| postfix alone | 1 | 100.0 (100.0–100.0) | 1.00 | 3,010 (3,000–3,020) | – |" in part2
    assert "| tlsgate-policyd | 1 | 98.0 (90.0–104.0) | 0.98 (run by run 0.90–1.04) | 3,110 (3,100–3,120) | 101 (100–102) |" in part2
