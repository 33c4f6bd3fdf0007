"""Tests of the bridge: the pure cursor, a simulated backend with crashes, then the real broker."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import email.utils
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from devkit.topics import read_topic
from service.cli.producer import add_producer_commands
from service.core.backoff import backoff_delay
from service.producer.backend import BackendClient, BackendError, TicketsUnsupported, format_since
from service.producer.bridge import Bridge, BridgeMetrics, BridgeSettings
from service.producer.cursor import (
    Cursor,
    CursorError,
    CursorFile,
    Seen,
    begin_round,
    classify,
    commit_page,
    content_digest,
    dump_cursor,
    event_id_for,
    finish_phase,
    initial_cursor,
    load_cursor,
    pageable,
    published_before,
)
from service.producer.publisher import Outgoing, Publisher
from tests.fake_backend import FakeBackend
from tests.test_publisher import parsed

T0 = dt.datetime(2026, 11, 27, 9, 0, tzinfo=dt.UTC)
OVERLAP = dt.timedelta(seconds=60)
CUSTOMER = {"name": "Dana Smith", "email": "dana@customer.test", "locale": "de"}


def activity(number: int, version: int = 1, ticket: str = "1042") -> dict[str, Any]:
    # updateText carries the version, so events can be counted by (activity id, version).
    return {"id": str(number), "ticketID": ticket, "updateText": f"v{version}"}


# --- the pure cursor ------------------------------------------------------------------------


def test_a_fresh_cursor_starts_now_less_the_overlap_or_where_told() -> None:
    assert initial_cursor(T0, OVERLAP, None).since == T0 - OVERLAP
    earlier = T0 - dt.timedelta(days=1)
    assert initial_cursor(T0, OVERLAP, earlier) == Cursor(since=earlier, covered=earlier)


def test_classify_tells_created_updated_and_unchanged() -> None:
    cursor = begin_round(initial_cursor(T0, OVERLAP, None), T0)
    assert cursor.phase == "created"
    assert classify(cursor, "1", "a", created=False) == "created"
    cursor = commit_page(cursor, 1, {"1": Seen("a", T0.timestamp())})
    assert published_before(cursor, "1")
    assert classify(cursor, "1", "a", created=False) is None
    assert classify(cursor, "1", "b", created=False) == "updated"
    cursor = finish_phase(cursor, OVERLAP)
    assert cursor.phase == "updated"
    assert classify(cursor, "2", "x", created=False) == "updated"  # an older one, edited
    assert classify(cursor, "2", "x", created=True) == "created"  # createdSince lists it
    assert classify(cursor, "1", "c", created=True) == "updated"  # published before
    # An activity that was invalid is "created" once it becomes valid.
    invalid = commit_page(cursor, 3, {"3": Seen("i", T0.timestamp(), published=False)})
    assert not published_before(invalid, "3")
    assert classify(invalid, "3", "i", created=True) is None
    assert classify(invalid, "3", "fixed", created=True) == "created"


def test_commit_page_moves_after_the_page() -> None:
    cursor = begin_round(initial_cursor(T0, OVERLAP, None), T0)
    cursor = commit_page(cursor, 7, {"5": Seen("a", 1.0), "7": Seen("b", 1.0)})
    assert (cursor.after_id, set(cursor.seen)) == (7, {"5", "7"})
    assert commit_page(cursor, 3, {}).after_id == 7


def test_a_round_ends_at_its_start_less_the_overlap_and_prunes_the_window() -> None:
    started = T0 + dt.timedelta(minutes=10)
    cursor = begin_round(initial_cursor(T0, OVERLAP, None), started)
    assert begin_round(cursor, started + dt.timedelta(hours=1)) == cursor  # resumed: kept
    old = Seen("old", (started - 3 * OVERLAP).timestamp())
    recent = Seen("new", (started - OVERLAP).timestamp())
    cursor = commit_page(cursor, 2, {"1": old, "2": recent})
    cursor = finish_phase(finish_phase(cursor, OVERLAP), OVERLAP)
    assert cursor.round_started is None
    assert (cursor.since, cursor.covered) == (started - OVERLAP, started)
    assert (cursor.phase, cursor.after_id) == ("created", None)
    assert cursor.seen == {"2": recent}
    with pytest.raises(ValueError):
        finish_phase(cursor, OVERLAP)


def test_pageable_orders_by_integer_id_after_the_cursor() -> None:
    records = [{"id": "10"}, {"id": 3}, {"id": "x"}, {"id": True}, {"id": "2"}, {}]
    numbered, unnumbered = pageable(records, None)
    assert [n for n, _ in numbered] == [2, 3, 10]
    assert unnumbered == [2, 3, 5]
    assert [n for n, _ in pageable(records, 3)[0]] == [10]


def test_digest_and_event_id_follow_the_content() -> None:
    assert content_digest({"a": 1, "b": 2}) == content_digest({"b": 2, "a": 1})
    assert content_digest({"a": 1}) != content_digest({"a": 2})
    assert event_id_for("1", "created", "d") == event_id_for("1", "created", "d")
    assert event_id_for("1", "created", "d") != event_id_for("1", "updated", "d")


_times = st.datetimes(timezones=st.just(dt.UTC))
_seen = st.dictionaries(
    st.from_regex(r"[0-9]{1,6}", fullmatch=True),
    st.builds(Seen, st.text(min_size=1), st.floats(0, 2e9), st.booleans()),
)


@given(
    st.builds(Cursor, since=_times, covered=_times, seen=_seen)  # between rounds
    | st.builds(
        Cursor,
        since=_times,
        covered=_times,
        round_started=_times,
        phase=st.sampled_from(["created", "updated"]),
        after_id=st.none() | st.integers(min_value=0, max_value=2**63),
        seen=_seen,
    )
)
def test_the_cursor_file_format_round_trips(cursor: Cursor) -> None:
    assert load_cursor(json.loads(json.dumps(dump_cursor(cursor)))) == cursor


def test_cursor_file_saves_atomically_and_refuses_garbage(tmp_path: Path) -> None:
    store = CursorFile(tmp_path / "sub" / "cursor.json")
    assert store.load() is None
    cursor = commit_page(
        begin_round(initial_cursor(T0, OVERLAP, None), T0), 4, {"4": Seen("d", 1.0)}
    )
    store.save(cursor)
    assert store.load() == cursor
    assert [p.name for p in store.path.parent.iterdir()] == ["cursor.json"]
    store.path.write_text('{"version": 1, "since": "yesterday"}')
    with pytest.raises(CursorError):
        store.load()


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    assert backoff_delay(0, 1.0, 60.0, rand=lambda: 0.0) == 0.5
    assert backoff_delay(2, 1.0, 60.0, rand=lambda: 1.0) == 4.0
    assert backoff_delay(50, 1.0, 60.0, rand=lambda: 1.0) == 60.0
    assert 30.0 <= backoff_delay(50, 1.0, 60.0) <= 60.0


def test_since_is_floored_to_the_second_in_utc() -> None:
    moment = dt.datetime(
        2026, 11, 27, 10, 15, 30, 999_000, tzinfo=dt.timezone(dt.timedelta(hours=1))
    )
    assert format_since(moment) == "2026-11-27T09:15:30Z"


# --- the HTTP client -------------------------------------------------------------------------


def client_for(handler: Callable[[httpx.Request], httpx.Response], **options: Any) -> BackendClient:
    return BackendClient("http://backend.test/", transport=httpx.MockTransport(handler), **options)


async def test_listing_sends_the_filters_and_auth_and_reads_the_backend_clock() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        date = {"Date": "Fri, 27 Nov 2026 08:59:58 GMT"}
        return httpx.Response(200, json={"items": [{"id": "3"}, "junk"]}, headers=date)

    async with client_for(handler, auth_header="X-Key", auth_value=SecretStr("k")) as client:
        listing = await client.list_activities("updatedSince", T0, 12)
    assert listing.records == [{"id": "3"}]
    assert listing.server_time == T0 - dt.timedelta(seconds=2)
    assert seen[0].url.path == "/backend/api/v1/ticketActivities/"
    assert dict(seen[0].url.params) == {"updatedSince": "2026-11-27T09:00:00Z", "idAfter": "12"}
    assert seen[0].headers["X-Key"] == "k"


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(500, json=[]),
        httpx.Response(200, text="<html>"),
        httpx.Response(200, json={"error": "x"}),
        httpx.ConnectTimeout("slow"),
    ],
)
async def test_listing_failures_are_backend_errors(answer: Any) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if isinstance(answer, Exception):
            raise answer
        return answer

    async with client_for(handler) as client:
        with pytest.raises(BackendError):
            await client.list_activities("createdSince", T0, None)


async def test_ticket_lookup_tells_missing_endpoint_from_missing_ticket() -> None:
    answers: list[httpx.Response] = []
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.raw_path.decode())
        return answers.pop(0)

    ticket = {"id": "1042", "reference": "T-1042", "customer": CUSTOMER}
    async with client_for(handler) as client:
        answers.append(httpx.Response(404, json={}))
        with pytest.raises(TicketsUnsupported):  # never found one: no such endpoint
            await client.ticket("1042")
    async with client_for(handler) as client:
        answers.extend([httpx.Response(200, json=ticket), httpx.Response(404, json={})])
        found = await client.ticket("1042")
        assert found is not None
        assert found.customer is not None
        assert await client.ticket("a/b") is None  # this ticket is missing
        answers.append(httpx.Response(200, json={"id": "7", "reference": "T-7"}))
        assert await client.ticket("7") is None  # no customer: leave data.ticket out
        answers.append(httpx.Response(503, json={}))
        with pytest.raises(BackendError):
            await client.ticket("7")
        answers.append(httpx.Response(405, json={}))
        with pytest.raises(TicketsUnsupported):
            await client.ticket("7")
    assert paths[2] == "/backend/api/v1/tickets/a%2Fb"


async def test_created_among_pages_through_capped_answers() -> None:
    backend = FakeBackend(page_cap=1, clock=lambda: T0)
    for number in range(1, 6):
        backend.add(activity(number))
    backend.add(activity(6), at=T0 - dt.timedelta(hours=1))

    def handler(request: httpx.Request) -> httpx.Response:
        status, body = backend.respond(request.url.path, dict(request.url.params), {})
        return httpx.Response(status, json=body)

    async with client_for(handler) as client:
        assert await client.created_among(T0, {2, 4, 6}) == {2, 4}
    assert [r.query.get("idAfter") for r in backend.requests] == ["1", "2", "3", "4", "5"]


def test_the_bridge_command_names_a_missing_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("NOTIFY_BRIDGE_BACKEND_URL", raising=False)
    parser = argparse.ArgumentParser(prog="notifier")
    add_producer_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bridge"])
    assert args.func(args) == 2
    assert "NOTIFY_BRIDGE_BACKEND_URL: not set" in capsys.readouterr().err


# --- the whole bridge against a simulated backend, with kills between pages -----------------


class Killed(BaseException):
    """The bridge process dies here (not an Exception: nothing in the bridge catches it)."""


@dataclass
class Sim:
    """A simulated clock, the fake backend behind an in-memory transport, and Kafka as a list."""

    backend: FakeBackend
    now: dt.datetime = T0
    date_header: bool = True
    published: list[tuple[str, str, str, str]] = field(
        default_factory=list
    )  # id, type, text, event id
    stored: dict[str, Any] = field(default_factory=dict)
    during_listing: list[Callable[[], None]] = field(default_factory=list)
    kill_at_listing: int | None = None
    listings: int = 0

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/ticketActivities/"):
            self.listings += 1
            if self.kill_at_listing == self.listings:
                self.kill_at_listing = None
                raise Killed
            if self.during_listing:
                self.during_listing.pop(0)()  # a change while the round is in progress
        query = dict(request.url.params)
        status, body = self.backend.respond(request.url.path, query, dict(request.headers))
        headers = {}
        if self.date_header:
            headers["Date"] = email.utils.format_datetime(self.backend.now(), usegmt=True)
        return httpx.Response(status, json=body, headers=headers)


class ListPublisher:
    def __init__(self, sim: Sim) -> None:
        self.sim = sim

    async def send(self, events: list[Outgoing]) -> list[Any]:
        for e in events:
            event = json.loads(e.value)
            text = event["data"]["activity"]["updateText"]
            self.sim.published.append((e.activity_id, event["type"], text, e.event_id))
        return []


class DictStore:
    def __init__(self, sim: Sim) -> None:
        self.sim = sim

    def load(self) -> Cursor | None:
        return load_cursor(self.sim.stored["cursor"]) if self.sim.stored else None

    def save(self, cursor: Cursor) -> None:
        self.sim.stored["cursor"] = json.loads(json.dumps(dump_cursor(cursor)))


def sim_bridge(sim: Sim, page_size: int, store: Any = None) -> Bridge:
    config = BridgeSettings(
        backend_url="http://backend.test",
        overlap_seconds=5,
        page_size=page_size,
        enrich_tickets=False,
    )
    client = BackendClient(config.backend_url, transport=httpx.MockTransport(sim.handle))
    return Bridge(
        config, client, ListPublisher(sim), store or DictStore(sim),
        BridgeMetrics(CollectorRegistry()),
        clock=lambda: sim.now,
    )  # fmt: skip


Step = tuple[str, int]
steps = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 3)),  # n activities at the same instant
        st.tuples(st.just("update"), st.integers(0, 50)),
        st.tuples(st.just("tick"), st.integers(0, 3)),  # seconds
        st.tuples(st.just("poll"), st.integers(0, 6)),  # kill at this listing (0: none)
        st.tuples(st.just("change_during_poll"), st.integers(0, 50)),
    ),
    max_size=40,
)


@given(
    steps=steps,
    page_size=st.integers(1, 4),
    page_cap=st.sampled_from([None, 1, 2, 3]),
    since_mode=st.sampled_from(["inclusive", "exclusive"]),
    updated_on_create=st.booleans(),
    date_header=st.booleans(),
    skew=st.integers(-30, 30),  # seconds the backend's clock is ahead (+) or behind (-)
)
def test_no_skip_and_no_repeat_across_kills_between_pages(
    steps: list[Step],
    page_size: int,
    page_cap: int | None,
    since_mode: Any,
    updated_on_create: bool,
    date_header: bool,
    skew: int,
) -> None:
    asyncio.run(
        simulate(steps, page_size, page_cap, since_mode, updated_on_create, date_header, skew)
    )


async def simulate(
    steps: list[Step],
    page_size: int,
    page_cap: int | None,
    since_mode: Any,
    updated_on_create: bool,
    date_header: bool,
    skew: int,
) -> None:
    backend = FakeBackend(
        since=since_mode,
        updated_on_create=updated_on_create,
        page_cap=page_cap,
        clock=lambda: sim.now,
        # Without a Date header only the overlap (5 s) absorbs a backend clock behind ours.
        clock_offset=skew if date_header else max(skew, -4),
    )
    sim = Sim(backend, date_header=date_header)
    versions: dict[int, int] = {}

    def add(count: int) -> None:
        for _ in range(count):
            number = len(versions) + 1
            versions[number] = 1
            sim.backend.add(activity(number))

    def update(pick: int) -> None:
        if versions:
            number = sorted(versions)[pick % len(versions)]
            versions[number] += 1
            sim.backend.update(number, updateText=f"v{versions[number]}")

    bridge = sim_bridge(sim, page_size)
    await bridge.load()
    for kind, arg in steps:
        if kind == "add":
            add(arg)
        elif kind == "update":
            update(arg)
        elif kind == "tick":
            sim.now += dt.timedelta(seconds=arg)
        elif kind == "change_during_poll":
            sim.during_listing.append(lambda arg=arg: update(arg) if arg % 2 else add(1))
        else:
            sim.listings, sim.kill_at_listing = 0, arg or None
            try:
                await bridge.poll()
            except Killed:
                bridge = sim_bridge(sim, page_size)  # restarted from the cursor store
            sim.kill_at_listing = None
    sim.during_listing.clear()
    for _ in range(3):  # quiet: later rounds must find everything
        sim.now += dt.timedelta(seconds=6)
        await bridge.poll()

    published = Counter((a, text) for a, _, text, _ in sim.published)
    assert [key for key, n in published.items() if n > 1] == []  # no repeat
    final = {(str(n), f"v{v}") for n, v in versions.items()}
    assert final <= set(published)  # no skip: every activity's last content went out
    first_type: dict[str, str] = {}
    for activity_id, kind, _, _ in sim.published:
        first_type.setdefault(activity_id, kind)
    # Every activity was created after the bridge started: its first event says "created",
    # also when it was created mid-round or while the bridge was down.
    assert set(first_type.values()) <= {"ticketActivity.created"}


async def test_a_kill_after_kafka_acked_but_before_the_cursor_repeats_with_the_same_ids() -> None:
    sim = Sim(FakeBackend(page_cap=2, clock=lambda: sim.now))
    for number in range(1, 6):
        sim.backend.add(activity(number))

    class DiesOnThirdSave(DictStore):
        saves = 0

        def save(self, cursor: Cursor) -> None:
            self.saves += 1
            if self.saves == 3:  # the second page's commit: its events are in Kafka already
                raise Killed
            super().save(cursor)

    bridge = sim_bridge(sim, page_size=2, store=DiesOnThirdSave(sim))
    with pytest.raises(Killed):
        await bridge.poll()
    await sim_bridge(sim, page_size=2).poll()
    ids = Counter(a for a, *_ in sim.published)
    assert ids == {"1": 1, "2": 1, "3": 2, "4": 2, "5": 1}  # at least once: page 2 again
    event_ids = Counter(e for *_, e in sim.published)
    assert sorted(event_ids.values()) == [1, 1, 1, 2, 2]  # the repeat carries the same ids


# --- on the real broker with the fake backend over HTTP -------------------------------------


@dataclass
class Running:
    bridge: Bridge
    registry: CollectorRegistry
    task: asyncio.Task[None]

    def sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def polls(self, more: int) -> None:
        """Wait until `more` further rounds completed."""
        target = self.sample("notifier_bridge_polls_total", outcome="ok") + more
        async with asyncio.timeout(20):
            while self.sample("notifier_bridge_polls_total", outcome="ok") < target:
                assert not self.task.done(), self.task
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running_bridge(
    backend: FakeBackend, bootstrap: str, topic: str, cursor_file: Path, **overrides: Any
) -> AsyncIterator[Running]:
    config = BridgeSettings(
        backend_url=backend.url,
        cursor_file=cursor_file,
        interval_seconds=0.05,
        overlap_seconds=2,
        backoff_initial_seconds=0.05,
        backoff_max_seconds=0.2,
        request_timeout_seconds=5,
        **overrides,
    )
    registry = CollectorRegistry()
    client = BackendClient(
        config.backend_url, auth_header=config.auth_header_name, auth_value=config.auth_header_value
    )
    async with client, Publisher(bootstrap, topic) as publisher:
        bridge = Bridge(config, client, publisher, CursorFile(cursor_file), BridgeMetrics(registry))
        task = asyncio.create_task(bridge.run())
        try:
            yield Running(bridge, registry, task)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def versions_on(bootstrap: str, topic: str, at_least: int) -> Counter[tuple[str, str, str]]:
    """(activity id, version, type) of every event on the topic, counted."""
    records = await read_topic(bootstrap, topic, at_least=at_least)
    counted: Counter[tuple[str, str, str]] = Counter()
    for record in records:
        event = parsed(record)
        assert record.key == event.data.activity.ticket_id.encode()
        counted[(event.data.activity.id, event.data.activity.update_text, event.type)] += 1
    return counted


C, U = "ticketActivity.created", "ticketActivity.updated"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("since", "updated_on_create"), [("inclusive", True), ("exclusive", True), ("inclusive", False)]
)
async def test_bridge_publishes_new_and_changed_activities_with_their_ticket(
    kafka_bootstrap: str, topic: str, tmp_path: Path, since: Any, updated_on_create: bool
) -> None:
    auth = ("X-Api-Key", "s3cret")
    with FakeBackend(since=since, updated_on_create=updated_on_create, auth=auth) as backend:
        backend.add_ticket({"id": "1042", "reference": "T-1042", "customer": CUSTOMER})
        backend.add(activity(1))
        backend.add(activity(2, ticket="7"))  # no such ticket: event without data.ticket
        async with running_bridge(
            backend, kafka_bootstrap, topic, tmp_path / "cursor.json",
            auth_header_name=auth[0], auth_header_value=auth[1],
        ) as running:  # fmt: skip
            await versions_on(kafka_bootstrap, topic, at_least=2)
            backend.update(1, updateText="v2")
            backend.add(activity(3))
            await versions_on(kafka_bootstrap, topic, at_least=4)
            await running.polls(3)
            assert running.sample("notifier_bridge_published_events_total", type="updated") == 1
            assert running.sample("notifier_bridge_lag_seconds") < 5
        records = await read_topic(kafka_bootstrap, topic, at_least=4)
    assert await versions_on(kafka_bootstrap, topic, 4) == {
        ("1", "v1", C): 1, ("2", "v1", C): 1, ("1", "v2", U): 1, ("3", "v1", C): 1,
    }  # fmt: skip
    events = {(e.data.activity.id, e.type): e for e in map(parsed, records)}
    assert events[("1", C)].data.ticket is not None
    assert events[("1", C)].data.ticket.customer is not None
    assert events[("2", C)].data.ticket is None
    assert all(r.key in (b"1042", b"7") for r in records)
    assert all(dict(r.headers)["content-type"] == b"application/cloudevents+json" for r in records)


@pytest.mark.integration
async def test_changes_while_the_bridge_is_down_are_published_after_restart(
    kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    cursor_file = tmp_path / "cursor.json"
    with FakeBackend(tickets=False) as backend:
        for number in (1, 2, 3):
            backend.add(activity(number))
        async with running_bridge(backend, kafka_bootstrap, topic, cursor_file) as running:
            await versions_on(kafka_bootstrap, topic, at_least=3)
            await running.polls(2)
        backend.update(2, updateText="v2")
        backend.add(activity(4))
        await asyncio.sleep(0.5)
        async with running_bridge(backend, kafka_bootstrap, topic, cursor_file) as running:
            await versions_on(kafka_bootstrap, topic, at_least=5)
            await running.polls(3)
        # One lookup told the bridge the backend has no ticket endpoint; it stopped asking.
        assert backend.count("/backend/api/v1/tickets/1042") == 2  # once per bridge process
    assert await versions_on(kafka_bootstrap, topic, 5) == {
        ("1", "v1", C): 1, ("2", "v1", C): 1, ("3", "v1", C): 1,
        ("2", "v2", U): 1, ("4", "v1", C): 1,
    }  # fmt: skip


@pytest.mark.integration
async def test_equal_timestamps_across_a_page_boundary(
    kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    with FakeBackend(page_cap=2, tickets=False) as backend:
        moment = backend.now()
        for number in range(1, 8):
            backend.add(activity(number), at=moment)
        async with running_bridge(
            backend, kafka_bootstrap, topic, tmp_path / "c.json", page_size=2
        ) as running:
            await versions_on(kafka_bootstrap, topic, at_least=7)
            await running.polls(3)
    counted = await versions_on(kafka_bootstrap, topic, 7)
    assert counted == {(str(n), "v1", C): 1 for n in range(1, 8)}


@pytest.mark.integration
async def test_a_restart_mid_round_neither_skips_nor_repeats(
    kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    cursor_file = tmp_path / "cursor.json"
    with FakeBackend(page_cap=2, tickets=False) as backend:
        for number in range(1, 7):
            backend.add(activity(number))
        backend.hold_after(2)  # serve the clock probe and the first page, then hang
        async with running_bridge(
            backend, kafka_bootstrap, topic, cursor_file, page_size=2
        ) as running:
            assert await asyncio.to_thread(backend.held.wait, 20)
            saved = json.loads(cursor_file.read_text())
            assert saved["round"]["afterId"] == 2
            assert running.sample("notifier_bridge_published_events_total", type="created") == 2
        # The bridge is killed while waiting for page 2; meanwhile the backend changes.
        backend.update(1, updateText="v2")
        backend.update(5, updateText="v2")
        backend.add(activity(7))
        backend.release()
        async with running_bridge(
            backend, kafka_bootstrap, topic, cursor_file, page_size=2
        ) as running:
            await versions_on(kafka_bootstrap, topic, at_least=8)
            await running.polls(3)
    assert await versions_on(kafka_bootstrap, topic, 8) == {
        ("1", "v1", C): 1, ("2", "v1", C): 1, ("3", "v1", C): 1, ("4", "v1", C): 1,
        ("5", "v2", C): 1, ("6", "v1", C): 1, ("7", "v1", C): 1, ("1", "v2", U): 1,
    }  # fmt: skip


@pytest.mark.integration
async def test_http_errors_back_off_then_succeed(
    kafka_bootstrap: str, topic: str, tmp_path: Path
) -> None:
    with FakeBackend(tickets=False) as backend:
        backend.add(activity(1))
        backend.fail_next(3)
        async with running_bridge(backend, kafka_bootstrap, topic, tmp_path / "c.json") as running:
            await versions_on(kafka_bootstrap, topic, at_least=1)
            await running.polls(2)
            assert running.sample("notifier_bridge_polls_total", outcome="backend_error") == 3
        listings = backend.count()
    assert listings >= 3 + 2
    assert await versions_on(kafka_bootstrap, topic, 1) == {("1", "v1", C): 1}
