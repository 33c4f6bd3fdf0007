"""Tests of service.core.directory: loading and validating the YAML, and resolving tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from service.core.directory import Contact, Directory, DirectoryError, load_directory
from service.core.events import Customer, Ticket

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "directory.yaml"

ALICE = Contact("Alice Jones", "alice@helpdesk.test", "en")
BOB = Contact("Bob Lee", "bob@helpdesk.test", "de")


@pytest.fixture(scope="module")
def directory() -> Directory:
    return load_directory(EXAMPLE)


def write(tmp_path: Path, document: Any) -> Path:
    path = tmp_path / "directory.yaml"
    path.write_text(
        document if isinstance(document, str) else yaml.safe_dump(document, sort_keys=False)
    )
    return path


def load_error(tmp_path: Path, document: Any) -> str:
    with pytest.raises(DirectoryError) as caught:
        load_directory(write(tmp_path, document))
    return str(caught.value)


# --- lookups -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token", ["alice", "Alice Jones", "ALICE", "  alice jones ", "Alice   Jones"]
)
def test_users_match_key_or_name_case_insensitively_and_trimmed(
    directory: Directory, token: str
) -> None:
    assert directory.user(token) == ALICE


def test_department_with_members_reaches_each_member(directory: Directory) -> None:
    assert directory.department("support") == (ALICE, BOB)
    assert directory.department("customer support") == (ALICE, BOB)


def test_department_with_only_a_mailbox_reaches_that_mailbox(directory: Directory) -> None:
    assert directory.department("Billing") == (Contact("Billing", "billing@helpdesk.test", "de"),)


def test_suppliers_match_key_or_name(directory: Directory) -> None:
    acme = Contact("ACME Parts", "orders@acme.test", "en")
    assert directory.supplier("acme") == acme
    assert directory.supplier("acme parts") == acme


def test_unknown_tokens_resolve_to_none(directory: Directory) -> None:
    assert directory.user("mallory") is None
    assert directory.department("sales") is None
    assert directory.supplier("alice") is None  # sections do not mix
    assert directory.ticket("9999") is None


def test_a_token_that_is_an_email_address_is_used_as_it_is(directory: Directory) -> None:
    contact = Contact("x@elsewhere.test", "x@elsewhere.test", "en")
    assert directory.user(" x@elsewhere.test ") == contact
    assert directory.department("x@elsewhere.test") == (contact,)
    assert directory.supplier("x@elsewhere.test") == contact
    assert Directory.empty().user("x@elsewhere.test") == contact


def test_an_address_the_directory_knows_brings_its_name_and_locale(directory: Directory) -> None:
    # The address stays as written (contract section 2); the name replaces it in the mail.
    assert directory.user("alice@helpdesk.test") == ALICE
    assert directory.user(" BOB@helpdesk.test ") == Contact("Bob Lee", "BOB@helpdesk.test", "de")
    assert directory.department("bob@helpdesk.test") == (BOB,)
    billing = Contact("Billing", "billing@helpdesk.test", "de")
    assert directory.user("billing@helpdesk.test") == billing  # a department mailbox
    acme = Contact("ACME Parts", "orders@acme.test", "en")
    assert directory.supplier("orders@acme.test") == acme
    # Customers are not staff: their addresses are not looked up.
    assert directory.user("dana@customer.test") == Contact(
        "dana@customer.test", "dana@customer.test", "en"
    )


@pytest.mark.parametrize(
    "token",
    [
        "not an@address.test",
        "a@b@c",
        "@nolocal.test",
        "x@",
        "x@evil.test\r\nBcc: y@evil.test",
        "x@evil.test,y@evil.test",
        "x@evil.test>, <y@evil.test",
        "=?utf-8?q?x?=@evil.test",
        "x@evil.test\x00y@evil.test",
        "x@[127.0.0.1]",
        '"quoted"@evil.test',
        "ü@staff.test",
        "x@-bad-.test",
        "x@a..test",
    ],
)
def test_address_like_tokens_that_are_not_addresses_stay_unknown(token: str) -> None:
    assert Directory.empty().user(token) is None


@pytest.mark.parametrize(
    "token",
    ["a.b+tag@staff.test", "a.@staff.test", "a..b@staff.test", "x@bücher.test", "x@localhost"],
)
def test_plain_and_international_domain_addresses_are_addresses(token: str) -> None:
    assert Directory.empty().user(token) == Contact(token, token, "en")


def test_tickets_come_with_their_customer(directory: Directory) -> None:
    customer = Customer(name="Dana Smith", email="dana@customer.test", locale="de")
    assert directory.ticket("1042") == Ticket(
        id="1042", reference="T-1042", subject="Printer on floor 3 jams", customer=customer
    )
    assert directory.ticket(" 1042 ") == directory.ticket("1042")


def test_empty_directory_knows_nobody() -> None:
    empty = Directory.empty()
    assert empty.user("alice") is None
    assert empty.department("support") is None
    assert empty.ticket("1042") is None


def test_from_mapping_builds_the_same_directory_without_a_file() -> None:
    built = Directory.from_mapping(yaml.safe_load(EXAMPLE.read_text()))
    assert built.user("bob") == BOB


def test_empty_file_is_an_empty_directory(tmp_path: Path) -> None:
    assert load_directory(write(tmp_path, "")).user("alice") is None


def test_integer_ticket_keys_and_department_locale(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "tickets:\n  1042: {reference: T-1042}\n"
        "departments:\n  ops: {email: ops@x.test, locale: de-AT}\n",
    )
    loaded = load_directory(path)
    assert loaded.ticket("1042") == Ticket(id="1042", reference="T-1042")
    assert loaded.department("ops") == (Contact("ops", "ops@x.test", "de-AT"),)


# --- validation at load --------------------------------------------------------------------


def user(email: Any = "a@x.test", **more: Any) -> dict[str, Any]:
    return {"users": {"alice": {"name": "Alice", "email": email, **more}}}


@pytest.mark.parametrize(
    "email",
    [
        "alice",
        "alice@x.test\r\nBcc: evil@x.test",
        "alice @x.test",
        "a\x00@x.test",
        "a@x.test,b@x.test",
        5,
        None,
    ],
)
def test_bad_email_addresses_are_refused_naming_file_and_entry(tmp_path: Path, email: Any) -> None:
    message = load_error(tmp_path, user(email))
    assert message == f"{tmp_path / 'directory.yaml'}: users.alice: email: not an e-mail address"


def test_message_format_matches_the_contract_example(tmp_path: Path) -> None:
    message = load_error(tmp_path, user("not-an-address"))
    assert message.endswith("directory.yaml: users.alice: email: not an e-mail address")


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (
            {"departments": {"support": {"members": ["carol"]}}},
            "departments.support: members: 'carol' is not a user",
        ),
        (
            {"departments": {"support": {"name": "Support"}}},
            "departments.support: has neither members nor email",
        ),
        (
            {"departments": {"support": {"members": [], "email": "bad"}}},
            "departments.support: email",
        ),
        ({"departments": {"support": {"members": 5}}}, "departments.support: members"),
        (user(emial="typo@x.test"), "users.alice: unknown key 'emial'"),
        (user(locale="../../etc"), "users.alice: locale: not a locale tag"),
        (user(name=["list"]), "users.alice: name: not text"),
        ({"users": {"alice": "alice@x.test"}}, "users.alice: expected a mapping"),
        ({"users": ["alice"]}, "users: expected a mapping"),
        ({"people": {}}, "people: unknown section"),
        ({"suppliers": {"acme": {"name": "ACME"}}}, "suppliers.acme: email: not an e-mail address"),
        ({"tickets": {"1042": {"customer": {"email": "dana"}}}}, "tickets.1042.customer: email"),
        ({"tickets": {"1042": {"owner": "x"}}}, "tickets.1042: unknown key 'owner'"),
        (
            {"users": {"alice": {"email": "a@x.test"}, "ALICE": {"email": "b@x.test"}}},
            "users.ALICE: 'ALICE' also names users.alice",
        ),
        (
            {
                "users": {
                    "alice": {"email": "a@x.test"},
                    "al": {"name": "Alice", "email": "b@x.test"},
                }
            },
            "users.al: 'Alice' also names users.alice",
        ),
        (
            {"tickets": {"10\n42": {}}},
            "tickets.10\\n42: not a ticket: id contains control characters",
        ),
        ("[1, 2]", "(top level): expected a mapping"),
        ("users: {yes: {email: a@x.test}}", "key must be text"),
    ],
)
def test_invalid_entries_are_load_time_errors(tmp_path: Path, document: Any, expected: str) -> None:
    message = load_error(tmp_path, document)
    assert message.isprintable()
    assert message.startswith(str(tmp_path / "directory.yaml") + ": ")
    assert expected in message


def test_invalid_yaml_is_one_clear_line(tmp_path: Path) -> None:
    message = load_error(tmp_path, "users:\n  alice: {name: [unclosed\n")
    assert "not valid YAML" in message
    assert "\n" not in message


def test_missing_file_is_a_directory_error(tmp_path: Path) -> None:
    with pytest.raises(DirectoryError, match="cannot read"):
        load_directory(tmp_path / "nope.yaml")
