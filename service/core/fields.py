"""Lenient parsers for the activity's field shapes: ids, presets, token lists, dates and times."""

import datetime as dt
import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError

from service.core.text import one_line

# Values shown in error reasons are cut to this many characters: reasons travel in DLQ
# headers and logs, which must never carry user texts.
MAX_SHOWN = 40
MAX_ID_LENGTH = 200

_YES = frozenset({"yes", "y", "true", "1"})
_NO = frozenset({"no", "n", "false", "0"})
# ticket-activity.md: preset objects carry their text in `name`, then `value`, then `label`.
_PRESET_KEYS = ("name", "value", "label")
_TOKEN_SEPARATORS = re.compile(r"[,;\n\r\v\f\x85\u2028\u2029]")
_TIME = re.compile(r"([01]?[0-9]|2[0-3]):([0-5][0-9])(?::([0-5][0-9]))?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Deliberately simple, but no looser than what service.core.mime can write to a header: an
# ASCII local part of RFC 5322 atext and dots, and a host name (IDN allowed, RFC 5890).
# "=?" is refused because mail parsers decode RFC 2047 encoded words even in addresses.
_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_LOCALE = re.compile(r"[A-Za-z]{2,3}(?:[_-][A-Za-z0-9]{2,8})*")


def describe(value: Any) -> str:
    """Describe an input value for an error reason: short, single-line, never a long text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if -(10**30) < value < 10**30 else "a huge integer"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        # repr() escapes CR, LF and every other non-printable character.
        shown = repr(value[:MAX_SHOWN])
        return shown + "..." if len(value) > MAX_SHOWN else shown
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return type(value).__name__


def _fail(kind: str, message: str, value: Any = None) -> PydanticCustomError:
    if value is None:
        return PydanticCustomError(kind, message)
    return PydanticCustomError(kind, message + ": {value}", {"value": describe(value)})


def looks_like_email(text: str) -> bool:
    """Tell whether `text` is a plain `local@domain` address safe to put in a header."""
    local, at, domain = text.rpartition("@")
    if not at or len(text) > 254 or "=?" in text or not _LOCAL_PART.fullmatch(local):
        return False
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except ValueError:  # UnicodeError: not a valid internationalised domain name
            return False
    return _HOST_NAME.fullmatch(domain) is not None


def looks_like_locale(text: str) -> bool:
    """Tell whether `text` is a locale tag such as `en`, `de` or `de-AT`."""
    return len(text) <= 35 and _LOCALE.fullmatch(text) is not None


def _preset_inner(value: Mapping[Any, Any]) -> Any:
    """The text of a preset object; None when its name/value/label are all null (not set)."""
    if not any(key in value for key in _PRESET_KEYS):
        raise _fail("preset", "preset object has no name, value or label")
    for key in _PRESET_KEYS:
        inner = value.get(key)
        if inner is not None:
            return inner  # a nested object or array is then refused by the caller
    return None


def parse_identifier(value: Any) -> str:
    """An id: text or an integer, normalised to non-blank text without control characters."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not -(10**30) < value < 10**30:
            raise _fail("identifier", "id is too long")
        value = str(value)
    if not isinstance(value, str):
        raise _fail("identifier", "not an id (text or integer expected)", value)
    text = value.strip()
    if not text:
        raise _fail("identifier", "id is blank")
    if len(text) > MAX_ID_LENGTH:
        raise _fail("identifier", "id is too long")
    if _CONTROL.search(text):
        raise _fail("identifier", "id contains control characters")
    return text


def parse_optional_identifier(value: Any) -> str | None:
    """Like `parse_identifier`, but null and blank mean "none"."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return parse_identifier(value)


def parse_text(value: Any) -> str:
    """A free text: null means empty; anything but text is an error (the text is never shown)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    raise _fail("text", "not text")


def parse_preset_text(value: Any) -> str | None:
    """A preset shown as text: a string, an integer, or a preset object; null/blank is None."""
    if isinstance(value, Mapping):
        value = _preset_inner(value)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return parse_identifier(value)
    if isinstance(value, str):
        return value.strip() or None
    raise _fail("preset", "not a preset value", value)


def parse_yes_no(value: Any) -> bool:
    """A yes/no preset. null and "" mean "not set" (no); anything unrecognised is an error."""
    if isinstance(value, Mapping):
        value = _preset_inner(value)
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return value == 1
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _YES:
            return True
        if word in _NO or not word:
            return False
    raise _fail("yes_no", "not a yes/no value", value)


def _token(item: Any) -> str:
    if isinstance(item, Mapping):
        item = _preset_inner(item)
    if isinstance(item, int) and not isinstance(item, bool):
        return parse_identifier(item)
    if isinstance(item, str):
        return item.strip()
    raise _fail("tokens", "not a list of names", item)


def parse_tokens(value: Any) -> tuple[str, ...]:
    """A list field: text split on commas, semicolons and new lines, or a JSON array."""
    if value is None:
        return ()
    if isinstance(value, str):
        parts: list[str] = [part.strip() for part in _TOKEN_SEPARATORS.split(value)]
    elif isinstance(value, list | tuple):
        parts = [_token(item) for item in value]
    else:
        raise _fail("tokens", "not a list of names", value)
    return tuple(part for part in parts if part)


def parse_date(value: Any) -> dt.date | dt.datetime | None:
    """An ISO 8601 date or date-time; null and "" mean "not set"."""
    if value is None or isinstance(value, dt.date):
        return value
    if not isinstance(value, str):
        raise _fail("date", "not an ISO 8601 date or date-time", value)
    text = value.strip()
    if not text:
        return None
    if len(text) <= 64:
        try:
            return dt.date.fromisoformat(text)
        except ValueError:
            pass
        try:
            return dt.datetime.fromisoformat(text)
        except ValueError:
            pass
    raise _fail("date", "not an ISO 8601 date or date-time", value)


def parse_time(value: Any) -> dt.time | None:
    """A time of day, `HH:MM` or `HH:MM:SS` (24 h); null and "" mean "not set"."""
    if value is None:
        return None
    if isinstance(value, dt.time):
        if value.tzinfo is not None:
            raise _fail("time", "a time of day carries no UTC offset")
        # Whole seconds only, so that the wire form (HH:MM:SS) parses back to the same value.
        return value.replace(microsecond=0)
    if not isinstance(value, str):
        raise _fail("time", "not a time of day (HH:MM or HH:MM:SS)", value)
    text = value.strip()
    if not text:
        return None
    match = _TIME.fullmatch(text) if len(text) <= 16 else None
    if match is None:
        raise _fail("time", "not a time of day (HH:MM or HH:MM:SS)", value)
    hour, minute, second = match.groups()
    return dt.time(int(hour), int(minute), int(second or 0))


def parse_timestamp(value: Any) -> dt.datetime | None:
    """A CloudEvents `time` (RFC 3339); null means "not set"."""
    if value is None or isinstance(value, dt.datetime):
        return value
    if isinstance(value, str) and len(value) <= 64:
        try:
            return dt.datetime.fromisoformat(value.strip())
        except ValueError:
            pass
    raise _fail("timestamp", "not an RFC 3339 timestamp", value)


def parse_email(value: Any) -> str:
    """An e-mail address (`local@domain`), trimmed."""
    if isinstance(value, str) and looks_like_email(value.strip()):
        return value.strip()
    raise _fail("email", "not an e-mail address", value)


def parse_locale(value: Any) -> str:
    """A locale tag; null, blank or unrecognised falls back to English (the contract's fallback)."""
    if isinstance(value, str) and looks_like_locale(value.strip()):
        return value.strip()
    return "en"


def parse_line(value: Any) -> str:
    """A one-line text (names, subjects): null means empty; line breaks become spaces."""
    return one_line(parse_text(value))


Identifier = Annotated[str, BeforeValidator(parse_identifier)]
OptionalIdentifier = Annotated[str | None, BeforeValidator(parse_optional_identifier)]
Text = Annotated[str, BeforeValidator(parse_text)]
Line = Annotated[str, BeforeValidator(parse_line)]
PresetText = Annotated[str | None, BeforeValidator(parse_preset_text)]
YesNo = Annotated[bool, BeforeValidator(parse_yes_no)]
Tokens = Annotated[tuple[str, ...], BeforeValidator(parse_tokens)]
OptionalDate = Annotated[dt.date | dt.datetime | None, BeforeValidator(parse_date)]
OptionalTime = Annotated[dt.time | None, BeforeValidator(parse_time)]
Timestamp = Annotated[dt.datetime | None, BeforeValidator(parse_timestamp)]
Email = Annotated[str, BeforeValidator(parse_email)]
Locale = Annotated[str, BeforeValidator(parse_locale)]
