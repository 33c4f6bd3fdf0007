"""The benchmark harness still works end to end (tiny N, no timing assertions)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# No skips: .ci/run installs postfix and scripts/bootstrap the bench extra, so a missing
# piece is a failure here, not a silently skipped test.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_bench_smoke(kafka_bootstrap: str, tmp_path: Path) -> None:
    assert shutil.which("smtp-sink") or Path("/usr/sbin/smtp-sink").exists(), (
        "needs Postfix's smtp-sink (Debian package postfix)"
    )
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--smoke",
        "--bootstrap",
        kafka_bootstrap,
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=110, check=False)
    assert done.returncode == 0, done.stdout + done.stderr

    results = json.loads((out / "results.json").read_text())
    notifications = results["config"]["notifications"]
    assert notifications > 0
    for phase in ("ceiling", "naive", "service"):
        assert results[phase]["rate"] > 0, phase
        assert results[phase]["cpu_ms_per_notification"] > 0, phase
    assert results["ceiling"]["accepted_by_sink"] == results["ceiling"]["messages"]
    assert results["naive"]["accepted_by_sink"] == results["naive"]["messages"]
    # The physical line: Postfix's smtp-source into the same sink.
    assert results["source"]["accepted_by_sink"] == results["source"]["messages"] > 0
    service = results["service"]
    assert service["notifications"] == notifications
    assert service["sent_metric"] == notifications
    assert service["dead_letters_metric"] == 0
    assert service["peak_rss_mb"] > 0
    latency = results["latency"]
    assert latency["stamped"] == latency["notifications"] > 0
    assert 0 < latency["p50_ms"] <= latency["p99_ms"]
    assert {"c_over_a", "c_over_b", "c_over_source"} <= results["summary"].keys()
    assert (out / "results.png").read_bytes().startswith(b"\x89PNG")
    assert "(c) service" in done.stdout


def test_link_smoke() -> None:
    """The pool over a delaying relay, this checkout against itself (benchmarks/link.py):
    every mail reaches smtp-sink, through the relay and without it."""
    cmd = [sys.executable, "-m", "benchmarks.link", "--baseline", str(REPO)]
    cmd += ["--rtt-ms", "0,1", "--mails", "30", "--rounds", "1"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=110, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("RTT ")]
    assert [line.split(",")[0] for line in lines] == ["RTT 0 ms", "RTT 1 ms"]
    assert all("this / baseline" in line for line in lines)


def test_the_launcher_s_probes_still_find_what_they_patch(tmp_path: Path) -> None:
    """`benchmarks.run --experiments` patches service methods by name (benchmarks/serve.py):
    a renamed method must fail here, not in the middle of someone's measurement. Run in a
    child process, since the patches are global."""
    code = (
        "import sys; from benchmarks import serve\n"
        "serve._waits(sys.argv[1]); serve._timeline(sys.argv[2])\n"
        "serve._no_css_inline(); serve._batch_timeout(5)\n"
    )
    cmd = [sys.executable, "-c", code, str(tmp_path / "waits"), str(tmp_path / "timeline")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def test_the_timeline_summary_of_two_batches() -> None:
    """`python -m benchmarks.timeline`: offsets from each batch's start, stage durations,
    the gap between batches and the records' ages, from the probe's lines."""
    from benchmarks.timeline import report, summarise

    lines = []
    for start, claim in ((10.0, 0.004), (10.030, 0.006)):
        lines += [f"{start:.6f} handle+", f"{start + 0.001:.6f} age 12.0 taken"]
        lines += [f"{start + 0.001:.6f} age 30.0 caught-up"]
        lines += [f"{start + 0.002:.6f} claim+", f"{start + 0.002 + claim:.6f} claim-"]
        lines += [f"{start + 0.020:.6f} handle-"]
    summary = summarise(lines, skip=0)
    assert summary.batches == 2
    assert summary.first["claim+"] == pytest.approx(2.0)
    assert summary.duration["claim"][0] == pytest.approx(5.0)  # the median of 4 and 6 ms
    assert summary.gap_ms == pytest.approx(10.0)
    assert summary.ages["taken"] == (2, 12.0, 12.0)
    assert summary.ages["all"][:2] == (4, 21.0)
    assert "claim+" in report(summary)
    # Skipped batches' records are left out of the ages too.
    assert summarise(lines, skip=1).ages["all"][0] == 2


def test_build_smoke() -> None:
    """A render worker's work alone, this checkout against itself (benchmarks/build.py)."""
    cmd = [sys.executable, "-m", "benchmarks.build", "--baseline", str(REPO)]
    cmd += ["--events", "40", "--rounds", "1"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=110, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["this", "baseline"]
    assert all(float(line.split(": ")[1].split()[0]) > 0 for line in lines[:2])
    assert lines[2].startswith("this / baseline, best rounds: ")


def test_build_smoke_through_a_worker_pool() -> None:
    """The hand-off to render workers alone (benchmarks/build.py --workers)."""
    cmd = [sys.executable, "-m", "benchmarks.build", "--baseline", str(REPO), "--workers", "2"]
    cmd += ["--events", "40", "--rounds", "1"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=110, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["this", "baseline"]
    for line in lines[:2]:
        here, there = line.split("per mail")[0], line.split("in its workers ")[1]
        assert float(here.split(": ")[1].split()[0]) > 0
        assert float(there) > 0  # the workers built the mails: they spent the CPU
    assert lines[2].startswith("this / baseline, best rounds: ")


def test_ledger_flood_smoke(tmp_path: Path) -> None:
    """The recipient limit's count under a flood (benchmarks/ledger.py --flood), on SQLite:
    a claim with each count of throttled rows is timed, and the rows are really there."""
    import asyncio

    from benchmarks.ledger import FLOODED, flood
    from service.delivery.ledger import LedgerConfig
    from tests.ledger_support import run_sql

    url = f"sqlite:///{tmp_path / 'flood.sqlite3'}"
    figures = asyncio.run(flood(url, LedgerConfig(), [0, 1200]))
    assert set(figures) == {"claim_ms_at_0", "claim_ms_at_1200"}
    assert all(ms > 0 for ms in figures.values())
    counts = run_sql(
        url, "SELECT status, count(*) FROM deliveries WHERE recipient = ? GROUP BY 1", (FLOODED,)
    )
    # 1,200 throttled; of the 90 claims to the address (9 in each of 5 rounds at each of
    # two sizes), the limit of 30 an hour granted 30: every claim counted its hour
    assert dict(counts) == {"throttled": 1200, "claimed": 30}
