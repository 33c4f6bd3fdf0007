"""Building mails in worker processes: chunking, outcomes, and workers that die with the service."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from service.core.directory import Contact
from service.core.routing import Kind, Notification
from service.delivery.prepare import CHUNK_MAX, NotPrepared, Prepared, PreparePool, PreparerSpec
from service.runtime.settings import default_templates_dir


def spec(store: Path) -> PreparerSpec:
    return PreparerSpec(
        templates_dir=default_templates_dir(),
        attachments_dir=store,
        max_attachment_bytes=1000,
        max_mail_bytes=2000,
        sender="Helpdesk <helpdesk@helpdesk.test>",
        reply_to=None,
        domain="helpdesk.test",
    )


def notification(i: int, *attachments: str) -> Notification:
    return Notification(
        kind=Kind.CUSTOMER_CONTENT,
        activity_id=str(i),
        ticket_id="1042",
        ticket_reference="T-1042",
        ticket_subject="Printer",
        customer_name="Dana",
        parent_activity_id=None,
        recipient=Contact(email="dana@customer.test", name="Dana", locale="en"),
        activity_text=f"text {i}",
        attachments=attachments,
    )


@pytest.mark.parametrize(
    ("count", "workers", "sizes"),
    [
        (0, 1, []),
        (1, 1, [1]),
        (10, 1, [10]),
        (10, 3, [4, 4, 2]),
        (200, 1, [CHUNK_MAX, CHUNK_MAX, CHUNK_MAX, 200 - 3 * CHUNK_MAX]),
    ],
)
def test_chunks_share_the_work_and_stay_small(
    tmp_path: Path, count: int, workers: int, sizes: list[int]
) -> None:
    pool = PreparePool(spec(tmp_path), workers)
    try:
        ns = [notification(i) for i in range(count)]
        chunks = pool.chunks(ns)
        assert [len(c) for c in chunks] == sizes
        assert [n for c in chunks for n in c] == ns
    finally:
        pool.close()


async def test_a_worker_gives_the_same_outcomes_as_this_process(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_bytes(b"fine")
    (tmp_path / "big.bin").write_bytes(b"x" * 1500)
    ns = [
        notification(1),
        notification(2, "ok.txt"),
        notification(3, "missing.pdf"),
        notification(4, "../escape"),
        notification(5, "big.bin"),
    ]
    local = [spec(tmp_path).create().prepare(n) for n in ns]
    pool = PreparePool(spec(tmp_path), 1)
    try:
        remote = await pool.prepare(ns)
    finally:
        pool.close()
    assert [type(o) for o in remote] == [Prepared, Prepared, NotPrepared, NotPrepared, NotPrepared]
    assert [(o.stage, o.missing) for o in remote if isinstance(o, NotPrepared)] == [
        ("attachment", True),
        ("attachment", False),
        ("attachment", False),
    ]
    for mine, theirs in zip(local, remote, strict=True):
        if isinstance(mine, Prepared) and isinstance(theirs, Prepared):
            # Same message but for the Date header, which is taken when built.
            assert _without_date(mine.data) == _without_date(theirs.data)
        else:
            assert mine == theirs


def _without_date(data: bytes) -> bytes:
    return b"\r\n".join(line for line in data.split(b"\r\n") if not line.startswith(b"Date:"))


def test_workers_exit_when_the_service_is_killed(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, multiprocessing, sys
        from pathlib import Path
        from tests.test_prepare import spec
        from service.delivery.prepare import PreparePool

        async def main() -> None:
            pool = PreparePool(spec(Path({str(tmp_path)!r})), 2)
            await pool.start()
            print(*(c.pid for c in multiprocessing.active_children()), flush=True)
            await asyncio.sleep(60)

        if __name__ == "__main__":
            asyncio.run(main())
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    workers: list[int] = []
    try:
        assert parent.stdout is not None
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) >= 2  # the pool's workers (and possibly a resource tracker)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.1)
        assert not [pid for pid in workers if _alive(pid)]
    finally:
        parent.kill()
        for pid in workers:  # when the assertion failed: leave no orphan behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: reaped only by init, once its parent is gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
