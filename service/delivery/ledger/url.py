"""NOTIFY_LEDGER_URL parsed and checked, with a form that is safe to print (no password)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from service.delivery.ledger.errors import LedgerConfigError

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

SETTING = "NOTIFY_LEDGER_URL"
FORMS = "sqlite:///PATH, memory:// or postgresql://USER:PASSWORD@HOST:PORT/DB"


@dataclass(frozen=True, slots=True)
class LedgerUrl:
    """Where the ledger lives. `str()` and `repr()` never show the password."""

    backend: Literal["sqlite", "postgres"]
    path: str = ""
    """SQLite: the file, or ':memory:'."""
    host: str = ""
    port: int | None = None
    user: str = ""
    password: str = field(default="", repr=False)
    dbname: str = ""
    options: tuple[tuple[str, str], ...] = ()
    """Further libpq parameters from the query string (sslmode=require, ...)."""

    def __str__(self) -> str:
        return self.redacted

    @property
    def redacted(self) -> str:
        if self.backend == "sqlite":
            return "memory://" if self.path == ":memory:" else f"sqlite:///{self.path}"
        auth = f"{self.user}:***@" if self.password else (f"{self.user}@" if self.user else "")
        port = f":{self.port}" if self.port else ""
        return f"postgresql://{auth}{self.host}{port}/{self.dbname}"

    def conninfo(self) -> str:
        """A libpq connection string (holds the password: never log it)."""
        from psycopg.conninfo import make_conninfo

        params: dict[str, str | int] = dict(self.options)
        for name, value in (
            ("host", self.host),
            ("port", self.port),
            ("user", self.user),
            ("password", self.password),
            ("dbname", self.dbname),
        ):
            if value:
                params[name] = value
        return make_conninfo("", **params)

    def sqlalchemy_url(self) -> URL:
        """The same database for SQLAlchemy (Alembic): `postgresql+psycopg` or `sqlite`."""
        from sqlalchemy.engine import URL

        if self.backend == "sqlite":
            return URL.create("sqlite", database=self.path)
        return URL.create(
            "postgresql+psycopg",
            username=self.user or None,
            password=self.password or None,
            host=self.host or None,
            port=self.port,
            database=self.dbname or None,
            query=dict(self.options),
        )


def _refuse(why: str) -> LedgerConfigError:
    return LedgerConfigError(f"{SETTING}: {why}")


def parse_ledger_url(url: str) -> LedgerUrl:
    """Check and split a ledger URL; LedgerConfigError naming the setting (never the password)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise _refuse(f"not a URL; expected {FORMS}")
    scheme = scheme.lower()
    if scheme == "memory":
        if rest:
            raise _refuse("memory:// takes nothing after it")
        return LedgerUrl("sqlite", path=":memory:")
    if scheme == "sqlite":
        if not rest.startswith("/") or rest == "/":
            raise _refuse("expected sqlite:///PATH (three slashes, then the file)")
        path = rest[1:]
        if "\0" in path:
            raise _refuse("the SQLite path holds a NUL character")
        return LedgerUrl("sqlite", path=path)
    if scheme in {"postgresql", "postgres"}:
        return _parse_postgres(url)
    raise _refuse(f"unknown scheme {scheme[:20]!r}; expected {FORMS}")


def _parse_postgres(url: str) -> LedgerUrl:
    # The messages below name the part at fault, never the URL: it may hold the password.
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _refuse("malformed PostgreSQL URL (check the port and brackets)") from None
    if parts.fragment:
        raise _refuse("malformed PostgreSQL URL ('#' must be written %23)")
    if "," in parts.netloc.rpartition("@")[2]:
        raise _refuse("one host only (no comma-separated list)")
    dbname = unquote(parts.path.removeprefix("/"))
    if "/" in dbname:
        raise _refuse("the database name holds a '/'")
    try:
        query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise _refuse("malformed query string in the PostgreSQL URL") from None
    reserved = {"host", "port", "user", "password", "dbname"}
    if bad := [k for k, _ in query if k in reserved]:
        raise _refuse(f"put {bad[0]} in the URL itself, not in its query string")
    found = LedgerUrl(
        "postgres",
        host=parts.hostname or "",
        port=port,
        user=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
        dbname=dbname,
        options=tuple(query),
    )
    from psycopg import ProgrammingError

    try:
        found.conninfo()
    except ProgrammingError:
        names = ", ".join(k for k, _ in query)
        raise _refuse(f"unknown connection option among: {names}") from None
    return found
