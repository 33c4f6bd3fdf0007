"""The notifier command: start-up refuses bad settings in one line; preview renders mail."""

from __future__ import annotations

import email
import email.message
import email.policy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from devkit import EXAMPLES
from devkit.process import run_notifier


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"NOTIFY_SMTP_PORT": "twenty-five"}, "NOTIFY_SMTP_PORT"),
        ({"NOTIFY_SMTP_SECURITY": "ssl"}, "NOTIFY_SMTP_SECURITY"),
        ({"NOTIFY_DIRECTORY_FILE": "/nonexistent/directory.yaml"}, "NOTIFY_DIRECTORY_FILE"),
        ({"NOTIFY_TEMPLATES_DIR": "/nonexistent"}, "NOTIFY_TEMPLATES_DIR"),
        ({"NOTIFY_ATTACHMENTS_DIR": "/nonexistent"}, "NOTIFY_ATTACHMENTS_DIR"),
        ({"NOTIFY_TIMEZONE": "Mars/Olympus_Mons"}, "NOTIFY_TIMEZONE"),
    ],
)
def test_bad_setting_stops_start_up_with_one_line(env: dict[str, str], named: str) -> None:
    env = {"NOTIFY_ATTACHMENTS_DIR": str(EXAMPLES / "attachments"), **env}
    result = run_notifier("run", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]


def test_broken_directory_file_names_the_entry(tmp_path: Path) -> None:
    directory = tmp_path / "directory.yaml"
    directory.write_text("users:\n  alice: { name: Alice, email: not-an-address }\n")
    result = run_notifier(
        "run",
        env={
            "NOTIFY_DIRECTORY_FILE": str(directory),
            "NOTIFY_ATTACHMENTS_DIR": str(EXAMPLES / "attachments"),
        },
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "NOTIFY_DIRECTORY_FILE" in line
    assert "alice" in line


def test_preview_writes_every_mail_of_an_event(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_notifier(
        "preview",
        str(EXAMPLES / "events" / "01-customer-content.json"),
        "--out",
        str(out),
        env={
            "NOTIFY_DIRECTORY_FILE": str(EXAMPLES / "directory.yaml"),
            "NOTIFY_ATTACHMENTS_DIR": str(EXAMPLES / "attachments"),
        },
    )
    assert result.returncode == 0, result.stderr
    emls = sorted(out.glob("*.eml"))
    assert len(emls) == 3  # customer, bob, carol
    assert len(sorted(out.glob("*.html"))) == 3
    recipients = set()
    for path in emls:
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        recipients.add(str(message["To"].addresses[0].addr_spec))
        assert message["Subject"] == "[T-1042] Printer on floor 3 jams"
    assert recipients == {"dana@customer.test", "bob@helpdesk.test", "carol@helpdesk.test"}


def test_a_previewed_eml_is_the_message_not_its_smtp_form(tmp_path: Path) -> None:
    # SMTP doubles a dot that starts a line (RFC 5321 §4.5.2); a file is not SMTP.
    event = json.loads((EXAMPLES / "events" / "01-customer-content.json").read_text())
    event["data"]["activity"]["activityText"] = ".\n.signed\n..twice"
    source = tmp_path / "dots.json"
    source.write_text(json.dumps(event))
    out = tmp_path / "out"
    result = run_notifier(
        "preview",
        str(source),
        "--out",
        str(out),
        env={
            "NOTIFY_DIRECTORY_FILE": str(EXAMPLES / "directory.yaml"),
            "NOTIFY_ATTACHMENTS_DIR": str(EXAMPLES / "attachments"),
        },
    )
    assert result.returncode == 0, result.stderr
    [customer] = out.glob("*-customer*.eml")
    message = email.message_from_bytes(customer.read_bytes(), policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    text = message.get_body(("plain",))
    assert text is not None
    lines = text.get_content().splitlines()
    assert [line for line in lines if line.startswith(".")] == [".", ".signed", "..twice"]


def test_preview_prints_to_stdout_and_reports_invalid_events(tmp_path: Path) -> None:
    ok = run_notifier(
        "preview",
        str(EXAMPLES / "events" / "04-supplier-request.json"),
        env={
            "NOTIFY_DIRECTORY_FILE": str(EXAMPLES / "directory.yaml"),
            "NOTIFY_ATTACHMENTS_DIR": str(EXAMPLES / "attachments"),
        },
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("Subject: [T-1042] Printer on floor 3 jams") == 2
    bad = tmp_path / "bad.json"
    bad.write_text('{"specversion": "1.0"}')
    result = run_notifier(
        "preview", str(bad), env={"NOTIFY_ATTACHMENTS_DIR": str(EXAMPLES / "attachments")}
    )
    assert result.returncode == 1
    assert "invalid event (cloudevent)" in result.stderr


def test_run_settles_the_heap_before_serving() -> None:
    # In a child: freezing the collector would outlast the test in this process.
    code = (
        "import gc\n"
        "from service.runtime.app import GC_YOUNG_THRESHOLD, settle_heap\n"
        "before = gc.get_freeze_count()\n"
        "settle_heap()\n"
        "assert gc.get_freeze_count() > before > -1\n"
        "assert gc.get_threshold()[0] == GC_YOUNG_THRESHOLD > 700\n"
        "print('settled')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "settled\n"
