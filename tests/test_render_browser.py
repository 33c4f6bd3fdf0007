"""One mail of each kind, rendered by the real templates, laid out by headless Chromium.

Debian's `chromium`, driven by Playwright (never `playwright install`: the browser is the
system's), opens each HTML body at 390 px (a phone) and 800 px (a desktop reading pane) and
measures it: nothing is wider than the screen, and the staff facts table stacks each label
above its value on the phone but keeps them side by side on the desktop. The screenshots go
to a temporary folder, or to $NOTIFY_SCREENSHOTS_DIR: `scripts/screenshots` refreshes the
ones in docs/screenshots/ that the README shows.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page

from service.core.directory import load_directory
from service.core.events import parse_event
from service.core.render import Renderer
from service.core.routing import Kind, Notification, RoutingPolicy, route
from tests.conftest import CHROMIUM

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
WIDTHS = (390, 800)
PHOTOS = "https://portal.helpdesk.test/tickets/1042/photos/fuser-unit-worn-2026-11-27-09-15.jpg"


def example_mail(name: str, kind: Kind, email: str) -> Notification:
    """The notification routing makes of an example event, for one kind and recipient."""
    event = parse_event((EXAMPLES / "events" / name).read_bytes(), {})
    directory = load_directory(EXAMPLES / "directory.yaml")
    result = route(event, directory, RoutingPolicy(suppliers_may_receive_personal_data=True))
    [found] = [n for n in result.notifications if n.kind is kind and n.recipient.email == email]
    return found


def mails() -> dict[str, Notification]:
    staff = example_mail("03-staff-note.json", Kind.STAFF, "alice@helpdesk.test")
    # A long unbreakable word (a URL) is what pushes a narrow layout wider than the screen.
    staff = dataclasses.replace(staff, activity_text=f"{staff.activity_text}\nPhotos: {PHOTOS}")
    return {
        "customer_content": example_mail(
            "01-customer-content.json", Kind.CUSTOMER_CONTENT, "dana@customer.test"
        ),
        "customer_update": example_mail(
            "02-customer-update-directory-ticket.json",
            Kind.CUSTOMER_UPDATE,
            "erik.novak@customer.test",
        ),
        "staff": staff,
        "supplier": example_mail(
            "04-supplier-request.json", Kind.SUPPLIER, "service@druckhaus.test"
        ),
    }


def open_mail(browser: Browser, html: str, width: int) -> Page:
    page = browser.new_page(viewport={"width": width, "height": 400}, device_scale_factor=1)
    # The mail must stand alone: any request it makes (it should make none) is refused.
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.route("**/*", lambda route: route.abort())
    page.set_content(html, wait_until="load")
    assert [url for url in requests if not url.startswith(("about:", "data:"))] == []
    return page


# Every element's box, and the widths that overflow would show in.
MEASURE = """() => {
  const boxes = [...document.querySelectorAll('body *')].map(e => {
    const r = e.getBoundingClientRect();
    return {tag: e.tagName, cls: e.className, left: r.left, right: r.right, width: r.width};
  });
  return {
    viewport: window.innerWidth,
    scroll: document.documentElement.scrollWidth,
    boxes: boxes.filter(b => b.width > 0),
    text: document.body.innerText,
    fontSize: parseFloat(getComputedStyle(document.querySelector('.card')).fontSize),
  };
}"""

FACTS = """() => [...document.querySelectorAll('table.facts tr')].map(tr => {
  const [label, value] = [...tr.querySelectorAll('td')].map(td => td.getBoundingClientRect());
  return {label: [label.top, label.bottom, label.left, label.right],
          value: [value.top, value.bottom, value.left, value.right]};
})"""


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("kind", ["customer_content", "customer_update", "staff", "supplier"])
def test_each_kind_reads_well_on_a_phone_and_a_desktop(
    browser: Browser, shots: Path, kind: str, width: int
) -> None:
    n = mails()[kind]
    html = Renderer(ROOT / "templates").render(n).html
    page = open_mail(browser, html, width)
    try:
        measured: dict[str, Any] = page.evaluate(MEASURE)
        page.screenshot(path=str(shots / f"{kind}-{width}.png"), full_page=True)
        facts = page.evaluate(FACTS) if kind == "staff" else []
    finally:
        page.close()

    assert measured["viewport"] == width
    assert measured["scroll"] <= width, "the page scrolls sideways"
    wide = [b for b in measured["boxes"] if b["left"] < -0.5 or b["right"] > width + 0.5]
    assert wide == [], json.dumps(wide[:3])
    assert measured["fontSize"] >= 14
    text: str = measured["text"]
    assert "T-1042" in text or "T-1043" in text

    if kind == "customer_content":
        # One letter: the staff member's salutation and sign-off, none of ours.
        assert text.count("Sehr geehrte Frau Smith") == 1
        assert "Guten Tag" not in text
        assert text.count("Mit freundlichen Grüßen") == 1
        assert "INV-2026-001.pdf" in text
    if kind == "staff":
        assert PHOTOS in text
        assert len(facts) >= 6
        for row in facts:
            label_top, label_bottom, label_left, label_right = row["label"]
            value_top, _, value_left, _ = row["value"]
            if width <= 480:
                # Stacked: the value starts below its label, at the same left edge.
                assert value_top >= label_bottom - 0.5, row
                assert abs(value_left - label_left) < 1, row
            else:
                # Side by side: same line, value right of the label.
                assert abs(value_top - label_top) < 1, row
                assert value_left >= label_right, row


def test_refreshing_the_committed_screenshots_is_one_command() -> None:
    # The README shows docs/screenshots/*.png; scripts/screenshots rewrites them with this
    # test module. Each must exist, be a PNG, and be named by the test's own parameters.
    script = ROOT / "scripts" / "screenshots"
    assert script.is_file()
    assert "NOTIFY_SCREENSHOTS_DIR" in script.read_text()
    readme = (ROOT / "README.md").read_text()
    for kind in ("customer_content", "customer_update", "staff", "supplier"):
        for width in WIDTHS:
            png = ROOT / "docs" / "screenshots" / f"{kind}-{width}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    for name in ("customer_content-390.png", "staff-390.png", "staff-800.png"):
        assert f"docs/screenshots/{name}" in readme
    assert shutil.which("chromium") == CHROMIUM or Path(CHROMIUM).is_file()
