"""Tests for service.core.inline: the cached inliner gives, byte for byte, what css-inline
gives for the whole document."""

from __future__ import annotations

from pathlib import Path

import css_inline
import pytest
from hypothesis import given
from hypothesis import strategies as st

from devkit.events import make_notification
from service.core.inline import CachedInliner
from service.core.render import Renderer
from service.core.routing import Kind

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
# The renderer's options.
INLINER = css_inline.CSSInliner(
    keep_style_tags=False, keep_at_rules=True, load_remote_stylesheets=False
)


def direct(html: str) -> str:
    return INLINER.inline(html)


# Texts as a template would pass them on: anything, escaped or not, multi-line.
texts = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]) | st.sampled_from("<>&\"'\n "),
    max_size=60,
)


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer(TEMPLATES)


@given(
    kind=st.sampled_from(list(Kind)),
    locale=st.sampled_from(["en", "de"]),
    subject=texts,
    activity=texts,
    update=texts,
    name=texts,
)
def test_every_template_gives_the_same_document_cached_as_inlined_whole(
    renderer: Renderer, kind: Kind, locale: str, subject: str, activity: str, update: str, name: str
) -> None:
    n = make_notification(
        kind,
        locale=locale,
        ticket_subject=subject,
        activity_text=activity,
        update_text=update,
        customer_name=name,
        author=name,
    )
    html = renderer.render(n).html
    raw = _jinja_html(renderer, n)
    inliner = CachedInliner(INLINER)
    first = inliner.inline(raw)  # a miss: the skeleton is inlined
    again = inliner.inline(raw)  # a hit: the inlined skeleton filled in
    assert first == again == html == direct(raw)
    if not any(c in raw for c in "\x00\r\ue000\ue001"):
        assert (inliner.misses, inliner.hits) == (1, 1)


def _jinja_html(renderer: Renderer, n: object) -> str:
    """The HTML the templates gave for `n`, before it was inlined."""
    seen: list[str] = []
    inliner = renderer._inliner
    original = inliner.inline

    def spy(html: str) -> str:
        seen.append(html)
        return original(html)

    inliner.inline = spy  # type: ignore[method-assign]
    try:
        renderer.render(n)  # type: ignore[arg-type]
    finally:
        del inliner.inline
    return seen[0]


def test_mails_of_one_shape_inline_their_skeleton_once(renderer: Renderer) -> None:
    inliner = CachedInliner(INLINER)
    doc = "<html><head><style>p { color: red; }</style></head><body><p>{}</p></body></html>"
    out = [inliner.inline(doc.replace("{}", f"mail {i} &amp; more")) for i in range(50)]
    assert (inliner.misses, inliner.hits) == (1, 49)
    assert out[7] == direct(doc.replace("{}", "mail 7 &amp; more"))
    assert 'style="color: red;"' in out[7]


def test_the_stylesheet_is_part_of_the_shape() -> None:
    inliner = CachedInliner(INLINER)
    red = "<html><head><style>p { color: red; }</style></head><body><p>x</p></body></html>"
    blue = red.replace("red", "blue")
    assert inliner.inline(red) == direct(red)
    assert inliner.inline(blue) == direct(blue)
    assert inliner.misses == 2


def test_empty_and_blank_texts_are_part_of_the_shape() -> None:
    inliner = CachedInliner(INLINER)
    doc = "<html><head><style>p:empty {{ color: red; }}</style></head><body><p>{}</p></body></html>"
    for text in ("", " ", "words", "", "other words", "\n"):
        html = doc.format(text)
        assert inliner.inline(html) == direct(html), repr(text)


@pytest.mark.parametrize(
    "body",
    [
        # A ">" in a comment starts a "text" inside it: the comment swallows the placeholder.
        "<!-- a > b --><p>text</p>",
        # A ">" in an attribute value: the placeholder lands in the attribute, and is kept.
        '<p title="a > b">text</p>',
        # Text css-inline moves: a table's stray text is fostered out in front of it.
        "<table>stray<tr><td>cell</td></tr></table>",
        # The placeholders' own code points in the input: never cached.
        "<p>\ue000 and \ue001</p>",
        # What the parser changes in a text: U+0000 dropped, CR made LF.
        "<p>nul \x00 here</p><p>cr\r\nlf</p>",
        # A stylesheet in the body, and an element whose name only starts like one.
        "<p>a</p><style>p { margin: 0; }</style><styles>b</styles>",
        "<script>if (a < b) { x = '>' }</script><p>text</p>",
        "<script>a && b</script><xmp>a &amp; b</xmp><p>text</p>",
        # References spelled every way, and texts a template left unescaped.
        "<p>&#39;&#34;&quot;&apos;&amp;&lt;&gt;&nbsp;&copy;&#x41;&#0;&amp</p><p>a > b text</p>",
        "<textarea>a &amp; text</textarea><p><br>text<br></p><p> </p><p></p>",
    ],
)
def test_awkward_documents_still_match_css_inline(body: str) -> None:
    inliner = CachedInliner(INLINER)
    html = f"<html><head><style>p {{ color: red; }}</style></head><body>{body}</body></html>"
    for _ in range(3):
        assert inliner.inline(html) == direct(html)
    other = html.replace("text", "another &#39;text&#39; &gt; &copy; \xa0")
    assert inliner.inline(other) == direct(other)


def test_the_cache_keeps_at_most_its_size() -> None:
    inliner = CachedInliner(INLINER, size=4)
    for i in range(10):  # each shape twice: as many hits as misses, the cache stays on
        for text in ("x", "z"):
            inliner.inline(f"<html><body><p class='c{i}'>{text}</p></body></html>")
    assert len(inliner._shapes) == 4
    inliner.inline("<html><body><p class='c9'>y</p></body></html>")
    assert inliner.hits == 11
    inliner.inline("<html><body><p class='c0'>y</p></body></html>")
    assert inliner.misses == 11


def test_shapes_that_do_not_repeat_turn_the_cache_off() -> None:
    inliner = CachedInliner(INLINER, size=8)
    # Data in an attribute: every mail a shape of its own.
    pages = [
        f"<html><body><a href='mailto:u{i}@x.test'>mail u{i}</a></body></html>" for i in range(40)
    ]
    assert [inliner.inline(page) for page in pages] == [direct(page) for page in pages]
    assert inliner.bypassed
    assert inliner.misses == 9
    assert inliner._shapes == {}


def test_shapes_that_repeat_keep_the_cache() -> None:
    inliner = CachedInliner(INLINER, size=8)
    for i in range(40):  # as many new shapes as the cache holds, each seen several times
        page = f"<html><body><p class='c{i % 8}'>text {i}</p></body></html>"
        assert inliner.inline(page) == direct(page)
    assert not inliner.bypassed
    assert (inliner.misses, inliner.hits) == (8, 32)
