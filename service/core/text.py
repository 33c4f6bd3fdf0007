"""One-line text: the one normaliser for header values, failure reasons and log fields."""

from __future__ import annotations

# Every C0 control (tab, CR, LF, NUL included), DEL, the C1 block and the Unicode line and
# paragraph separators become spaces: none of them may reach a header (CVE-2024-6923 and
# its kin are all about a newline smuggled into a header value) or split a log line.
_CONTROLS = dict.fromkeys([*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029], " ")


def one_line(text: str, limit: int | None = None) -> str:
    """Controls become spaces, runs of white space collapse, ends are trimmed.

    With `limit`, a longer result is cut to `limit` characters ending in "...".
    """
    # isprintable() is False for every control and separator: skip the translate if so.
    line = " ".join((text if text.isprintable() else text.translate(_CONTROLS)).split())
    if limit is not None and len(line) > limit:
        return line[: max(0, limit - 3)] + "..."
    return line
