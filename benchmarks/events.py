"""A realistic, reproducible workload: directory, attachment store and ticket-activity events.

Mixed kinds (customer content with and without attachments, customer updates, internal
staff notes, supplier requests, some withheld for personal data), two locales (plus
`de-AT`), non-ASCII names and texts, follow-ups, many tickets, several activities per
ticket (so per-ticket order matters). Everything is derived from a seed.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from devkit.events import encode, routing_of, stamped
from service.core.directory import Directory, load_directory
from service.core.events import cloudevent_for
from service.core.routing import Notification

FIRST_NAMES = (
    "Anna",
    "Jürgen",
    "Chloé",
    "Mehmet",
    "Sofia",
    "Łukasz",
    "Ingrid",
    "Tom",
    "Zoë",
    "Ali",
)
LAST_NAMES = ("Müller", "Smith", "Novák", "García", "Öztürk", "Brown", "Weiß", "Dubois", "Lee")
SUBJECTS = (
    "Printer on floor {n} jams",
    "VPN-Zugang für neue Mitarbeiterin ({n})",
    "Laptop battery swells after update {n}",
    "Rechnung Nr. {n} – Rückfrage zur Position 3",
    "Meeting room display stays black ({n})",
)
TEXT_EN = (
    "Dear customer,\n\nthank you for your patience. We replaced the fuser unit and ran "
    "{n} test pages without a jam. Please let us know if the problem returns.\n\n"
    "Kind regards\nThe helpdesk team"
)
TEXT_DE = (
    "Sehr geehrte Damen und Herren,\n\nvielen Dank für Ihre Geduld. Wir haben die "
    "Fixiereinheit getauscht und {n} Testseiten ohne Papierstau gedruckt. Bitte melden Sie "
    "sich, falls das Problem erneut auftritt.\n\nMit freundlichen Grüßen\nIhr Helpdesk-Team"
)
UPDATE_TEXT = ("Techniker kommt am Dienstag um 9:00 Uhr.", "Parts ordered, ETA {n} days.")
COMMENT = "Customer was unhappy about the last visit — offer 10 % discount ({n})."
ACTIVITY_TYPES = ("E-mail", "Phone call", "On-site visit", "Supplier order", "Note")


@dataclass(frozen=True, slots=True)
class Workload:
    """Files the service reads, and the events to publish (keys are ticket ids)."""

    directory_file: Path
    attachments_dir: Path
    events: list[dict[str, Any]]
    files: dict[str, list[str]]
    tickets: int


def write_store(root: Path, rng: random.Random) -> dict[str, list[str]]:
    """Small files in an attachment store; returns the references by group."""
    groups: dict[str, list[str]] = {"standard": [], "tickets": [], "invoices": []}
    specs = (
        ("standard", "terms-and-conditions-{i}.pdf", 3, (8_000, 30_000)),
        ("standard", "checkliste-übergabe-{i}.txt", 2, (1_000, 3_000)),
        ("tickets", "quote-{i}.pdf", 12, (4_000, 40_000)),
        ("tickets", "photo-{i}.jpg", 8, (20_000, 60_000)),
        ("invoices", "INV-2026-{i:04d}.pdf", 10, (6_000, 20_000)),
    )
    for group, pattern, count, (low, high) in specs:
        for i in range(count):
            ref = f"{group}/{pattern.format(i=i)}"
            path = root / ref
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.randbytes(rng.randint(low, high)))
            groups[group].append(ref)
    return groups


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def write_directory(path: Path, rng: random.Random, tickets: int) -> dict[str, Any]:
    """A directory YAML: 40 staff users, 6 departments, 8 suppliers, some known tickets."""
    users = {
        f"u{i:02d}": {
            "name": f"{FIRST_NAMES[i % 10]} {LAST_NAMES[i // 10]}",  # unique: names are tokens
            "email": f"staff{i:02d}@helpdesk.test",
            "locale": "de" if i % 2 == 0 else "en",
        }
        for i in range(40)
    }
    departments: dict[str, Any] = {
        f"dept{d}": {"name": f"Team {d}", "members": [f"u{(d * 5 + k) % 40:02d}" for k in range(2)]}
        for d in range(5)
    }
    departments["billing"] = {
        "name": "Buchhaltung",
        "email": "billing@helpdesk.test",
        "locale": "de",
    }
    suppliers = {
        f"s{i}": {
            "name": f"Lieferant {i} GmbH" if i % 2 else f"Supplier {i} Ltd",
            "email": f"orders{i}@supplier{i}.test",
            "locale": "de" if i % 2 else "en",
        }
        for i in range(8)
    }
    # Every fifth ticket is known only to the directory: its events carry no data.ticket.
    known = {
        f"T{t}": {
            "reference": f"REF-{t}",
            "subject": SUBJECTS[t % len(SUBJECTS)].format(n=t),
            "customer": {
                "name": _person(rng),
                "email": f"customer{t}@example.test",
                "locale": "de-AT" if t % 10 == 0 else "en",
            },
        }
        for t in range(0, tickets, 5)
    }
    data = {"departments": departments, "users": users, "suppliers": suppliers, "tickets": known}
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return data


def make_events(
    n: int, rng: random.Random, files: dict[str, list[str]], run: str, tickets: int
) -> list[dict[str, Any]]:
    """n events over `tickets` tickets; activity ids are unique per `run`."""
    last: dict[int, str] = {}
    events = []
    for i in range(n):
        t = rng.randrange(tickets)
        german = t % 2 == 1
        activity_id = f"{run}-{i}"
        roll = rng.random()
        author = f"u{rng.randrange(40):02d}"
        activity: dict[str, Any] = {
            "id": activity_id,
            "ticketID": f"T{t}",
            "parentActivity": last.get(t) if rng.random() < 0.4 else None,
            "ticketActivityType": rng.choice(ACTIVITY_TYPES),
            "activityUser": author,
            "containsPersonalData": "No",
            "activityText": (TEXT_DE if german else TEXT_EN).format(n=i),
            "sendContentByEmail": "No",
            "commentText": COMMENT.format(n=i) if rng.random() < 0.5 else "",
            "updateText": "",
            "sendUpdateByEmail": "No",
            "activityDepartments": "",
            "activityUsers": f"u{rng.randrange(40):02d}",
            "activitySuppliers": "",
            "activityDate": "2026-11-27",
        }
        if roll < 0.35:  # customer content, 40 % of them with attachments
            activity["sendContentByEmail"] = "Yes"
            if rng.random() < 0.4:
                activity["standardTicketAttachments"] = [rng.choice(files["standard"])]
                activity["thisTicketAttachments"] = rng.sample(files["tickets"], rng.randint(0, 2))
                if rng.random() < 0.3:
                    activity["invoiceAttachments"] = [rng.choice(files["invoices"])]
        elif roll < 0.60:  # customer update
            activity["sendUpdateByEmail"] = "Yes"
            activity["updateText"] = rng.choice(UPDATE_TEXT).format(n=i)
        elif roll < 0.85:  # internal staff note, sometimes to a department
            activity["commentText"] = COMMENT.format(n=i)
            if rng.random() < 0.3:
                activity["activityDepartments"] = f"dept{rng.randrange(5)}"
            activity["followupDate"] = "2026-12-04"
            activity["followupTime"] = "10:00"
        else:  # supplier request; a third carry personal data and are withheld
            activity["activitySuppliers"] = f"s{rng.randrange(8)}"
            activity["containsPersonalData"] = "Yes" if rng.random() < 0.33 else "No"
            activity["actionRequiredDate"] = "2026-12-02"
            activity["actionRequiredTime"] = "14:30"
            if rng.random() < 0.5:
                activity["standardTicketAttachments"] = [rng.choice(files["standard"])]
        data: dict[str, Any] = {"activity": activity}
        if t % 5:
            data["ticket"] = {
                "id": f"T{t}",
                "reference": f"REF-{t}",
                "subject": SUBJECTS[t % len(SUBJECTS)].format(n=t),
                "customer": {
                    "name": f"{FIRST_NAMES[t % 10]} {LAST_NAMES[t % 9]}",
                    "email": f"customer{t}@example.test",
                    "locale": "de" if german else "en",
                },
            }
        event = cloudevent_for(activity, event_id=f"ev-{activity_id}")
        event["data"] = data
        event["time"] = None  # set at publish time
        events.append(event)
        last[t] = activity_id
    return events


def build_workload(root: Path, n: int, *, seed: int = 6, run: str | None = None) -> Workload:
    """Write the store and directory under `root` and generate n events."""
    rng = random.Random(seed)
    store = root / "attachments"
    files = write_store(store, rng)
    directory_file = root / "directory.yaml"
    tickets = max(20, n // 4)
    write_directory(directory_file, rng, tickets)
    events = make_events(n, rng, files, run or f"r{int(time.time())}", tickets)
    return Workload(directory_file, store, events, files, tickets)


def more_events(workload: Workload, n: int, run: str, seed: int = 7) -> list[dict[str, Any]]:
    """Another n events over the same tickets, directory and files (ids unique per `run`)."""
    return make_events(n, random.Random(seed), workload.files, run, workload.tickets)


def notifications(workload: Workload, events: list[dict[str, Any]]) -> list[Notification]:
    """What the service's routing makes of `events` (to know how many mails to expect)."""
    directory: Directory = load_directory(workload.directory_file)
    out: list[Notification] = []
    for event in events:
        out.extend(routing_of(encode(stamped(event)), directory=directory).notifications)
    return out
