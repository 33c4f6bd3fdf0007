"""Building mails: inline and in worker processes, keyed by notification, off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import uvloop

from service.core.directory import Contact
from service.core.routing import Kind, Notification
from service.delivery.build import (
    Built,
    InlineBuilder,
    MailFactory,
    MailSpec,
    NotBuilt,
    Rendered,
)
from service.delivery.workers import CHUNK_MAX, PooledBuilder, WorkerPool
from service.runtime.settings import default_templates_dir


def spec(store: Path) -> MailSpec:
    return MailSpec(
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
        (10, 1, [4, 6]),
        (10, 3, [4, 4, 2]),
        (20, 4, [4, 5, 5, 5, 1]),
        (200, 1, [4, 8, 16, 32, CHUNK_MAX, CHUNK_MAX, 200 - 188]),
        (300, 1, [4, 8, 16, 32, CHUNK_MAX, CHUNK_MAX, CHUNK_MAX, 300 - 252]),
    ],
)
def test_chunks_share_the_work_and_stay_small(
    tmp_path: Path, count: int, workers: int, sizes: list[int]
) -> None:
    pool = pooled(tmp_path, workers)
    try:
        ns = [notification(i) for i in range(count)]
        chunks = pool.pool.chunks(ns)
        assert [len(c) for c in chunks] == sizes
        assert [n for c in chunks for n in c] == ns
    finally:
        pool.close()


def renders_of(factory: MailFactory) -> list[str]:
    """The activity ids `factory` renders from now on (a spy on its `render`)."""
    renders: list[str] = []
    real = factory.render

    def counting(n: Notification) -> Any:
        renders.append(n.activity_id)
        return real(n)

    factory.render = counting  # type: ignore[method-assign]
    return renders


def pooled(store: Path, workers: int) -> PooledBuilder:
    return PooledBuilder(WorkerPool(spec(store), workers), InlineBuilder(spec(store).factory()))


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
    local = [spec(tmp_path).factory().build(n) for n in ns]
    pool = pooled(tmp_path, 1)
    renders = renders_of(pool.inline.factory)
    await pool.start()
    try:
        # A worker builds every mail, files and all (within a chunk's room for them).
        ahead = await pool.pool.build_chunk(ns)
        batch = pool.batch(ns)
        remote = [await batch.build(n) for n in ns]
        await batch.close()
    finally:
        pool.close()
    assert [type(o) for o in ahead] == [Built, Built, NotBuilt, NotBuilt, NotBuilt]
    assert renders == []
    assert [type(o) for o in remote] == [Built, Built, NotBuilt, NotBuilt, NotBuilt]
    assert [(o.failure.stage, o.missing) for o in remote if isinstance(o, NotBuilt)] == [
        ("attachment", True),
        ("attachment", False),
        ("attachment", False),
    ]
    for mine, theirs in zip(local, remote, strict=True):
        if isinstance(mine, Built) and isinstance(theirs, Built):
            # Same message but for the Date header, which is taken when built.
            assert _without_date(mine.data) == _without_date(theirs.data)
        else:
            assert replace(mine, render_seconds=0) == replace(theirs, render_seconds=0)


@pytest.mark.parametrize(
    "new_loop", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)
def test_two_workers_build_a_batch_on_either_event_loop(tmp_path: Path, new_loop: Any) -> None:
    # A mail of 1.4 MB arrives over the socket in many pieces; 150 mails make many chunks.
    (tmp_path / "large.bin").write_bytes(os.urandom(1 << 20))
    ns = [notification(i, "large.bin") if i % 50 == 0 else notification(i) for i in range(150)]
    roomy = replace(spec(tmp_path), max_attachment_bytes=2 << 20, max_mail_bytes=4 << 20)
    here = roomy.factory()
    local = [here.build(n) for n in ns]

    async def build() -> list[Any]:
        pool = WorkerPool(roomy, 2)
        await pool.start()
        try:
            chunks = await asyncio.gather(*(pool.build_chunk(c) for c in pool.chunks(ns)))
        finally:
            pool.close()
        return [outcome for chunk in chunks for outcome in chunk]

    with asyncio.Runner(loop_factory=new_loop) as runner:
        remote = runner.run(build())
    assert all(isinstance(o, Built) for o in remote)
    assert [_without_date(o.data) for o in remote] == [_without_date(o.data) for o in local]
    assert len(remote[50].data) > 1 << 20


async def test_a_bug_in_a_worker_reaches_its_caller_and_the_worker_goes_on(
    tmp_path: Path,
) -> None:
    pool = WorkerPool(spec(tmp_path), 1)
    await pool.start()
    try:
        with pytest.raises(AttributeError):
            await pool.build_chunk(["not a notification"])  # type: ignore[list-item]
        [outcome] = await pool.build_chunk([notification(1)])
    finally:
        pool.close()
    assert isinstance(outcome, Built)


def test_a_chunk_holds_attachments_up_to_its_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.delivery import workers

    (tmp_path / "a.pdf").write_bytes(b"a" * 600)
    (tmp_path / "b.pdf").write_bytes(b"b" * 600)
    monkeypatch.setattr(workers, "AHEAD_ATTACHMENT_BYTES", 1000)
    monkeypatch.setattr(workers, "_factory", spec(tmp_path).factory())
    ns = [notification(1, "a.pdf"), notification(2, "b.pdf"), notification(3), notification(4)]
    outcomes = workers._build_chunk(ns)
    # The second file would pass the room: that mail comes back rendered, for this process
    # to attach when it is sent; mails without files are built whatever the room.
    assert [type(o) for o in outcomes] == [Built, Rendered, Built, Built]
    built = outcomes[0]
    assert isinstance(built, Built)
    assert b"a.pdf" in built.data


async def test_a_batch_finds_each_mail_by_key_and_content(tmp_path: Path) -> None:
    first = notification(1)
    edited = replace(first, activity_text="edited text")  # same key, other content
    pool = pooled(tmp_path, 1)
    rendered_here = renders_of(pool.inline.factory)
    await pool.start()
    try:
        batch = pool.batch([first, edited, notification(2)])
        # One call ahead per key: the edited twin goes to a worker on its own, with its
        # own text.
        assert sorted(batch.ahead) == sorted([first.key, notification(2).key])
        built = [await batch.build(n) for n in (first, edited, notification(2))]
        await batch.close()
    finally:
        pool.close()
    assert rendered_here == []
    assert all(isinstance(b, Built) for b in built)
    texts = [b.data for b in built if isinstance(b, Built)]
    assert b"text 1" in texts[0]
    assert b"edited text" in texts[1]
    assert b"text 2" in texts[2]


async def test_a_follow_up_answering_a_mail_of_its_batch_is_not_built_again(
    tmp_path: Path,
) -> None:
    parent = notification(1)
    ahead = replace(notification(2), parent_activity_id="1")  # its parent's mail not sent yet
    # Once the parent's mail is out, the follow-up answers it.
    answering = ahead.evolve(in_reply_to="<a.1.customer_content.0123456789abcdef@helpdesk.test>")
    edited = replace(answering, activity_text="edited")  # not only the thread: built again
    pool = pooled(tmp_path, 1)
    calls: list[int] = []
    build_chunk = pool.pool.build_chunk

    async def counted(ns: Any) -> Any:
        calls.append(len(ns))
        return await build_chunk(ns)

    pool.pool.build_chunk = counted  # type: ignore[method-assign]
    await pool.start()
    try:
        batch = pool.batch([parent, ahead])
        built = [await batch.build(n) for n in (parent, answering)]
        again = pool.batch([ahead])
        rebuilt = await again.build(edited)
        await batch.close()
        await again.close()
    finally:
        pool.close()
    assert calls == [2, 1, 1]  # the batch's chunk; the second batch's chunk and the edit
    assert all(isinstance(b, Built) for b in (*built, rebuilt))
    local = spec(tmp_path).factory()
    for n, b in ((answering, built[1]), (edited, rebuilt)):
        expected = local.build(n)
        assert isinstance(expected, Built)
        assert isinstance(b, Built)
        assert _without_date(b.data) == _without_date(expected.data)
        assert b"In-Reply-To: <a.1.customer_content" in b.data


async def test_a_missing_attachment_is_retried_without_rendering_again(tmp_path: Path) -> None:
    builder = InlineBuilder(spec(tmp_path).factory())
    renders = renders_of(builder.factory)
    try:
        batch = builder.batch([])
        n = notification(7, "late.pdf")
        first = await batch.build(n)
        assert isinstance(first, NotBuilt)
        assert first.missing
        assert first.rendered is not None
        again = await batch.rebuild(n, first)
        assert isinstance(again, NotBuilt)
        assert again.missing
        (tmp_path / "late.pdf").write_bytes(b"%PDF-1.4 late")
        done = await batch.rebuild(n, again)
        assert isinstance(done, Built)
        assert b"late.pdf" in done.data
        assert renders == ["7"]
    finally:
        builder.close()


async def test_attachment_files_are_read_off_the_event_loop(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_bytes(b"fine")
    builder = InlineBuilder(spec(tmp_path).factory())
    threads: list[str] = []
    real = builder.factory.load

    def spying(refs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real(refs)

    builder.factory.load = spying  # type: ignore[method-assign]
    try:
        built = await builder.batch([]).build(notification(8, "ok.txt"))
    finally:
        builder.close()
    assert isinstance(built, Built)
    assert threads
    assert threads[0] != threading.main_thread().name
    assert threads[0].startswith("attachments")


def _without_date(data: bytes) -> bytes:
    return b"\r\n".join(line for line in data.split(b"\r\n") if not line.startswith(b"Date:"))


def test_workers_exit_when_the_service_is_killed(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, multiprocessing, sys
        from pathlib import Path
        from tests.test_build import pooled

        async def main() -> None:
            pool = pooled(Path({str(tmp_path)!r}), 2)
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
