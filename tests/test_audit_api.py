"""GET /deliveries and /dead-letters on real SQLite and PostgreSQL ledgers: filters, order,
limits, bad input, the token, injection attempts, OpenAPI and the headers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from service.delivery.ledger import Entry, Key, Ledger, Status
from tests.audit_support import (
    AUTH,
    CSP,
    REFERENCE,
    ROWS,
    T0,
    TICKET,
    TOKEN,
    audit_app,
    client,
    fill,
    metric,
    newest_first,
)
from tests.ledger_support import BACKENDS, backend_url, opened, run_sql


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return backend_url(request, tmp_path)


@pytest.fixture
async def ledger(url: str) -> AsyncIterator[Ledger]:
    ledger = await opened(url)
    await fill(ledger, url)
    yield ledger
    await ledger.close()


async def get(ledger: Ledger, path: str, **params: Any) -> Any:
    app, _ = audit_app(ledger)
    async with client(app) as http:
        return await http.get(path, params=params or None, headers=AUTH)


def keys(response: Any) -> list[tuple[str, str, str]]:
    assert response.status_code == 200, response.text
    return [(d["activity"], d["kind"], d["recipient"]) for d in response.json()["deliveries"]]


# -- filters, order, limits ----------------------------------------------------------------


async def test_a_ticket_answers_its_rows_newest_first(ledger: Ledger) -> None:
    response = await get(ledger, "/deliveries", ticket=TICKET)
    assert keys(response) == newest_first(ROWS)
    rows = response.json()["deliveries"]
    assert rows[-1] == {
        "ticket": "1042",
        "activity": "5001",
        "kind": "customer_content",
        "recipient": "dana@customer.test",
        "status": "sent",
        "at": "2026-11-18T11:06:40Z",
        "message_id": "<a.5001.cc@helpdesk.test>",
        "reason": None,
    }
    assert [r["at"] for r in rows] == sorted((r["at"] for r in rows), reverse=True)
    assert response.headers["content-type"] == "application/json"


async def test_every_status_is_there_with_its_reason(ledger: Ledger) -> None:
    rows = (await get(ledger, "/deliveries", ticket=TICKET)).json()["deliveries"]
    by_recipient = {(r["kind"], r["recipient"]): r for r in rows}
    unresolved = by_recipient["staff", "no-such-department"]
    assert unresolved["status"] == "unresolved"  # the token, in `recipient`
    assert by_recipient["supplier", "service@druckhaus.test"]["status"] == "withheld"
    failed = by_recipient["staff", "bob@helpdesk.test"]
    assert (failed["status"], failed["reason"]) == ("failed", "smtp: 550 5.1.1 mailbox unknown")
    assert failed["message_id"] is None


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"activity": "5006"}, [("5006", "staff"), ("5006", "supplier")]),
        (
            {"recipient": "dana@customer.test"},
            [("5007", "customer_content"), ("5001", "customer_content")],
        ),
        (
            {"recipient": "DANA@Customer.Test"},
            [("5007", "customer_content"), ("5001", "customer_content")],
        ),
        ({"recipient": "no-such-department"}, [("5001", "staff")]),
        (
            {"status": "sent", "ticket": TICKET},
            [("5007", "customer_content"), ("5001", "staff"), ("5001", "customer_content")],
        ),
        ({"status": "withheld"}, [("5006", "supplier")]),
        (
            {"ticket": TICKET, "since": "2026-11-18T11:10:40Z"},
            [("5007", "customer_content"), ("5006", "staff")],
        ),
        (
            {"ticket": TICKET, "since": "2026-11-18T12:10:40+01:00"},
            [("5007", "customer_content"), ("5006", "staff")],
        ),
        ({"ticket": TICKET, "limit": "2"}, [("5007", "customer_content"), ("5006", "staff")]),
        ({"ticket": "2000"}, [("7001", "staff")]),
        ({"ticket": "9999"}, []),
        ({"activity": "5001", "recipient": "alice@helpdesk.test"}, [("5001", "staff")]),
    ],
)
async def test_filters(ledger: Ledger, params: dict[str, str], expected: list[Any]) -> None:
    assert [k[:2] for k in keys(await get(ledger, "/deliveries", **params))] == expected


async def test_without_filters_every_ticket_newest_first(ledger: Ledger) -> None:
    found = keys(await get(ledger, "/deliveries"))
    assert len(found) == len(ROWS) + 1
    assert found[-2:] == [("7001", "staff", "alice@helpdesk.test"), ROWS[0][:3]]


async def test_limit_defaults_to_100_and_stops_at_1000(ledger: Ledger, url: str) -> None:
    await asyncio.gather(
        *(
            ledger.record(Entry(Key(f"9{i:04}", "staff", "x@y.test"), Status.SENT, ticket_id="3"))
            for i in range(1001)
        )
    )
    run_sql(
        url, "UPDATE deliveries SET at=? + CAST(activity_id AS REAL) WHERE ticket_id='3'", (T0,)
    )
    default = keys(await get(ledger, "/deliveries", ticket="3"))
    assert len(default) == 100
    assert default[0][0] == "91000"  # the newest
    assert len(keys(await get(ledger, "/deliveries", ticket="3", limit="1000"))) == 1000
    assert (await get(ledger, "/deliveries", ticket="3", limit="1001")).status_code == 400


async def test_dead_letters_of_a_ticket(ledger: Ledger) -> None:
    response = await get(ledger, "/dead-letters", ticket=TICKET)
    assert response.status_code == 200
    [letter] = response.json()["dead_letters"]
    assert letter["topic"] == "ticket-activities"
    assert (letter["partition"], letter["offset"]) == (1, 41)
    assert (letter["stage"], letter["reason"]) == ("render", "template error in staff.html")
    assert letter["at"].endswith("Z")
    assert (await get(ledger, "/dead-letters", ticket="2000")).json() == {"dead_letters": []}


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("ticket=1042&tickt=1", "tickt"),
        ("order=at", "order"),
        ("since=yesterday", "since"),
        ("since=", "since"),
        ("limit=-1", "limit"),
        ("limit=0", "limit"),
        ("limit=10^9", "limit"),
        ("limit=1000000000", "limit"),
        ("limit=ten", "limit"),
        ("limit=2.5", "limit"),
        ("status=delivered", "status"),
        ("status=SENT", "status"),
        ("ticket=", "ticket"),
        ("ticket=10%0042", "ticket"),
        ("recipient=a%0Db@c.test", "recipient"),
        ("ticket=1&ticket=2", "ticket"),
        ("activity=" + "5" * 321, "activity"),
    ],
)
async def test_bad_input_is_400_naming_the_parameter(
    ledger: Ledger, query: str, parameter: str
) -> None:
    app, registry = audit_app(ledger)
    async with client(app) as http:
        response = await http.get(f"/deliveries?{query}", headers=AUTH)
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["error"] == "bad parameter"
        assert body["parameter"] == parameter
        assert body["detail"]
        # ...and the audit goes on answering.
        assert keys(await http.get("/deliveries", params={"ticket": TICKET}, headers=AUTH))
    assert metric(registry, "notifier_audit_requests_total", endpoint="deliveries", code="400") == 1


async def test_dead_letters_needs_a_ticket_and_nothing_else(ledger: Ledger) -> None:
    for query, parameter in (("", "ticket"), ("ticket=1&limit=3", "limit")):
        response = await get(ledger, f"/dead-letters?{query}")
        assert (response.status_code, response.json()["parameter"]) == (400, parameter)


# -- SQL metacharacters change nothing -----------------------------------------------------

INJECTIONS = [
    "1042' OR '1'='1",
    "1042' OR 1=1 --",
    "1042; DROP TABLE deliveries; --",
    '1042" OR ""="',
    "%",
    "_",
    "1042') UNION SELECT * FROM tickets --",
    "' OR ticket_id IS NOT NULL OR '",
    "\\'; DELETE FROM deliveries WHERE '1'='1",
]


@pytest.mark.parametrize("value", INJECTIONS)
@pytest.mark.parametrize("field", ["ticket", "activity", "recipient"])
async def test_sql_metacharacters_match_only_themselves(
    ledger: Ledger, url: str, field: str, value: str
) -> None:
    before = keys(await get(ledger, "/deliveries", ticket=TICKET))
    assert keys(await get(ledger, "/deliveries", **{field: value})) == []
    # A row whose value is exactly that text is found, and only it: the value was a value.
    key = Key(
        value if field == "activity" else "8001",
        "staff",
        value if field == "recipient" else "z@z.test",
    )
    await ledger.record(Entry(key, Status.SENT, ticket_id=value if field == "ticket" else "8"))
    assert keys(await get(ledger, "/deliveries", **{field: value})) == [tuple(key[:3])]
    assert keys(await get(ledger, "/deliveries", ticket=TICKET)) == before
    assert run_sql(url, "SELECT COUNT(*) FROM deliveries")[0][0] == len(ROWS) + 2


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"status": "sent' OR '1'='1"}, "status"),
        ({"since": "2026-01-01' OR 1=1 --"}, "since"),
        ({"limit": "1; DROP TABLE deliveries"}, "limit"),
    ],
)
async def test_sql_in_typed_parameters_is_refused(
    ledger: Ledger, url: str, params: dict[str, str], parameter: str
) -> None:
    response = await get(ledger, "/deliveries", **params)
    assert (response.status_code, response.json()["parameter"]) == (400, parameter)
    assert run_sql(url, "SELECT COUNT(*) FROM deliveries")[0][0] == len(ROWS) + 1


async def test_a_reference_with_metacharacters_finds_only_its_ticket(ledger: Ledger) -> None:
    from service.runtime.audit.report import find_tickets

    await ledger.record_ticket("4000", "T' OR '1'='1")
    await ledger.record(Entry(Key("4001", "staff", "q@q.test"), Status.SENT, ticket_id="4000"))
    [found] = await find_tickets(ledger, "T' OR '1'='1")
    assert found.ticket_id == "4000"
    assert [d.key.activity_id for d in found.deliveries] == ["4001"]
    assert await find_tickets(ledger, "' OR 1=1 --") == []
    [by_reference] = await find_tickets(ledger, REFERENCE)
    assert (by_reference.ticket_id, by_reference.reference) == (TICKET, REFERENCE)
    assert len(by_reference.dead_letters) == 1


# -- the token -----------------------------------------------------------------------------

WRONG = [
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
    {"Authorization": "Bearer "},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": TOKEN},
    {"Authorization": f"Bearer {TOKEN.upper()}"},
]


async def test_no_token_and_wrong_tokens_get_the_same_401_and_are_counted(ledger: Ledger) -> None:
    app, registry = audit_app(ledger)
    async with client(app) as http:
        missing = await http.get("/deliveries", params={"ticket": TICKET})
        wrong = [await http.get("/deliveries", params={"ticket": TICKET}, headers=h) for h in WRONG]
        # Parameters are not even looked at without the token.
        unchecked = await http.get("/deliveries?limit=-1&nonsense=1")
    for response in (missing, *wrong, unchecked):
        assert response.status_code == 401
        assert response.json() == {"error": "unauthorized"}
        assert response.headers["www-authenticate"] == 'Bearer realm="notifier audit"'
        assert "1042" not in response.text
    # No hint which part was wrong: same body and headers for every case.
    assert {(r.content, r.headers["content-length"]) for r in (missing, *wrong)} == {
        (missing.content, missing.headers["content-length"])
    }
    assert (
        metric(registry, "notifier_audit_denied_total", endpoint="deliveries", reason="missing")
        == 2
    )
    assert metric(
        registry, "notifier_audit_denied_total", endpoint="deliveries", reason="wrong"
    ) == len(WRONG)
    assert (
        metric(registry, "notifier_audit_requests_total", endpoint="deliveries", code="401")
        == len(WRONG) + 2
    )


async def test_the_scheme_is_case_insensitive(ledger: Ledger) -> None:
    app, _ = audit_app(ledger)
    async with client(app) as http:
        response = await http.get(
            "/deliveries", params={"ticket": TICKET}, headers={"Authorization": f"bearer {TOKEN}"}
        )
    assert keys(response) == newest_first(ROWS)


async def test_dead_letters_need_the_token_too(ledger: Ledger) -> None:
    app, _ = audit_app(ledger)
    async with client(app) as http:
        response = await http.get("/dead-letters", params={"ticket": TICKET})
    assert response.status_code == 401
    assert "render" not in response.text


async def test_a_request_is_counted_and_timed(ledger: Ledger) -> None:
    app, registry = audit_app(ledger)
    async with client(app) as http:
        for _ in range(3):
            await http.get("/deliveries", params={"ticket": TICKET}, headers=AUTH)
    assert metric(registry, "notifier_audit_requests_total", endpoint="deliveries", code="200") == 3
    assert metric(registry, "notifier_audit_request_seconds_count", endpoint="deliveries") == 3
    assert metric(registry, "notifier_audit_request_seconds_sum", endpoint="deliveries") > 0


# -- headers and the description -----------------------------------------------------------


async def test_every_answer_carries_the_security_headers(ledger: Ledger) -> None:
    app, _ = audit_app(ledger)
    async with client(app) as http:
        answers = [
            await http.get("/deliveries", params={"ticket": TICKET}, headers=AUTH),
            await http.get("/deliveries"),
            await http.get("/deliveries?limit=x", headers=AUTH),
            await http.get("/openapi.json"),
        ]
    for response in answers:
        assert response.headers["content-security-policy"] == CSP
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["cache-control"] == "no-store"


async def test_openapi_describes_the_audit_api(ledger: Ledger) -> None:
    app, _ = audit_app(ledger)
    async with client(app) as http:
        response = await http.get("/openapi.json")  # open: it holds no data
        assert (await http.get("/docs")).status_code == 404  # Swagger UI would need a CDN
    assert response.status_code == 200
    spec = response.json()
    assert set(spec["paths"]) == {"/deliveries", "/dead-letters"}
    params = {p["name"]: p for p in spec["paths"]["/deliveries"]["get"]["parameters"]}
    assert set(params) == {"ticket", "activity", "recipient", "status", "since", "limit"}
    assert params["limit"]["schema"]["maximum"] == 1000
    assert params["limit"]["schema"]["default"] == 100
    responses = spec["paths"]["/deliveries"]["get"]["responses"]
    assert {"200", "400", "401", "503"} <= set(responses)
    assert spec["components"]["securitySchemes"]["token"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <NOTIFY_HTTP_TOKEN>`",
    }
    row = spec["components"]["schemas"]["DeliveryRow"]["properties"]
    assert set(row) == {
        "ticket",
        "activity",
        "kind",
        "recipient",
        "status",
        "at",
        "message_id",
        "reason",
    }


# -- the ledger away -----------------------------------------------------------------------


def allow_connections(server: str, database: str, allow: bool) -> None:
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
                sql.Identifier(database), sql.SQL("true" if allow else "false")
            )
        )
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname=%s", (database,)
        )


@pytest.mark.integration
async def test_an_unreachable_ledger_is_503_and_the_audit_recovers(
    postgres_server: str, postgres_url: str
) -> None:
    ledger = await opened(postgres_url, connect_timeout=2.0)
    await fill(ledger, postgres_url)
    database = postgres_url.rsplit("/", 1)[1].split("?")[0]
    app, _ = audit_app(ledger)
    try:
        async with client(app) as http:
            await http.post("/ui/login", data={"token": TOKEN})
            allow_connections(postgres_server, database, False)
            try:
                api = await http.get("/deliveries", params={"ticket": TICKET}, headers=AUTH)
                page = await http.get("/ui/", params={"q": TICKET})
            finally:
                allow_connections(postgres_server, database, True)
            assert (api.status_code, api.json()) == (503, {"error": "ledger unreachable"})
            assert page.status_code == 503
            assert "cannot be reached" in page.text
            for _ in range(50):  # the pool replaces its broken connections
                again = await http.get("/deliveries", params={"ticket": TICKET}, headers=AUTH)
                if again.status_code == 200:
                    break
                await asyncio.sleep(0.2)
            assert keys(again) == newest_first(ROWS)
    finally:
        await ledger.close()
