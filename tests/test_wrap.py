"""Tests of service.core.wrap: long lines fold at spaces; nothing else about the text changes."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from service.core.wrap import _PREFIX, WIDTH, wrap_text

LONG = "The technician comes on Monday between nine and twelve, please keep the way clear."


def test_short_lines_blank_lines_and_signatures_are_left_alone() -> None:
    text = "Dear Dana,\n\n  indented\n-- \nHelpdesk\n\n"
    assert wrap_text(text) == text


def test_a_long_line_folds_at_spaces_within_the_width() -> None:
    lines = wrap_text(LONG).splitlines()
    assert len(lines) == 2
    assert all(len(line) <= WIDTH for line in lines)
    assert " ".join(lines) == LONG


def test_urls_and_hyphenated_words_are_never_split() -> None:
    url = "https://example.test/" + "a-very-long-path/" * 6 + "file.pdf?x=1&y=2"
    text = f"Please download the quote at {url} before Monday, thank you very much."
    lines = wrap_text(text).splitlines()
    assert lines == [
        "Please download the quote at",
        url,
        "before Monday, thank you very much.",
    ]
    hyphens = "self-service " * 10
    assert all(w == "self-service" for w in wrap_text(hyphens, width=30).split())


def test_the_writers_line_breaks_are_kept() -> None:
    text = f"{LONG}\nSecond line.\r\nThird line.\n\n{LONG}"
    lines = wrap_text(text).splitlines()
    assert lines[2:4] == ["Second line.", "Third line."]
    assert lines[4] == ""
    assert len(lines) == 7


def test_quotes_indents_and_list_items_continue_under_themselves() -> None:
    assert wrap_text(f"> > {LONG}").splitlines()[1].startswith("> > ")
    assert wrap_text(f"    {LONG}").splitlines()[1].startswith("    ")
    item = wrap_text(f"- {LONG}").splitlines()
    assert item[0].startswith("- The")
    assert item[1].startswith("  ")
    assert not item[1].startswith("   ")
    numbered = wrap_text(f"12. {LONG}").splitlines()
    assert numbered[1].startswith("    ")
    assert numbered[1][4] != " "


def test_a_line_of_only_blanks_stays() -> None:
    blank = " " * 100
    assert wrap_text(blank) == blank


@given(st.text(alphabet=st.sampled_from("ab -\n>\t"), max_size=400))
@example(">>>>>>>a>>>>>>>\t>>>>>")  # a continuation whose first word starts with ">"
@example(">>>>>>>>>>>>>>>>>>a\t>")  # a quote prefix nearly as wide as the line
def test_property_wrapping_only_moves_line_breaks(text: str) -> None:
    wrapped = wrap_text(text, width=20)
    # Only blanks turn into line breaks, and quote markers are repeated on continuation
    # lines: the words, quote markers aside, are the same and in the same order.
    assert wrapped.replace(">", " ").split() == text.replace(">", " ").split()
    # Every line is within the width after its prefix (at least 20 columns are left for
    # text), unless it is one word (with its prefix), or was kept.
    kept = set(text.splitlines())
    for line in wrapped.splitlines():
        head = _PREFIX.match(line)
        prefix = head.group() if head else ""
        assert (
            len(line) <= max(20, len(prefix) + 20)
            or line in kept
            or len(line[len(prefix) :].split()) == 1
        )


WORDS = st.text(st.sampled_from(list("ab-.äé€😀/")), min_size=1, max_size=90)


@given(
    st.lists(WORDS, min_size=1, max_size=40),
    st.integers(min_value=20, max_value=100),
    st.sampled_from(["", "  ", "   "]),
)
@example(["a" * 9, "a" * 10, "b"], 20, "")  # a word ending exactly at the width
@example(["a" * 9, "a" * 10, "b" * 30, "c"], 20, "  ")  # then one longer than a line
def test_property_plain_lines_wrap_exactly_as_textwrap(
    words: list[str], width: int, hang: str
) -> None:
    import textwrap

    from service.core.wrap import _greedy, _plain

    body = " ".join(words)
    assert _plain(body)
    assert _greedy(body, width, hang) == textwrap.wrap(
        body,
        width=width,
        subsequent_indent=hang,
        break_long_words=False,
        break_on_hyphens=False,
    )


def test_other_blanks_take_textwrap_itself() -> None:
    from service.core.wrap import _plain

    assert not _plain("a  b")
    assert not _plain(" a b")
    assert not _plain("a b ")
    assert not _plain("a\tb")
    assert not _plain("a\u00a0b")  # textwrap does not break there; str.strip() drops it
