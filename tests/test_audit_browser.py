"""The /ui/ page in a real browser: Debian's headless Chromium, driven by Playwright.

The audit app is served by uvicorn on 127.0.0.1 over a real SQLite ledger filled through
the ledger's own writes. One test signs in as support staff would, finds ticket T-1042 by
its reference, reads its timeline (a sent mail, a withheld supplier, an unresolved token, a
failure, a dead letter) at desktop width and at 390 px, and signs out; the screenshots go to
a temporary folder, or to $NOTIFY_SCREENSHOTS_DIR (`scripts/screenshots` refreshes the ones
in docs/screenshots/ the README shows). Another fills the ledger with hostile values and
proves nothing in them runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from playwright.sync_api import Browser, BrowserContext, Page

from devkit.process import free_port
from service.delivery.ledger import DeadLetter, Entry, Key, Status
from service.runtime.audit.auth import COOKIE
from tests.audit_support import CSP, REFERENCE, TOKEN, audit_app, fill
from tests.ledger_support import opened

pytestmark = pytest.mark.integration

SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(1)>'
JS_URL = "javascript:alert(1)"


async def fill_hostile(ledger: Any) -> None:
    """Ticket 666: its reference, a token, a reason, a Message-ID and a dead letter that
    would run script if any of them reached the page as markup."""
    await ledger.record_ticket("666", JS_URL)
    await ledger.record(
        Entry(Key("6601", "staff", SCRIPT), Status.UNRESOLVED, ticket_id="666", reason=IMG)
    )
    await ledger.record(
        Entry(Key("6602", "customer_content", "x@evil.test"), Status.SENT, IMG, "666")
    )
    await ledger.record(
        Entry(Key("6603", "supplier", JS_URL), Status.FAILED, None, "666", None, "smtp", SCRIPT)
    )
    await ledger.record_dead_letter(
        DeadLetter(("ticket-activities", 0, 9), "render", SCRIPT, "666")
    )


class AuditServer:
    """The audit app under uvicorn in a thread of its own (its own event loop and ledger)."""

    def __init__(self, folder: Path) -> None:
        self.url = f"sqlite:///{folder / 'ledger.sqlite3'}"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="audit-server", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start()
            self._failed = exc

    async def _serve(self) -> None:
        ledger = await opened(self.url)
        try:
            await fill(ledger, self.url)
            await fill_hostile(ledger)
            app, _ = audit_app(ledger)
            config = uvicorn.Config(
                app, host="127.0.0.1", port=self.port, lifespan="off", log_level="warning"
            )
            self._server = uvicorn.Server(config)
            await self._server.serve()
        finally:
            await ledger.close()

    def start(self) -> None:
        self._thread.start()
        for _ in range(300):
            if self._failed is not None or not self._thread.is_alive():
                raise RuntimeError(f"audit server did not start: {self._failed!r}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base}/ui/static/audit.css").status_code == 200:
                    return
            threading.Event().wait(0.1)
        raise TimeoutError("audit server did not answer")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuditServer]:
    running = AuditServer(tmp_path_factory.mktemp("audit"))
    running.start()
    yield running
    running.stop()


class Watched:
    """A page with everything it did recorded: requests, console lines, errors, dialogs."""

    def __init__(self, context: BrowserContext) -> None:
        self.page: Page = context.new_page()
        self.requests: list[str] = []
        self.console: list[str] = []
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

        def dismiss(dialog: Any) -> None:
            self.dialogs.append(dialog.message)
            dialog.dismiss()

        self.page.on("dialog", dismiss)

    def sign_in(self, base: str) -> None:
        response = self.page.goto(f"{base}/ui/")
        assert response is not None
        assert response.headers["content-security-policy"] == CSP
        self.page.fill("#token", TOKEN)
        with self.page.expect_navigation():
            self.page.click("button[type=submit]")

    def search(self, text: str) -> None:
        self.page.fill("#q", text)
        with self.page.expect_navigation():
            self.page.press("#q", "Enter")


ENTRIES = """() => [...document.querySelectorAll('li.entry')].map(li => ({
  status: li.className.replace('entry status-', ''),
  badge: li.querySelector('.badge').innerText.trim().toLowerCase(),
  kind: li.querySelector('.kind').innerText,
  recipient: (li.querySelector('dd.recipient') || {innerText: ''}).innerText,
  text: li.innerText,
  border: getComputedStyle(li).borderLeftColor,
  badgeColour: getComputedStyle(li.querySelector('.badge')).backgroundColor,
}))"""

OVERFLOW = """() => ({
  viewport: window.innerWidth,
  scroll: document.documentElement.scrollWidth,
  wide: [...document.querySelectorAll('body *')].map(e => e.getBoundingClientRect())
    .filter(r => r.width > 0 && (r.left < -0.5 || r.right > window.innerWidth + 0.5)).length,
})"""


def test_support_finds_a_ticket_by_reference_and_reads_its_timeline(
    browser: Browser, server: AuditServer, shots: Path
) -> None:
    context = browser.new_context(viewport={"width": 1100, "height": 900}, device_scale_factor=1)
    try:
        watched = Watched(context)
        page = watched.page
        watched.sign_in(server.base)
        assert page.url == f"{server.base}/ui/"
        assert page.is_visible("#q")
        [cookie] = context.cookies()
        assert cookie["name"] == COOKIE
        assert cookie["httpOnly"] is True
        assert cookie["sameSite"] == "Strict"
        assert cookie["path"] == "/ui"
        assert cookie["value"] != TOKEN
        assert page.evaluate("document.cookie") == ""  # HttpOnly: no script can read it

        watched.search(REFERENCE)
        assert page.inner_text("section.ticket h1") == "Ticket 1042 T-1042"
        entries = page.evaluate(ENTRIES)
        seen = {(e["badge"], e["kind"], e["recipient"]) for e in entries}
        assert ("sent", "customer_content", "dana@customer.test") in seen
        assert ("withheld", "supplier", "service@druckhaus.test") in seen
        assert ("unresolved", "staff", "no-such-department") in seen
        assert ("failed", "staff", "bob@helpdesk.test") in seen
        assert ("dead letter", "render", "") in seen
        sent = next(e for e in entries if e["recipient"] == "dana@customer.test")
        assert "<a.5007.cc@helpdesk.test>" in sent["text"]
        assert "2026-11-18 11:11:40 UTC" in sent["text"]
        for entry in entries:
            assert entry["badge"] == entry["status"].replace("dead", "dead letter")
        # Each status its own colour, and its word beside it.
        colours = {e["status"]: (e["border"], e["badgeColour"]) for e in entries}
        assert len(set(colours.values())) == len(colours) == 5
        page.screenshot(path=str(shots / "audit-desktop.png"), full_page=True)

        page.set_viewport_size({"width": 390, "height": 844})
        page.reload()
        measured = page.evaluate(OVERFLOW)
        assert measured["viewport"] == 390
        assert measured["scroll"] <= 390, "the page scrolls sideways on a phone"
        assert measured["wide"] == 0
        assert float(page.evaluate("parseFloat(getComputedStyle(document.body).fontSize)")) >= 16
        page.screenshot(path=str(shots / "audit-390.png"), full_page=True)

        with page.expect_navigation():
            page.click("text=Log out")
        assert page.is_visible("#token")
        assert context.cookies() == []
        page.goto(f"{server.base}/ui/?q={REFERENCE}")
        assert "dana@customer.test" not in page.content()

        # Offline by construction: nothing but this server was asked for anything.
        assert watched.requests
        assert [u for u in watched.requests if not u.startswith(server.base)] == []
        assert watched.console == []
        assert watched.errors == []
        assert watched.dialogs == []
    finally:
        context.close()


INJECTED = """() => ({
  scripts: document.scripts.length,
  images: document.images.length,
  handlers: [...document.querySelectorAll('*')].filter(
    e => [...e.attributes].some(a => a.name.toLowerCase().startsWith('on'))).length,
  scriptLinks: [...document.querySelectorAll('[href],[src],[action]')].filter(
    e => /^\\s*javascript:/i.test(e.getAttribute('href') || e.getAttribute('src')
                                   || e.getAttribute('action'))).length,
  text: document.body.innerText,
  title: document.title,
})"""


@pytest.mark.parametrize("search", [JS_URL, IMG, SCRIPT])
def test_hostile_values_show_as_text_and_nothing_runs(
    browser: Browser, server: AuditServer, search: str
) -> None:
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    try:
        watched = Watched(context)
        watched.sign_in(server.base)
        watched.search(search)
        found: dict[str, Any] = watched.page.evaluate(INJECTED)
        assert found["scripts"] == 0
        assert found["images"] == 0
        assert found["handlers"] == 0
        assert found["scriptLinks"] == 0
        assert watched.page.input_value("#q") == search  # echoed as a value, literally
        assert search in found["title"]
        if search == JS_URL:  # the ticket whose reference it is
            text = found["text"]
            assert "Ticket 666 javascript:alert(1)" in text
            assert SCRIPT in text  # the token, the failure's reason, the dead letter's
            assert IMG in text  # the reason and the Message-ID
            assert text.count(SCRIPT) == 3
        else:
            assert f"Nothing is recorded for {search}" in found["text"].replace("“", "")
        # Nothing ran: no alert, no error, and no CSP report of a blocked script.
        assert watched.dialogs == []
        assert watched.errors == []
        assert watched.console == []
    finally:
        context.close()
