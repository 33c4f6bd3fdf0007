"""CSS inlining with css-inline, done once per shape of a mail's HTML rather than per mail.

Where css-inline puts which style="" depends on the document's tags (names, attributes,
order, nesting), on its <style> blocks and on whether text nodes are empty or blank
(`:empty`), never on what a non-blank text says. Mails of one kind differ mostly in text:
the ticket's subject, the activity's words, the names. So every non-blank text of the
rendered HTML becomes a placeholder, and this *skeleton* is the cache key; the <style>
blocks, the tags, the blank texts and each text's leading whitespace stay in it as they
are. The first mail of a skeleton has the skeleton inlined by css-inline; that and every
later mail of the shape take the inlined skeleton and put their own texts back where the
placeholders are, spelled as css-inline's serialiser spells a text (`'` for `&#39;`), so
the result is byte for byte what css-inline gives for the whole mail (tests/test_inline.py).

A placeholder that is not a text of its own in the inlined skeleton (a ">" inside a
comment or an attribute value made something look like a text; a <script>'s content) marks
a shape that is never filled in: every mail of that shape is inlined whole. So are the
documents holding a character the parser changes in a text (U+0000, CR) or the
placeholders' own code points.
"""

from __future__ import annotations

import html as html_module
import re
from collections import OrderedDict
from html.parser import HTMLParser
from itertools import chain

import css_inline

__all__ = ["CachedInliner"]

# Python's str methods and regexes are several times slower on a str that holds one
# non-ASCII character, as most mails do: the work below is done on the UTF-8 bytes.
_STYLE = b"<style"
# A non-blank text: the ">" before it with the text's leading whitespace, then the rest of
# the run up to the next "<" (a ">" is put before the document so that a text at its very
# start counts too). Split by it, markup is [before, ">" + space, text, ..., after].
_TEXT = re.compile(rb"(>\s*)([^\s<][^<]*)")
# Private-use code points: no template writes them, and html5ever passes them on unchanged.
_OPEN, _CLOSE = "\ue000", "\ue001"
_OPEN_BYTES = _OPEN.encode()
# In texts, what html5ever writes differently from the template: references, ">", U+00A0.
_RESPELT = re.compile(rb"[&>]|\xc2\xa0")
_HOLE = re.compile(f"{_OPEN}(\\d+){_CLOSE}".encode())
_WHOLE = re.compile(f"\\s*{_OPEN}\\d+{_CLOSE}")
# What html5ever changes in a text (drops U+0000, makes CR LF): such documents are not cached.
_UNCACHED = (_OPEN, _CLOSE, "\x00", "\r")
# Elements whose content html5ever writes out as it is (not escaped): a placeholder in one
# is not a text.
_RAW_TEXT = frozenset(
    ("style", "script", "xmp", "iframe", "noembed", "noframes", "noscript", "plaintext")
)


class CachedInliner:
    """`inline(html)` gives what `inliner.inline(html)` gives.

    `size` skeletons are kept, the least recently used dropped first. A miss costs several
    times a whole inlining (the check of the inlined skeleton is pure Python): once the
    misses are more than `size` and twice the hits, the shapes do not repeat (templates
    that put data in attributes) and every later document is inlined whole.
    """

    def __init__(self, inliner: css_inline.CSSInliner, size: int = 256) -> None:
        self._inliner = inliner
        self._size = size
        self.bypassed = False
        # skeleton → its inlined form cut at the texts' places (one piece more than there
        # are texts), or None when that form cannot be filled in.
        self._shapes: OrderedDict[bytes, list[bytes] | None] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def inline(self, html: str) -> str:
        if self.bypassed or any(c in html for c in _UNCACHED):
            return self._inliner.inline(html)
        # [markup, <style> element, markup, ...]: texts are taken from the markup only.
        pieces = _cut_style(b">" + html.encode())
        texts: list[bytes] = []
        for i in range(0, len(pieces), 2):
            parts = _TEXT.split(pieces[i])
            found = parts[2::3]
            texts += found
            parts[2::3] = [_OPEN_BYTES] * len(found)
            pieces[i] = b"".join(parts)
        if _RESPELT.search(b"<".join(texts)):  # rare: most texts are written as they are
            texts = [_serialised(text) for text in texts]
        skeleton = b"".join(pieces)
        shapes = self._shapes
        if skeleton in shapes:
            shapes.move_to_end(skeleton)
            shape = shapes[skeleton]
            if shape is None:
                return self._inliner.inline(html)
            self.hits += 1
        else:
            self.misses += 1
            if self.misses > self._size and self.misses > 2 * self.hits:
                self.bypassed = True
                self._shapes.clear()
                return self._inliner.inline(html)
            shape = self._shape(skeleton[1:].decode(), len(texts))
            shapes[skeleton] = shape
            if len(shapes) > self._size:
                shapes.popitem(last=False)
            if shape is None:
                return self._inliner.inline(html)
        # shape has one piece more than there are texts: the last is added after the zip.
        filled = b"".join(chain.from_iterable(zip(shape, texts, strict=False))) + shape[-1]
        return filled.decode()

    def _shape(self, skeleton: str, count: int) -> list[bytes] | None:
        """The inlined skeleton cut at its placeholders; None unless each of the `count`
        is a text of its own in it, once and in order."""
        numbers = iter(range(count))
        numbered = re.sub(_OPEN, lambda _: f"{_OPEN}{next(numbers)}{_CLOSE}", skeleton)
        inlined = self._inliner.inline(numbered)
        cut = _HOLE.split(inlined.encode())
        if cut[1::2] != [str(i).encode() for i in range(count)] or not _alone(inlined, count):
            return None
        return cut[0::2]


def _serialised(text: bytes) -> bytes:
    """A text as html5ever writes it: references resolved, then & < > and U+00A0 escaped."""
    if not _RESPELT.search(text):
        return text
    plain = html_module.unescape(text.decode())
    return (
        plain.replace("&", "&amp;")
        .replace("\xa0", "&nbsp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .encode()
    )


class _Texts(HTMLParser):
    """A document's texts, each whole; and whether a placeholder is anywhere else."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.texts: list[str] = []
        self.elsewhere = False
        self._in_text = False
        self._raw: str | None = None

    def handle_data(self, data: str) -> None:
        if self._raw is not None:
            self._mark(data)
            return
        if self._in_text:
            data = self.texts.pop() + data
        self.texts.append(data)
        self._in_text = True

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._mark(" ".join(f"{k}{v}" for k, v in attrs))
        if tag in _RAW_TEXT:
            self._raw = tag

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._mark(" ".join(f"{k}{v}" for k, v in attrs))

    def handle_endtag(self, tag: str) -> None:
        self._in_text = False
        if tag == self._raw:
            self._raw = None

    def handle_comment(self, data: str) -> None:
        self._mark(data)

    def handle_decl(self, decl: str) -> None:
        self._mark(decl)

    def unknown_decl(self, data: str) -> None:
        self._mark(data)

    def handle_pi(self, data: str) -> None:
        self._mark(data)

    def _mark(self, data: str) -> None:
        self._in_text = False
        self.elsewhere = self.elsewhere or _OPEN in data


def _alone(inlined: str, count: int) -> bool:
    """Whether `inlined` has `count` texts that are each one placeholder after the text's
    leading whitespace, and no placeholder in a tag, a comment or raw text."""
    parser = _Texts()
    parser.feed(inlined)
    parser.close()
    holes = [t for t in parser.texts if _OPEN in t]
    return not parser.elsewhere and len(holes) == count and all(_WHOLE.fullmatch(t) for t in holes)


def _cut_style(data: bytes) -> list[bytes]:
    """[markup, <style> element, markup, ..., markup]: each element from its start tag to
    the end of its end tag (or of the document)."""
    low = data.lower()
    pieces: list[bytes] = []
    start = search = 0
    while (at := low.find(_STYLE, search)) >= 0:
        search = at + len(_STYLE)
        if low[search : search + 1].isalnum():  # <styles>: not a <style>
            continue
        close = low.find(b"</style", search)
        end = len(data) if close < 0 else low.find(b">", close) + 1 or len(data)
        pieces += [data[start:at], data[at:end]]
        start = search = end
    pieces.append(data[start:])
    return pieces
