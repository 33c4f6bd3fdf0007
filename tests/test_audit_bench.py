"""The audit benchmark still works end to end on both backends (tiny N, no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_audit_benchmark_smoke(postgres_server: str, tmp_path: Path) -> None:
    env = {**os.environ, "NOTIFY_TEST_POSTGRES_URL": postgres_server}
    cmd = [sys.executable, "-m", "benchmarks.audit", "--rows", "6000", "--queries", "10"]
    done = subprocess.run(
        [*cmd, "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "audit.json").read_text())
    assert results["config"] == {"rows": 6000, "queries": 10}
    for backend in ("sqlite", "postgres"):
        figures = results[backend]
        for name in ("ledger", "http", "page", "busy"):
            assert 0 < figures[name]["p50_ms"] <= figures[name]["p95_ms"], (backend, name)
        # About ten rows a ticket were found: the queries read what the fill wrote.
        assert 5 <= figures["rows_per_ticket_found"] <= 20
        # The ticket query uses the (ticket_id, at) index, on both databases.
        assert "ix_deliveries_ticket_at" in "\n".join(figures["plans"]["ticket"]), backend
        assert "ix_deliveries_ticket_at" in "\n".join(figures["plans"]["busy"]), backend
    assert "plan of ticket" in done.stdout
