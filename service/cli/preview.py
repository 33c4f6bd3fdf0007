"""`notifier preview`: every mail an event would produce, without Kafka or SMTP."""

from __future__ import annotations

import sys
from pathlib import Path

from service.core.events import InvalidEvent, parse_event
from service.core.message import Attachment, message_id
from service.core.routing import route
from service.delivery.attachments import AttachmentMissing, AttachmentRefused
from service.delivery.build import NotBuilt
from service.delivery.smtp_wire import undo_dot_stuff
from service.runtime.parts import build_parts, routing_policy
from service.runtime.settings import Settings


def preview(settings: Settings, event_file: Path, out: Path | None) -> int:
    """Print (or write into `out` as .eml and .html) each mail; 1 when the event is invalid."""
    parts = build_parts(settings)
    raw = sys.stdin.buffer.read() if str(event_file) == "-" else event_file.read_bytes()
    try:
        event = parse_event(raw, {})
    except InvalidEvent as exc:
        print(f"invalid event ({exc.stage}): {exc.reason}", file=sys.stderr)
        return 1
    result = route(event, parts.directory, routing_policy(settings))
    for unresolved in result.unresolved:
        print(f"# unresolved {unresolved.field}: {unresolved.token}", file=sys.stderr)
    for withheld in result.withheld:
        print(
            f"# withheld (personal data): {withheld.kind.value} to {withheld.recipient.email}",
            file=sys.stderr,
        )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    for index, n in enumerate(result.notifications, start=1):
        rendered = parts.factory.render(n)
        if isinstance(rendered, NotBuilt):
            print(f"# {n.kind.value}: {rendered.failure.reason}", file=sys.stderr)
            continue
        mail, seconds = rendered
        attachments: list[Attachment] = []
        try:
            attachments = parts.factory.load(n.attachments)
        except (AttachmentMissing, AttachmentRefused) as exc:
            # A preview shows the mail anyway; the service would wait or dead-letter.
            print(f"# {n.kind.value}: attachments not loaded: {exc}", file=sys.stderr)
        built = parts.factory.assemble(n, mail, seconds, attachments)
        if isinstance(built, NotBuilt):
            print(f"# {n.kind.value}: {built.failure.reason}", file=sys.stderr)
            continue
        # The mail as a file holds it, not in SMTP's form (its line-leading dots doubled).
        data = undo_dot_stuff(built.data)
        label = f"{index:02d}-{n.kind.value}-{n.recipient.email}"
        if out is None:
            print(f"# {label}  {message_id(n, settings.mail_domain)}")
            sys.stdout.write(data.decode("ascii", errors="replace").replace("\r\n", "\n"))
            print()
        else:
            safe = "".join(ch if ch.isalnum() or ch in "-_.@" else "_" for ch in label)
            (out / f"{safe}.eml").write_bytes(data)
            (out / f"{safe}.html").write_text(mail.html, encoding="utf-8")
            print(out / f"{safe}.eml")
    if not result.notifications:
        print("# this event produces no mail", file=sys.stderr)
    return 0
