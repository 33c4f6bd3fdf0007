"""Low-level MIME encoders: header sanitising, RFC 2047 words, addresses and body encodings."""

from __future__ import annotations

import base64
import binascii
import re
from functools import lru_cache
from urllib.parse import quote

from service.core.text import one_line

CRLF = "\r\n"
# RFC 5322 §2.1.1: lines SHOULD stay within 78 characters; encoded words get their own
# limit of 75 (RFC 2047 §2), and a line holding one SHOULD stay within 76.
_FOLD_AT = 78
_WORD_MAX = 75
_WORD_OVERHEAD = len("=?utf-8?b??=")

# RFC 5322 §3.2.3 atext plus space: a display name made only of these needs no quoting.
_ATEXT_PHRASE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]*")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ATOM = re.compile(_ATEXT)
_DOT_ATOM = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")
_LOOSE_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+")
# RFC 2045 §5.1 token characters, for a media type taken from outside, with optional
# `; attribute=token` parameters (e.g. text/calendar's charset and method, RFC 6047 §2.4).
_TSPECIAL_FREE = r"[A-Za-z0-9!#$&^_.+-]+"
_MEDIA_TYPE = re.compile(
    rf"({_TSPECIAL_FREE}/{_TSPECIAL_FREE})((?:[ \t]*;[ \t]*{_TSPECIAL_FREE}={_TSPECIAL_FREE})*)"
)
_MEDIA_PARAM = re.compile(rf"({_TSPECIAL_FREE})=({_TSPECIAL_FREE})")
_ESCAPE_UNIT = re.compile(r"%[0-9A-F]{2}|[^%]")
_ASCII_BYTES = bytes(range(128))
# Characters Windows forbids in file names; clients replace them on saving anyway, and
# the stdlib strips <...> and "..." around parameter values (email.utils.unquote).
_FILENAME_CHARS = str.maketrans({'"': "'", **dict.fromkeys("<>:/\\|?*", "_")})


class AddressError(ValueError):
    """An address cannot be written into a header safely; names no address text."""


def _utf8(value: str) -> bytes:
    # Lone surrogates (possible from JSON) cannot be encoded; replace rather than fail.
    return value.encode("utf-8", "replace")


def _needs_words(value: str, limit: int) -> bool:
    # Input-supplied "=?" is always re-encoded so that no encoded word from outside reaches
    # a header undecoded (CVE-2024-6923: "=?UTF-8?Q?=0A?=" decodes to a newline).
    return not value.isascii() or "=?" in value or any(len(w) > limit for w in value.split())


def encoded_words(value: str, first: int, rest: int = _WORD_MAX) -> list[str]:
    """RFC 2047 B-encoded words of at most 75 chars, never splitting a UTF-8 character.

    `first` is the room left on the first line, `rest` on each continuation line.
    """
    data = _utf8(value)
    words: list[str] = []
    room = max(first, _WORD_OVERHEAD + 16)
    start = 0
    while start < len(data) or not words:
        size = (min(room, _WORD_MAX) - _WORD_OVERHEAD) // 4 * 3
        end = min(start + size, len(data))
        # RFC 2047 §5: each encoded word must hold whole characters.
        while end < len(data) and end > start and (data[end] & 0xC0) == 0x80:
            end -= 1
        chunk = base64.b64encode(data[start:end]).decode("ascii")
        words.append(f"=?utf-8?b?{chunk}?=")
        start = end
        room = rest
    return words


def _fold(name: str, words: list[str], tail: str = "") -> str:
    """Join words into a header field folded at 78 columns (RFC 5322 §2.2.3)."""
    lines: list[str] = []
    line = f"{name}:"
    for word in words:
        if len(line) + 1 + len(word) > _FOLD_AT and line != f"{name}:":
            lines.append(line)
            line = ""
        line = f"{line} {word}"
    if tail:
        if len(line) + 1 + len(tail) > _FOLD_AT and line != f"{name}:":
            lines.append(line)
            line = ""
        line = f"{line} {tail}"
    lines.append(line)
    return CRLF.join(lines) + CRLF


def unstructured(name: str, value: str) -> str:
    """A whole header field (with CRLF) for free text such as Subject (RFC 5322 §3.2.5)."""
    text = one_line(value)
    if _needs_words(text, _FOLD_AT - len(name) - 2):
        return _fold(name, encoded_words(text, _FOLD_AT - len(name) - 2))
    return _fold(name, text.split())


def phrase_words(display_name: str, first: int) -> list[str]:
    """A display name as RFC 5322 phrase words: atoms, one quoted string, or atoms mixed
    with RFC 2047 words.

    Only the runs that need it are encoded, as most mailers do: whitespace between an atom
    and an encoded word survives every decoder, while whitespace between two adjacent
    encoded words is dropped by RFC 2047 §6.2 decoders but kept by others (the stdlib's
    address parser among them), so fewer adjacent encoded words mean fewer surprises.
    """
    text = one_line(display_name)
    if not text:
        return []
    if len(text) <= 60 and not _needs_words(text, 60):
        if _ATEXT_PHRASE.fullmatch(text):
            return text.split()
        if '"' not in text and "\\" not in text:
            return [f'"{text}"']
    words: list[str] = []
    run: list[str] = []
    for token in text.split(" "):
        if len(token) <= 60 and _ATOM.fullmatch(token) and "=?" not in token:
            if run:
                words += encoded_words(" ".join(run), first if not words else _WORD_MAX)
                run = []
            words.append(token)
        else:
            run.append(token)
    if run:
        words += encoded_words(" ".join(run), first if not words else _WORD_MAX)
    return words


def split_mailbox(value: str) -> tuple[str, str]:
    """(display name, address) of a configured `Name <addr>` or bare `addr`.

    Deliberately simpler than email.utils.parseaddr, which guesses at malformed input and
    can pick an address out of the display name.
    """
    text = one_line(value)
    if not (text.endswith(">") and "<" in text):
        return "", text
    name, _, addr = text[:-1].rpartition("<")
    name = name.strip()
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = re.sub(r"\\(.)", r"\1", name[1:-1])
    return name, addr.strip()


@lru_cache(maxsize=4096)
def addr_spec(address: str) -> str:
    """The checked ASCII `local@domain`; IDN domains become A-labels (RFC 5890).

    The local part may be any run of atext and dots (so "a." and "a..b", which only a
    quoted string can carry, pass); anything else raises AddressError.
    """
    local, at, domain = address.strip().rpartition("@")
    if not at or not local or not domain or len(address) > 254:
        raise AddressError("not an e-mail address")
    if not local.isascii():
        raise AddressError("non-ASCII local part needs SMTPUTF8, which is not supported")
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            raise AddressError("domain is not a valid IDN") from None
    # "=?" is refused: the stdlib parser decodes encoded words even inside a local part,
    # quoted or not, and one that decodes to a newline would be injected on re-serialising.
    if not _LOOSE_LOCAL.fullmatch(local) or "=?" in local or "=?" in domain:
        raise AddressError("local part has characters outside RFC 5322 atext")
    if not _DOT_ATOM.fullmatch(domain):
        raise AddressError("domain is not an RFC 5322 dot-atom")
    return f"{local}@{domain}"


def _wire_addr_spec(spec: str) -> str:
    # RFC 5322 §3.4.1: a local part that is not a dot-atom travels as a quoted string;
    # addr_spec admits no '"' or '\\', so nothing inside needs escaping.
    local, _, domain = spec.rpartition("@")
    return spec if _DOT_ATOM.fullmatch(local) else f'"{local}"@{domain}'


@lru_cache(maxsize=4096)
def address(name: str, display_name: str, addr: str) -> str:
    """A whole mailbox header field: `Name: phrase <addr-spec>` (RFC 5322 §3.4)."""
    spec = _wire_addr_spec(addr_spec(addr))
    words = phrase_words(display_name, _FOLD_AT - len(name) - 2)
    if not words:
        return f"{name}: {spec}{CRLF}"
    return _fold(name, words, f"<{spec}>")


def media_type(value: str) -> str:
    """The media type if it is a plain type/subtype token with optional token parameters,
    else application/octet-stream. Type and attribute names are lower-cased; values kept."""
    match = _MEDIA_TYPE.fullmatch(value.strip()) if len(value) <= 120 else None
    if match is None:
        return "application/octet-stream"
    params = "".join(
        f"; {name.lower()}={token}" for name, token in _MEDIA_PARAM.findall(match.group(2))
    )
    return match.group(1).lower() + params


def safe_filename(filename: str) -> str:
    """One line without the characters Windows forbids; "attachment" when nothing is left."""
    return one_line(filename).translate(_FILENAME_CHARS).strip() or "attachment"


def filename_params(key: str, filename: str, *, extended: bool) -> str:
    """`; key="..."` for a file name, plus `filename*` (RFC 2231) when `extended`.

    Outlook only reads RFC 2047 words inside the quoted value (a practice RFC 2231 never
    blessed); RFC 2231-aware clients prefer `key*`, so non-ASCII names carry both.
    """
    text = safe_filename(filename)
    if len(text) <= 60 and not _needs_words(text, 60):
        return f';{CRLF} {key}="{text}"'
    # Room for ` key="` before the first word and `";` after the last (RFC 2047 §2: 76).
    words = encoded_words(text, _FOLD_AT - len(key) - 5, _FOLD_AT - 3)
    quoted = f';{CRLF} {key}="' + f"{CRLF} ".join(words) + '"'
    if not extended:
        return quoted
    # RFC 2231 §3/§4: percent-encode all but attr-chars; continuations keep lines short and
    # never split a %XX escape.
    pieces: list[str] = [""]
    for unit in _ESCAPE_UNIT.findall(quote(_utf8(text), safe="!#$&+-.^_`|~")):
        if len(pieces[-1]) + len(unit) > 50:
            pieces.append("")
        pieces[-1] += unit
    if len(pieces) == 1:
        return f"{quoted};{CRLF} {key}*=utf-8''{pieces[0]}"
    pieces[0] = "utf-8''" + pieces[0]
    return quoted + "".join(f";{CRLF} {key}*{i}*={piece}" for i, piece in enumerate(pieces))


def text_body(text: str) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, body) for UTF-8 text, CRLF line ends, 76 columns.

    Quoted-printable keeps mostly-ASCII text readable; when more than a fifth of the bytes
    would be escaped (three characters each) base64 is the smaller choice (RFC 2045 §6).
    """
    data = _utf8(text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", CRLF))
    escaped = 0 if data.isascii() else len(data.translate(None, _ASCII_BYTES))
    if escaped * 5 > len(data):
        return "base64", base64_body(data)
    body = binascii.b2a_qp(data, istext=True)
    # b2a_qp copies the line ending it sees first; with no line break at all in the input
    # its soft breaks come out as bare LF.
    return "quoted-printable", body if b"\n" in data else body.replace(b"\n", b"\r\n")


# RFC 5322 §2.1.1: a line holds at most 998 characters before its CRLF.
_LINE_MAX = 998
# A 7bit part carries no NUL and no control character but tab and line ends (RFC 2045 §2.7).
_SEVEN_BIT = b"\t\n" + bytes(range(0x20, 0x7F))
# Raw-text elements: a character reference inside them is not read as one.
_RAW_TEXT = (b"style", b"script")


def html_body(html: str) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, body) for an HTML part: 7bit when it can travel as is.

    Characters beyond ASCII are written as numeric character references (`&#228;`), which
    an HTML reader reads as the characters themselves, so a page in a Latin script needs
    no transfer encoding at all (quoted-printable of a page costs more CPU than building
    the rest of the mail). text_body decides instead when the page has a line over 998
    octets, a control character, a line that starts like a boundary (`--=_`), a
    character beyond ASCII inside <style> or <script> (where a reference stays literal),
    or when the references make it a third larger than its text (base64 is smaller).
    """
    if html.isascii():
        data = html.encode("ascii")
    else:
        data = html.encode("ascii", "xmlcharrefreplace")
        if len(data) * 3 > len(html) * 4 or _reference_in_raw_text(data):
            return text_body(html)
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if data.startswith(b"--=_") or b"\n--=_" in data or data.translate(None, _SEVEN_BIT):
        return text_body(html)
    if max(map(len, data.split(b"\n"))) > _LINE_MAX:
        return text_body(html)
    return "7bit", data.replace(b"\n", b"\r\n")


def _reference_in_raw_text(data: bytes) -> bool:
    """Is there a `&#` inside <style> or <script> (one made, or one written there)?"""
    lower = data.lower()
    for name in _RAW_TEXT:
        at = lower.find(b"<" + name)
        while at >= 0:
            end = lower.find(b"</" + name, at)
            end = len(data) if end < 0 else end
            if b"&#" in data[at:end]:
                return True
            at = lower.find(b"<" + name, end)
    return False


def base64_body(data: bytes) -> bytes:
    """Base64 in 76-column CRLF lines (RFC 2045 §6.8)."""
    return base64.encodebytes(data).replace(b"\n", b"\r\n").rstrip(b"\r\n")
