"""The bridge's durable cursor: the listing to ask next, what it has seen, and its file."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

Phase = Literal["created", "updated"]
FORMAT_VERSION = 1
# Event ids are derived from (activity, type, content): a re-published event keeps its id.
EVENT_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:ticket-notifier:bridge")


# The backend's activities carry no created/updated timestamps (ticket-activity.md lists
# none), so the cursor cannot be "the newest timestamp seen": it is the start of the last
# complete round, less a safety overlap, and the repeats the overlap causes are recognised
# by (activity id, content digest) in a window of recently listed activities.


class CursorError(Exception):
    """The cursor file exists but cannot be read; starting over could skip or repeat."""


@dataclass(frozen=True, slots=True)
class Seen:
    """An activity a listing returned: its content digest, when, and whether it went out."""

    digest: str
    at: float  # bridge clock, epoch seconds, of the response that last returned it
    published: bool = True


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where the bridge stands. Rounds list `createdSince=since`, then `updatedSince=since`,
    each paged by `idAfter`; `round_started` is None between rounds."""

    since: dt.datetime
    covered: dt.datetime  # every change before this instant has been published
    round_started: dt.datetime | None = None
    phase: Phase = "created"
    after_id: int | None = None
    seen: Mapping[str, Seen] = field(default_factory=dict)


def initial_cursor(
    now: dt.datetime, overlap: dt.timedelta, start_from: dt.datetime | None
) -> Cursor:
    """A fresh bridge publishes what changes from `start_from` on (default: now, less overlap)."""
    since = start_from if start_from is not None else now - overlap
    return Cursor(since=since, covered=since)


def begin_round(cursor: Cursor, started: dt.datetime) -> Cursor:
    """Open a round at `started` (taken before its first request); a resumed one keeps its own."""
    if cursor.round_started is not None:
        return cursor
    return replace(cursor, round_started=started, phase="created", after_id=None)


def classify(cursor: Cursor, activity_id: str, digest: str, *, created: bool) -> Phase | None:
    """created / updated for a listed activity, or None when it was published as it is now.

    "created": never published before, and `createdSince` lists it (`created`: the caller
    checked; in the created phase it holds by construction). Otherwise "updated".
    """
    seen = cursor.seen.get(activity_id)
    if seen is not None and seen.digest == digest:
        return None
    if seen is not None and seen.published:
        return "updated"
    return "created" if created or cursor.phase == "created" else "updated"


def published_before(cursor: Cursor, activity_id: str) -> bool:
    """Whether an event for this activity went out while it was in the window."""
    seen = cursor.seen.get(activity_id)
    return seen is not None and seen.published


def commit_page(cursor: Cursor, last_id: int, entries: Mapping[str, Seen]) -> Cursor:
    """The cursor after a page whose events Kafka acknowledged: resume after `last_id`."""
    after = last_id if cursor.after_id is None else max(cursor.after_id, last_id)
    return replace(cursor, after_id=after, seen={**cursor.seen, **entries})


def finish_phase(cursor: Cursor, overlap: dt.timedelta) -> Cursor:
    """The cursor after a phase's listing came back empty: next phase, or the next round."""
    if cursor.round_started is None:
        raise ValueError("no round in progress")
    if cursor.phase == "created":
        return replace(cursor, phase="updated", after_id=None)
    since = cursor.round_started - overlap
    # A listing returns an activity only if it changed at or after `since`; one last
    # returned more than `overlap` (the clock-skew allowance) before it cannot come back.
    horizon = (since - overlap).timestamp()
    seen = {key: entry for key, entry in cursor.seen.items() if entry.at >= horizon}
    return Cursor(since=since, covered=cursor.round_started, seen=seen)


def numeric_id(record: Mapping[str, Any]) -> int | None:
    """The record's id as the integer `idAfter` compares, or None if it is not one."""
    raw = record.get("id")
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str) and raw.strip().isascii() and raw.strip().isdigit():
        return int(raw.strip())
    return None


def pageable(
    records: Sequence[Mapping[str, Any]], after_id: int | None
) -> tuple[list[tuple[int, Mapping[str, Any]]], list[int]]:
    """Records with an integer id above `after_id`, in id order (the order idAfter pages in),
    and the positions of records without an integer id (they cannot be paged past)."""
    by_id: dict[int, Mapping[str, Any]] = {}
    unnumbered: list[int] = []
    for position, record in enumerate(records):
        number = numeric_id(record)
        if number is None:
            unnumbered.append(position)
        elif after_id is None or number > after_id:
            by_id[number] = record
    return sorted(by_id.items()), unnumbered


def content_digest(record: Mapping[str, Any]) -> str:
    """A digest of the record as the API returned it; any change of any field changes it."""
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def event_id_for(activity_id: str, kind: Phase, digest: str) -> str:
    """The CloudEvent id of the bridge's event for this activity content."""
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{activity_id}/{kind}/{digest}"))


def dump_cursor(cursor: Cursor) -> dict[str, Any]:
    """The cursor as the JSON object of its file."""
    return {
        "version": FORMAT_VERSION,
        "since": cursor.since.isoformat(),
        "covered": cursor.covered.isoformat(),
        "round": None
        if cursor.round_started is None
        else {
            "started": cursor.round_started.isoformat(),
            "phase": cursor.phase,
            "afterId": cursor.after_id,
        },
        "seen": {k: [s.digest, s.at, s.published] for k, s in sorted(cursor.seen.items())},
    }


def load_cursor(data: Any) -> Cursor:
    """Read a cursor file's JSON object; raise ValueError/KeyError/TypeError if malformed."""
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(f"unknown version {data.get('version')!r}")
    seen = {
        str(key): Seen(str(digest), float(at), bool(published))
        for key, (digest, at, published) in data["seen"].items()
    }
    cursor = Cursor(since=_time(data["since"]), covered=_time(data["covered"]), seen=seen)
    round_ = data["round"]
    if round_ is None:
        return cursor
    phase = round_["phase"]
    if phase not in ("created", "updated"):
        raise ValueError(f"unknown phase {phase!r}")
    after = round_["afterId"]
    if after is not None and (isinstance(after, bool) or not isinstance(after, int)):
        raise TypeError("afterId is not an integer")
    return replace(cursor, round_started=_time(round_["started"]), phase=phase, after_id=after)


def _time(text: Any) -> dt.datetime:
    moment = dt.datetime.fromisoformat(str(text))
    if moment.tzinfo is None:
        raise ValueError(f"timestamp without time zone: {text!r}")
    return moment


class CursorFile:
    """The cursor in a JSON file, replaced atomically: a crash leaves the old or the new one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> Cursor | None:
        """The saved cursor, None if there is no file; CursorError if it is unreadable."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CursorError(f"{self.path}: {exc.strerror}") from None
        try:
            return load_cursor(json.loads(text))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CursorError(f"{self.path}: not a bridge cursor ({type(exc).__name__})") from None

    def save(self, cursor: Cursor) -> None:
        """Write to a temporary file, fsync it, rename it over the cursor, fsync the folder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = json.dumps(dump_cursor(cursor), separators=(",", ":")).encode()
        with tmp.open("wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, self.path)
        # The rename itself is durable only once the directory entry is on disk.
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
