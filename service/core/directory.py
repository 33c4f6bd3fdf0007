"""The directory: departments, users, suppliers and tickets that activity tokens name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError

from service.core.events import Customer, Ticket
from service.core.fields import looks_like_email, looks_like_locale, parse_tokens
from service.core.text import one_line

SECTIONS = ("departments", "users", "suppliers", "tickets")
_CONTACT_KEYS = frozenset({"name", "email", "locale"})
_DEPARTMENT_KEYS = frozenset({"name", "email", "locale", "members"})
_TICKET_KEYS = frozenset({"reference", "subject", "customer"})

T = TypeVar("T")


class DirectoryError(Exception):
    """The directory file is unreadable or invalid; the message names file, entry and problem."""


@dataclass(frozen=True, slots=True)
class Contact:
    """One recipient: display name, address and the locale to write in."""

    name: str
    email: str
    locale: str = "en"

    def __reduce__(self) -> tuple[type[Contact], tuple[str, str, str]]:
        # As its fields: cheaper than a slots dataclass's default (see Notification).
        return (Contact, (self.name, self.email, self.locale))


def normalize_token(token: str) -> str:
    """The form tokens are compared in: trimmed, inner whitespace collapsed, case-folded."""
    return one_line(token).casefold()


class Directory:
    """Resolves activity tokens (an entry's key or name, or an e-mail address) to contacts."""

    def __init__(
        self,
        *,
        departments: Mapping[str, tuple[Contact, ...]] | None = None,
        users: Mapping[str, Contact] | None = None,
        suppliers: Mapping[str, Contact] | None = None,
        tickets: Mapping[str, Ticket] | None = None,
    ) -> None:
        """Build from lookup tables keyed by token (key or name); see `from_mapping`."""
        self._departments = {normalize_token(k): v for k, v in (departments or {}).items()}
        self._users = {normalize_token(k): v for k, v in (users or {}).items()}
        self._suppliers = {normalize_token(k): v for k, v in (suppliers or {}).items()}
        self._tickets = {k.strip(): v for k, v in (tickets or {}).items()}
        # Who an address token is, to show a name instead of the address: users first, then
        # department mailboxes, then suppliers; the first entry with an address wins.
        self._by_address: dict[str, Contact] = {}
        for group in (
            self._users.values(),
            (c for cs in self._departments.values() for c in cs),
            self._suppliers.values(),
        ):
            for contact in group:
                self._by_address.setdefault(contact.email.lower(), contact)

    @classmethod
    def empty(cls) -> Directory:
        """A directory that knows nobody: only e-mail address tokens resolve."""
        return cls()

    @classmethod
    def from_mapping(cls, data: Any, *, source: str = "directory") -> Directory:
        """Build from the parsed YAML (contract section 3); raise DirectoryError naming `source`."""
        return _Loader(source).load(data)

    def department(self, token: str) -> tuple[Contact, ...] | None:
        """The contacts a department token reaches (its members, or its mailbox); None: unknown."""
        address = self._address_contact(token)
        return (address,) if address else self._departments.get(normalize_token(token))

    def user(self, token: str) -> Contact | None:
        """The staff user a token names; None: unknown."""
        return self._address_contact(token) or self._users.get(normalize_token(token))

    def supplier(self, token: str) -> Contact | None:
        """The supplier a token names; None: unknown."""
        return self._address_contact(token) or self._suppliers.get(normalize_token(token))

    def ticket(self, ticket_id: str) -> Ticket | None:
        """The ticket with this id, with its customer; None: unknown."""
        return self._tickets.get(ticket_id.strip())

    def _address_contact(self, token: str) -> Contact | None:
        """A token that is an e-mail address; None for any other token.

        Contract section 2: the address is used as it is. When an entry has that address,
        its name and locale come along, so mail shows "Alice Jones", not the address.
        """
        address = token.strip()
        if not looks_like_email(address):
            return None
        known = self._by_address.get(address.lower())
        if known is None:
            return Contact(name=address, email=address)
        return Contact(name=known.name, email=address, locale=known.locale)


def load_directory(path: Path) -> Directory:
    """Load and validate the directory YAML once; raise DirectoryError on any problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise DirectoryError(f"{path}: cannot read: {reason}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = one_line(str(getattr(exc, "problem", None) or "syntax error"))
        raise DirectoryError(f"{path}: not valid YAML{where}: {problem}") from None
    return Directory.from_mapping(data, source=str(path))


class _Loader:
    """Validates the YAML document entry by entry, with messages naming file and entry."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, what: str) -> DirectoryError:
        message = f"{self.source}: {where}: {what}"
        # One line, always: control characters from the file are shown escaped.
        return DirectoryError("".join(c if c.isprintable() else repr(c)[1:-1] for c in message))

    def load(self, data: Any) -> Directory:
        data = {} if data is None else data
        root = self.mapping("(top level)", data)
        for section in root:
            if section not in SECTIONS:
                raise self.fail(
                    str(section), f"unknown section (expected one of {', '.join(SECTIONS)})"
                )
        users = self.entries("users", root.get("users"), self.contact)
        departments = self.entries(
            "departments",
            root.get("departments"),
            lambda where, key, raw: self.department(where, key, raw, users),
        )
        suppliers = self.entries("suppliers", root.get("suppliers"), self.contact)
        tickets = {
            key: self.ticket(f"tickets.{key}", key, raw)
            for key, raw in self.keyed("tickets", root.get("tickets"))
        }
        return Directory(departments=departments, users=users, suppliers=suppliers, tickets=tickets)

    def mapping(self, where: str, raw: Any) -> Mapping[Any, Any]:
        if not isinstance(raw, Mapping):
            raise self.fail(where, "expected a mapping")
        return raw

    def keyed(self, section: str, raw: Any) -> list[tuple[str, Any]]:
        """A section's (key, entry) pairs; keys must be text or integers."""
        items = []
        for key, entry in self.mapping(section, {} if raw is None else raw).items():
            if isinstance(key, bool) or not isinstance(key, str | int) or not str(key).strip():
                raise self.fail(f"{section}.{key}", "key must be text (quote it)")
            items.append((str(key).strip(), entry))
        return items

    def entries(self, section: str, raw: Any, build: Callable[[str, str, Any], T]) -> dict[str, T]:
        """Entries indexed by key and by name, case-insensitively; ambiguity is an error."""
        index: dict[str, T] = {}
        owner: dict[str, str] = {}
        for key, entry in self.keyed(section, raw):
            where = f"{section}.{key}"
            value = build(where, key, entry)
            for token in dict.fromkeys([key, self.text(where, entry, "name", key)]):
                norm = normalize_token(token)
                if norm in owner and owner[norm] != key:
                    raise self.fail(where, f"{token[:40]!r} also names {section}.{owner[norm]}")
                owner[norm], index[token] = key, value
        return index

    def known_keys(self, where: str, raw: Mapping[Any, Any], allowed: frozenset[str]) -> None:
        for key in raw:
            if key not in allowed:
                raise self.fail(
                    where, f"unknown key {str(key)[:40]!r} (expected {', '.join(sorted(allowed))})"
                )

    def text(self, where: str, raw: Mapping[Any, Any], key: str, default: str) -> str:
        value = raw.get(key)
        if value is None:
            return default
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise self.fail(where, f"{key}: not text (quote it)")
        return one_line(str(value)) or default

    def email(self, where: str, raw: Mapping[Any, Any]) -> str:
        # Addresses end up in SMTP commands and headers: CR, LF, NUL and spaces are refused.
        value = raw.get("email")
        if not isinstance(value, str) or not looks_like_email(value.strip()):
            raise self.fail(where, "email: not an e-mail address")
        return value.strip()

    def locale(self, where: str, raw: Mapping[Any, Any]) -> str:
        locale = self.text(where, raw, "locale", "en")
        if not looks_like_locale(locale):
            raise self.fail(where, f"locale: not a locale tag: {locale[:40]!r}")
        return locale

    def contact(
        self, where: str, default_name: str, raw: Any, *, allowed: frozenset[str] = _CONTACT_KEYS
    ) -> Contact:
        entry = self.mapping(where, raw)
        self.known_keys(where, entry, allowed)
        name = self.text(where, entry, "name", default_name)
        return Contact(name, self.email(where, entry), self.locale(where, entry))

    def department(
        self, where: str, key: str, raw: Any, users: Mapping[str, Contact]
    ) -> tuple[Contact, ...]:
        entry = self.mapping(where, raw)
        self.known_keys(where, entry, _DEPARTMENT_KEYS)
        members = self.members(where, entry.get("members"), users)
        if members:
            if entry.get("email") is not None:  # validated even though the members are reached
                self.email(where, entry)
            self.locale(where, entry)
            return members
        if entry.get("email") is None:
            raise self.fail(where, "has neither members nor email")
        return (self.contact(where, key, entry, allowed=_DEPARTMENT_KEYS),)

    def members(self, where: str, raw: Any, users: Mapping[str, Contact]) -> tuple[Contact, ...]:
        if raw is not None and not isinstance(raw, str | list):
            raise self.fail(where, "members: expected a list of user keys")
        try:
            tokens = parse_tokens(raw)
        except ValueError:
            raise self.fail(where, "members: expected a list of user keys") from None
        lookup = {normalize_token(k): v for k, v in users.items()}
        contacts = []
        for token in tokens:
            if normalize_token(token) not in lookup:
                raise self.fail(where, f"members: {token[:40]!r} is not a user")
            contacts.append(lookup[normalize_token(token)])
        return tuple(contacts)

    def ticket(self, where: str, key: str, raw: Any) -> Ticket:
        entry = self.mapping(where, raw)
        self.known_keys(where, entry, _TICKET_KEYS)
        customer = None
        if entry.get("customer") is not None:
            found = self.contact(f"{where}.customer", "", entry["customer"])
            customer = Customer(name=found.name, email=found.email, locale=found.locale)
        reference = self.text(where, entry, "reference", "")
        subject = self.text(where, entry, "subject", "")
        try:
            return Ticket(id=key, reference=reference, subject=subject, customer=customer)
        except ValidationError as exc:
            raise self.fail(where, f"not a ticket: {exc.errors()[0]['msg']}") from None
