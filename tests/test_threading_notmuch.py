"""A real mail indexer (Debian's notmuch) nests each follow-up under the mail it answers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from email import message_from_bytes
from email.policy import default
from pathlib import Path
from typing import Any

from tests.test_dispatch import CUSTOMER, Rig, activity, event_bytes, record

# Debian's notmuch, installed by .ci/run; a missing one fails here rather than skipping.
NOTMUCH = shutil.which("notmuch") or "notmuch"

STAFF = "bob@helpdesk.test"


def deliver_to_maildir(root: Path, messages: list[bytes]) -> None:
    """One Maildir per mailbox, the way a recipient's client would hold them."""
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(messages):
        (root / "new" / f"{i}.notifier:2,").write_bytes(data)


def notmuch(maildir: Path, *args: str) -> Any:
    config = maildir.parent / f"{maildir.name}.notmuch-config"
    config.write_text(f"[database]\npath={maildir}\n[new]\ntags=inbox\n")
    env = {**os.environ, "NOTMUCH_CONFIG": str(config)}
    subprocess.run([NOTMUCH, "new", "--quiet"], env=env, check=True, capture_output=True)
    done = subprocess.run([NOTMUCH, *args], env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def replies_of(tree: list[Any], message_id: str) -> list[str]:
    """The ids notmuch nests directly under `message_id` in a `show --format=json` thread."""
    found: list[str] = []

    def walk(nodes: list[Any]) -> None:
        for message, children in nodes:
            if message["id"] == message_id:
                found.extend(child["id"] for child, _ in children)
            walk(children)

    for thread in tree:
        walk(thread)
    return found


async def test_follow_ups_nest_under_the_mail_they_answer(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    await r.open()
    try:
        first = activity(id="5001", activityUsers=STAFF)
        follow_up = activity(
            id="5005",
            parentActivity="5001",
            activityText="We come on Tuesday.",
            activityUsers=STAFF,
        )
        # Separate batches, as in life (the follow-up comes days later)...
        await r.dispatcher.handle_batch([record(event_bytes(first))])
        await r.dispatcher.handle_batch([record(event_bytes(follow_up))])
        # ...and a second follow-up that arrives in one batch with its parent.
        parent = activity(id="6001", ticketID="1042", activityUsers=STAFF)
        answer = activity(id="6002", parentActivity="6001", activityUsers=STAFF)
        await r.dispatcher.handle_batch([record(event_bytes(parent)), record(event_bytes(answer))])
    finally:
        await r.close()

    by_mailbox: dict[str, list[bytes]] = {}
    for to, data in r.mailer.accepted:
        by_mailbox.setdefault(to, []).append(data)
    for mailbox in (CUSTOMER, STAFF):
        maildir = tmp_path / mailbox.split("@")[0]
        deliver_to_maildir(maildir, by_mailbox[mailbox])
        mids = [message_from_bytes(m, policy=default)["Message-ID"] for m in by_mailbox[mailbox]]
        ids = {_activity_of(mid): mid.strip("<>") for mid in mids}
        threads = notmuch(maildir, "search", "--format=json", "--output=threads", "*")
        assert len(threads) == 1, f"{mailbox}: one conversation per ticket, got {threads}"
        tree = notmuch(maildir, "show", "--format=json", "--entire-thread=true", "*")
        assert ids["5005"] in replies_of(tree, ids["5001"]), f"{mailbox}: 5005 not under 5001"
        assert ids["6002"] in replies_of(tree, ids["6001"]), f"{mailbox}: 6002 not under 6001"
        # The parents themselves hang off the ticket's root, not off each other.
        assert ids["6001"] not in replies_of(tree, ids["5001"])


def _activity_of(message_id: str) -> str:
    """`<a.{activity}.{kind}.{hash}@domain>` → activity."""
    return message_id.strip("<>").split(".")[1]
