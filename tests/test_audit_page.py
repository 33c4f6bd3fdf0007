"""The /ui/ page over HTTP: sign-in cookie, search by id or reference, escaping, headers;
and the audit mounted in the service's app: 404 without NOTIFY_HTTP_TOKEN, health open."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from http.cookies import SimpleCookie
from pathlib import Path

import httpx
import pytest

import service.runtime.app
from devkit.process import free_port
from service.delivery.ledger import Entry, Key, Ledger, Status
from service.runtime.audit.auth import COOKIE
from service.runtime.settings import Settings, SettingsError, load_settings
from tests.audit_support import CSP, REFERENCE, TICKET, TOKEN, audit_app, client, fill, metric
from tests.ledger_support import opened

HOSTILE = '"><img src=x onerror=alert(1)><script>alert(1)</script>'


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    ledger = await opened(url)
    await fill(ledger, url)
    yield ledger
    await ledger.close()


async def signed_in(http: httpx.AsyncClient) -> None:
    response = await http.post("/ui/login", data={"token": TOKEN})
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/"


def set_cookie(response: httpx.Response) -> SimpleCookie:
    cookie: SimpleCookie = SimpleCookie()
    cookie.load(response.headers["set-cookie"])
    return cookie


async def test_without_a_cookie_the_page_asks_for_the_token(ledger: Ledger) -> None:
    app, _ = audit_app(ledger)
    async with client(app) as http:
        response = await http.get("/ui/", params={"q": TICKET})
    assert response.status_code == 200
    assert 'action="/ui/login"' in response.text
    assert 'type="password"' in response.text
    assert "dana@customer.test" not in response.text
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["content-security-policy"] == CSP
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"


async def test_signing_in_sets_a_strict_httponly_cookie_for_ui_only(ledger: Ledger) -> None:
    app, _ = audit_app(ledger)
    async with client(app) as http:
        response = await http.post("/ui/login", data={"token": TOKEN})
    morsel = set_cookie(response)[COOKIE]
    assert morsel["httponly"] is True
    assert morsel["samesite"] == "strict"
    assert morsel["path"] == "/ui"
    assert morsel["secure"] == ""  # plain HTTP: a Secure cookie would never come back
    assert int(morsel["max-age"]) == 12 * 3600
    assert TOKEN not in morsel.value


async def test_over_https_the_cookie_is_secure(ledger: Ledger) -> None:
    app, _ = audit_app(ledger)
    async with client(app, base_url="https://audit.test") as http:
        response = await http.post("/ui/login", data={"token": TOKEN})
    assert set_cookie(response)[COOKIE]["secure"] is True


async def test_a_wrong_token_is_refused_counted_and_sets_nothing(ledger: Ledger) -> None:
    app, registry = audit_app(ledger)
    async with client(app) as http:
        wrong = await http.post("/ui/login", data={"token": TOKEN + "x"})
        empty = await http.post("/ui/login", data={"token": ""})
        page = await http.get("/ui/", params={"q": TICKET})
    for response in (wrong, empty):
        assert response.status_code == 401
        assert "set-cookie" not in response.headers
        assert "That token is not valid." in response.text
    assert wrong.text == empty.text  # no hint which part was wrong
    assert "dana@customer.test" not in page.text
    assert metric(registry, "notifier_audit_denied_total", endpoint="login", reason="wrong") == 1
    assert metric(registry, "notifier_audit_denied_total", endpoint="login", reason="missing") == 1
    assert metric(registry, "notifier_audit_requests_total", endpoint="login", code="401") == 2


async def test_the_token_itself_is_not_a_valid_cookie(ledger: Ledger) -> None:
    app, registry = audit_app(ledger)
    async with client(app) as http:
        http.cookies.set(COOKIE, TOKEN, domain="audit.test", path="/ui")
        response = await http.get("/ui/", params={"q": TICKET})
    assert response.status_code == 401
    assert "Sign in again" in response.text
    assert "dana@customer.test" not in response.text
    assert "Max-Age=0" in response.headers["set-cookie"]
    assert metric(registry, "notifier_audit_denied_total", endpoint="ui", reason="wrong") == 1


@pytest.mark.parametrize("q", [TICKET, REFERENCE, f"  {REFERENCE} "])
async def test_a_ticket_is_found_by_id_or_reference(ledger: Ledger, q: str) -> None:
    app, _ = audit_app(ledger)
    async with client(app) as http:
        await signed_in(http)
        response = await http.get("/ui/", params={"q": q})
    assert response.status_code == 200
    text = response.text
    assert 'Ticket <span class="id">1042</span>' in text
    for shown in (
        "dana@customer.test",
        "no-such-department",
        "Unknown token",
        "service@druckhaus.test",
        "&lt;a.5001.cc@helpdesk.test&gt;",
        "smtp: 550 5.1.1 mailbox unknown",
        "template error in staff.html",
        "partition 1 offset 41",
        "2026-11-18 11:06:40 UTC",
    ):
        assert shown in text, shown
    statuses = re.findall(r'<li class="entry status-(\w+)">', text)
    assert statuses == ["sent", "failed", "withheld", "unresolved", "sent", "sent", "dead"]
    assert "alice@helpdesk.test" in text  # staff row of ticket 1042
    assert "a.7001" not in text  # ticket 2000's row is not here


async def test_an_unknown_ticket_says_so(ledger: Ledger) -> None:
    app, _ = audit_app(ledger)
    async with client(app) as http:
        await signed_in(http)
        response = await http.get("/ui/", params={"q": "T-404"})
    assert response.status_code == 200
    assert "Nothing is recorded for <q>T-404</q>" in response.text


async def test_every_value_is_escaped(ledger: Ledger) -> None:
    await ledger.record_ticket("666", HOSTILE)
    await ledger.record(
        Entry(Key("6001", "staff", HOSTILE), Status.UNRESOLVED, HOSTILE, "666", reason=HOSTILE)
    )
    app, _ = audit_app(ledger)
    async with client(app) as http:
        await signed_in(http)
        found = await http.get("/ui/", params={"q": HOSTILE})
        missing = await http.get("/ui/", params={"q": HOSTILE + "?"})
    assert found.status_code == 200
    assert 'Ticket <span class="id">666</span>' in found.text
    for response in (found, missing):
        assert "<script" not in response.text
        assert "<img" not in response.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in response.text
        assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in response.text
    # title, search box, reference, recipient, Message-ID, reason: each shown, as text
    assert found.text.count("&lt;script&gt;") == 6


async def test_log_out_forgets_the_cookie(ledger: Ledger) -> None:
    app, _ = audit_app(ledger)
    async with client(app) as http:
        await signed_in(http)
        response = await http.post("/ui/logout")
        assert response.status_code == 303
        morsel = set_cookie(response)[COOKIE]
        assert (morsel.value, morsel["max-age"], morsel["path"]) == ("", "0", "/ui")
        page = await http.get("/ui/", params={"q": TICKET})
    assert 'action="/ui/login"' in page.text
    assert "dana@customer.test" not in page.text


async def test_forms_posted_from_another_site_are_refused(ledger: Ledger) -> None:
    app, _ = audit_app(ledger)
    async with client(app) as http:
        for path in ("/ui/login", "/ui/logout"):
            response = await http.post(
                path, data={"token": TOKEN}, headers={"Sec-Fetch-Site": "cross-site"}
            )
            assert response.status_code == 403
            assert "set-cookie" not in response.headers


async def test_a_huge_login_form_is_refused_unread(ledger: Ledger) -> None:
    app, _ = audit_app(ledger)
    async with client(app) as http:
        response = await http.post("/ui/login", data={"token": "x" * 100_000})
    assert response.status_code == 413


async def test_a_search_of_control_characters_is_400(ledger: Ledger) -> None:
    app, _ = audit_app(ledger)
    async with client(app) as http:
        await signed_in(http)
        response = await http.get("/ui/", params={"q": "10\x0042"})
    assert response.status_code == 400
    assert "q: " in response.text


async def test_static_files_and_the_slashless_path(ledger: Ledger) -> None:
    app, _ = audit_app(ledger)
    async with client(app) as http:
        css = await http.get("/ui/static/audit.css")
        icon = await http.get("/ui/static/favicon.svg")
        bare = await http.get("/ui")
        other = await http.get("/ui/static/../../etc/passwd")
    assert css.status_code == 200
    assert css.headers["content-type"] == "text/css; charset=utf-8"
    assert css.headers["cache-control"] == "max-age=3600"
    assert ".status-withheld" in css.text
    assert "@import" not in css.text
    assert "url(" not in css.text  # no fonts or images from anywhere
    assert icon.headers["content-type"] == "image/svg+xml"
    assert (bare.status_code, bare.headers["location"]) == (308, "/ui/")
    assert other.status_code == 404


# -- mounted in the service ----------------------------------------------------------------


def settings(**overrides: object) -> Settings:
    examples = Path(__file__).resolve().parent.parent / "examples"
    values: dict[str, object] = {
        "kafka_bootstrap_servers": f"127.0.0.1:{free_port()}",
        "smtp_port": free_port(),
        "directory_file": examples / "directory.yaml",
        "attachments_dir": examples / "attachments",
        "ledger_url": "memory://",
    }
    values.update(overrides)
    return load_settings(**values)


def service_client(s: Settings) -> httpx.AsyncClient:
    app = service.runtime.app.create_app(s)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://notifier")


@pytest.mark.parametrize("token", [None, ""])
async def test_without_a_token_the_audit_is_off(token: str | None) -> None:
    async with service_client(settings(http_token=token)) as http:
        for path in ("/deliveries", "/dead-letters", "/ui/", "/ui", "/ui/login", "/openapi.json"):
            response = await http.get(
                path, params={"ticket": TICKET}, headers={"Authorization": "Bearer x"}
            )
            assert response.status_code == 404, path
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/metrics")).status_code == 200


async def test_with_a_token_health_and_metrics_stay_open() -> None:
    async with service_client(settings(http_token=TOKEN)) as http:
        assert (await http.get("/healthz")).status_code == 200
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200
        assert "notifier_audit_requests_total" in metrics.text
        assert (await http.get("/deliveries", params={"ticket": TICKET})).status_code == 401
        assert (await http.get("/ui/")).status_code == 200
        assert (await http.get("/ui/static/audit.css")).status_code == 200
        assert (await http.get("/openapi.json")).status_code == 200
        assert (await http.get("/ui/elsewhere")).status_code == 404
        assert (await http.get("/deliveries/")).status_code == 404
        after = await http.get("/metrics")
    assert re.search(
        r'notifier_audit_denied_total\{endpoint="deliveries",reason="missing"\} 1\.0', after.text
    )


@pytest.mark.parametrize("token", ["has space", "tab\there", "naïve-token"])
def test_a_token_that_cannot_travel_in_a_header_is_a_bad_setting(token: str) -> None:
    with pytest.raises(SettingsError) as caught:
        settings(http_token=token)
    assert str(caught.value) == "NOTIFY_HTTP_TOKEN: must be printable ASCII without spaces"
    assert token not in str(caught.value)
