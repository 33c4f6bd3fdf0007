"""Rendering and message headers of the reminder kinds (follow-up and action reminders)."""

from __future__ import annotations

import datetime as dt
import re
import shutil
from pathlib import Path

import pytest

from devkit.events import make_notification
from service.core.message import message_id, thread_ids
from service.core.render import Renderer, RenderError
from service.core.routing import Kind

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
REMINDERS = (Kind.FOLLOWUP_REMINDER, Kind.ACTION_REMINDER)


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer(TEMPLATES)


@pytest.mark.parametrize("kind", REMINDERS)
@pytest.mark.parametrize("locale", ["en", "de"])
@pytest.mark.parametrize("part", ["subject.txt", "txt", "html"])
def test_the_check_covers_every_reminder_template(
    tmp_path: Path, kind: Kind, locale: str, part: str
) -> None:
    root = tmp_path / "templates"
    shutil.copytree(TEMPLATES, root)
    (root / locale / f"{kind.value}.{part}").unlink()
    renderer = Renderer(root)
    if locale == "en":
        with pytest.raises(RenderError, match=re.escape(f"{kind.value}.{part}")):
            renderer.check()
    else:
        renderer.check()  # German falls back to English, as for every kind


@pytest.mark.parametrize(
    ("locale", "due", "since"),
    [
        ("en", "follow-up due", "has been due since Dec 3, 2026 09:00 UTC+01:00"),
        ("de", "Wiedervorlage", "ist seit 03.12.2026 09:00 UTC+01:00 fällig"),
    ],
)
def test_followup_reminder_says_what_is_due_since_when_and_about_what(
    renderer: Renderer, locale: str, due: str, since: str
) -> None:
    mail = renderer.render(make_notification(Kind.FOLLOWUP_REMINDER, locale=locale))
    assert mail.subject == "[T-1042] Printer on floor 3 jams"
    # Plain text is wrapped at 76 columns: compare with line breaks folded to spaces.
    for body in (" ".join(mail.text.split()), mail.html):
        assert due in body
        assert since in body
        assert "T-1042" in body
        assert "Printer on floor 3 jams" in body
        assert "E-mail" in body  # activity type
        assert "Alice Jones" in body  # author
        assert "The technician comes on Monday." in body
        assert "Customer is on the VIP list." in body  # internal comment, staff only
    assert 'class="internal"' in mail.html


@pytest.mark.parametrize(
    ("locale", "words"),
    [
        (
            "en",
            ("action required", "required since Dec 3, 2026 09:00 UTC+01:00", "no action taken"),
        ),
        ("de", ("Handlungsbedarf", "seit 03.12.2026 09:00 UTC+01:00", "keine ergriffene Maßnahme")),
    ],
)
def test_action_reminder_says_action_is_still_open(
    renderer: Renderer, locale: str, words: tuple[str, ...]
) -> None:
    mail = renderer.render(make_notification(Kind.ACTION_REMINDER, locale=locale))
    # Plain text is wrapped at 76 columns: compare with line breaks folded to spaces.
    for body in (" ".join(mail.text.split()), mail.html):
        for word in words:
            assert word in body.replace("\n", " ")
        # The follow-up date is another reminder's business.
        assert "05.12.2026" not in body
        assert "Dec 5, 2026" not in body


@pytest.mark.parametrize("kind", REMINDERS)
def test_the_moment_is_shown_in_utc_when_the_zone_is_utc(renderer: Renderer, kind: Kind) -> None:
    due = dt.datetime(2026, 12, 3, 8, 0, tzinfo=dt.UTC)
    field = "followup" if kind is Kind.FOLLOWUP_REMINDER else "action_required"
    mail = renderer.render(make_notification(kind, locale="en", **{field: due}))
    assert "Dec 3, 2026 08:00 UTC" in mail.text
    assert "UTC+" not in mail.text


def test_reminder_message_id_names_the_moment_and_threads_with_the_ticket() -> None:
    reminder = make_notification(Kind.FOLLOWUP_REMINDER)
    moved = make_notification(Kind.FOLLOWUP_REMINDER, moment="2026-12-04T08:00:00Z")
    staff = make_notification(Kind.STAFF, recipient=reminder.recipient)
    assert re.fullmatch(
        r"<a\.5001\.followup_reminder\.20261203T080000Z\.[0-9a-f]{16}@helpdesk\.test>",
        message_id(reminder, "helpdesk.test"),
    )
    assert message_id(moved, "helpdesk.test") != message_id(reminder, "helpdesk.test")
    assert re.fullmatch(
        r"<a\.5001\.staff\.[0-9a-f]{16}@helpdesk\.test>", message_id(staff, "helpdesk.test")
    )
    assert thread_ids(reminder, "helpdesk.test") == thread_ids(staff, "helpdesk.test")
