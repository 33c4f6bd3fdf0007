"""Plain-text bodies wrapped for mail readers: short lines, URLs and the writer's breaks kept."""

from __future__ import annotations

import re
import textwrap

# RFC 5322 §2.1.1 asks for lines of at most 78 characters; 76 leaves room for the quoting
# ("> ") a reply adds before the reader's client wraps again.
WIDTH = 76
# What a continuation line repeats or indents under: leading blanks and "> " quote markers
# are repeated, a list marker ("- ", "* ", "• ", "1. ", "2) ") is indented under.
_PREFIX = re.compile(r"[ \t]*(?:>[ \t]?)*")
_BULLET = re.compile(r"(?:[-*•]|\d{1,3}[.)])[ \t]+")
# Any blank but the space (tabs, line ends, Unicode spaces): textwrap treats them apart.
_OTHER_BLANK = re.compile(r"[^\S ]")


def wrap_text(text: str, width: int = WIDTH) -> str:
    """Fold every line longer than `width` at spaces; no other change.

    Each line is wrapped on its own, so the writer's own line breaks, blank lines and
    signatures stay as they are. Words are never split, not even at hyphens, so a URL (or any
    word longer than the width) stays whole on a line of its own.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(folded for line in lines for folded in _wrap_line(line, width))


def _wrap_line(line: str, width: int) -> list[str]:
    if len(line) <= width:
        return [line]
    prefix = _PREFIX.match(line)
    head = prefix.group() if prefix else ""
    body = line[len(head) :]
    bullet = _BULLET.match(body)
    hang = " " * len(bullet.group()) if bullet else ""
    room = max(width - len(head), 20)
    if _plain(body):
        wrapped = _greedy(body, room, hang)
    else:
        wrapped = textwrap.wrap(
            body,
            width=room,
            subsequent_indent=hang,
            break_long_words=False,
            break_on_hyphens=False,
        )
    return [head + part for part in wrapped] or [line]


def _plain(body: str) -> bool:
    """Words between single spaces, and no other blank: where `_greedy` is textwrap."""
    return (
        _OTHER_BLANK.search(body) is None
        and "  " not in body
        and not body.startswith(" ")
        and not body.endswith(" ")
    )


def _greedy(body: str, width: int, hang: str) -> list[str]:
    """textwrap.wrap(body, width, subsequent_indent=hang, break_long_words=False,
    break_on_hyphens=False) for a `_plain` body, without splitting it into chunks: each
    line ends at the last space that lets it fit, or after one word longer than the line.
    A property test holds it to textwrap's output."""
    lines: list[str] = []
    start, end = 0, len(body)
    room = width
    while end - start > room:
        cut = body.rfind(" ", start, start + room + 1)
        if cut <= start:  # the first word alone is longer than the line: it stays whole
            cut = body.find(" ", start)
            if cut < 0:
                break
        lines.append(hang + body[start:cut] if lines else body[start:cut])
        start = cut + 1
        room = width - len(hang)
    lines.append(hang + body[start:] if lines else body[start:])
    return lines
