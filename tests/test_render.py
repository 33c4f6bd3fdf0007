"""Tests for service.core.render: every template renders, data stays data, locales fall back."""

from __future__ import annotations

import datetime as dt
import re
import shutil
from pathlib import Path

import pytest

from devkit.events import make_notification
from service.core.directory import Contact
from service.core.render import Renderer, RenderError, format_when, nl2br
from service.core.routing import Kind

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
CUSTOMER_KINDS = (Kind.CUSTOMER_CONTENT, Kind.CUSTOMER_UPDATE)


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer(TEMPLATES)


def _copy_templates(tmp_path: Path) -> Path:
    target = tmp_path / "templates"
    shutil.copytree(TEMPLATES, target)
    return target


def test_shipped_templates_pass_the_startup_check(renderer: Renderer) -> None:
    renderer.check()
    assert {"en", "de"} <= set(renderer.locales)


@pytest.mark.parametrize("locale", ["en", "de", "fr", "de-AT", "de_DE", "", "not a locale!"])
@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_renders_in_every_locale(renderer: Renderer, kind: Kind, locale: str) -> None:
    mail = renderer.render(make_notification(kind, locale=locale))
    assert mail.subject == "[T-1042] Printer on floor 3 jams"
    assert "T-1042" in mail.text
    assert mail.html.lstrip().lower().startswith("<!doctype html>")
    assert "T-1042" in mail.html


@pytest.mark.parametrize("kind", list(Kind))
def test_locale_folders_are_used_and_unknown_locales_fall_back_to_english(
    renderer: Renderer, kind: Kind
) -> None:
    german = renderer.render(make_notification(kind, locale="de"))
    austrian = renderer.render(make_notification(kind, locale="de-AT"))
    french = renderer.render(make_notification(kind, locale="fr"))
    english = renderer.render(make_notification(kind, locale="en"))
    assert "Diese Nachricht wurde automatisch" in german.text
    assert austrian.text == german.text
    assert french.text == english.text
    assert "This message was sent automatically" in english.text
    assert 'lang="de"' in german.html
    assert 'lang="en"' in french.html


def test_a_template_missing_in_a_locale_falls_back_to_english(tmp_path: Path) -> None:
    root = _copy_templates(tmp_path)
    (root / "de" / "supplier.html").unlink()
    renderer = Renderer(root)
    renderer.check()
    mail = renderer.render(make_notification(Kind.SUPPLIER, locale="de"))
    assert "HANDLUNGSBEDARF BIS" in mail.text
    assert "Action required by" in mail.html


def test_a_missing_english_template_fails_the_check(tmp_path: Path) -> None:
    root = _copy_templates(tmp_path)
    (root / "en" / "staff.txt").unlink()
    renderer = Renderer(root)
    with pytest.raises(RenderError, match=r"staff\.txt"):
        renderer.check()


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("locale", ["en", "de"])
def test_activity_text_is_data_never_a_template(
    renderer: Renderer, kind: Kind, locale: str
) -> None:
    evil = "{{ 7*7 }} {% if true %}x{% endif %}\n<script>alert('x')</script> & \"q\""
    field = "update_text" if kind is Kind.CUSTOMER_UPDATE else "activity_text"
    mail = renderer.render(make_notification(kind, locale=locale, **{field: evil}))
    assert evil in mail.text
    assert "49" not in mail.text
    assert "{{ 7*7 }} {% if true %}x{% endif %}" in mail.html
    assert "<script>" not in mail.html
    assert "&lt;script&gt;alert('x')&lt;/script&gt; &amp;" in mail.html


def test_html_turns_newlines_into_br_after_escaping(renderer: Renderer) -> None:
    text = "line one\r\n<b>line two</b>\nline three"
    mail = renderer.render(make_notification(Kind.CUSTOMER_CONTENT, activity_text=text))
    assert "line one<br>\n&lt;b&gt;line two&lt;/b&gt;<br>\nline three" in mail.html


def test_nl2br_escapes_each_line() -> None:
    assert str(nl2br("a<\nb&")) == "a&lt;<br>\nb&amp;"


def _outside_at_rules(css: str) -> str:
    """The CSS left once every `@...{...}` block (braces balanced) is cut out."""
    kept, depth, in_at_rule = [], 0, False
    for index, char in enumerate(css):
        if depth == 0 and char == "@":
            in_at_rule = True
        if in_at_rule:
            depth += char == "{"
            depth -= char == "}"
            if depth == 0 and char == "}":
                in_at_rule = False
            continue
        kept.append(css[index])
    return "".join(kept)


def test_css_is_inlined_and_only_the_media_query_keeps_a_style_block(renderer: Renderer) -> None:
    # Changed with issue 15: the @media rules (narrow screens) cannot be inlined, so one
    # <style> block remains, holding them and nothing else.
    mail = renderer.render(make_notification(Kind.STAFF))
    assert 'style="' in mail.html
    assert 'class="label" style="' in mail.html
    blocks = re.findall(r"<style>(.*?)</style>", mail.html, flags=re.S)
    assert len(blocks) == 1
    assert "@media only screen and (max-width: 480px)" in blocks[0]
    assert "table.facts td.label" in blocks[0]
    assert _outside_at_rules(blocks[0]).strip() == ""


@pytest.mark.parametrize("locale", ["en", "de"])
def test_staff_mail_shows_every_field_and_marks_the_comment_internal(
    renderer: Renderer, locale: str
) -> None:
    mail = renderer.render(make_notification(Kind.STAFF, locale=locale, parent_activity_id="5000"))
    for body in (mail.text, mail.html):
        assert "E-mail" in body
        assert "Alice Jones" in body
        assert "The technician comes on Monday." in body
        assert "Your ticket is in progress." in body
        assert "Customer is on the VIP list." in body
        assert "terms.pdf" in body
        assert "photo.jpg" in body
        assert "R-77.pdf" in body
        assert "standard/terms.pdf" not in body
    assert ("INTERNAL COMMENT" if locale == "en" else "INTERNER KOMMENTAR") in mail.text
    assert 'class="internal"' in mail.html


@pytest.mark.parametrize("kind", [Kind.CUSTOMER_CONTENT, Kind.CUSTOMER_UPDATE, Kind.SUPPLIER])
def test_the_comment_never_reaches_customers_or_suppliers(tmp_path: Path, kind: Kind) -> None:
    # Even a template that asks for the comment gets "" outside staff mail.
    root = _copy_templates(tmp_path)
    for locale in ("en", "de"):
        for suffix in (".txt", ".html"):
            path = root / locale / f"{kind.value}{suffix}"
            content = path.read_text(encoding="utf-8")
            if suffix == ".html":
                content = content.replace("{% endblock %}", "[{{ comment_text }}]{% endblock %}", 1)
            else:
                content += "[{{ comment_text }}]"
            path.write_text(content, encoding="utf-8")
    renderer = Renderer(root)
    n = make_notification(kind, comment_text="SECRET-INTERNAL-NOTE")
    mail = renderer.render(n)
    assert "SECRET-INTERNAL-NOTE" not in mail.text + mail.html + mail.subject
    assert "[]" in mail.text


def test_supplier_mail_shows_the_action_required_date_and_time(renderer: Renderer) -> None:
    mail = renderer.render(make_notification(Kind.SUPPLIER, locale="en"))
    assert "Dec 1, 2026 14:30" in mail.text
    assert "Dec 1, 2026 14:30" in mail.html
    assert "Please send a replacement fuser unit." in mail.text
    german = renderer.render(make_notification(Kind.SUPPLIER, locale="de"))
    assert "01.12.2026 14:30" in german.text


def test_dates_are_localized(renderer: Renderer) -> None:
    german = renderer.render(make_notification(Kind.STAFF, locale="de"))
    english = renderer.render(make_notification(Kind.STAFF, locale="en"))
    assert "27.11.2026 09:15 UTC" in german.text
    assert "03.12.2026 09:00" in german.text
    assert "Nov 27, 2026 09:15 UTC" in english.text


def test_format_when() -> None:
    from babel import Locale

    de = Locale.parse("de")
    assert format_when(None, None, de) == ""
    assert format_when(None, dt.time(7, 5), de) == "07:05"
    assert format_when(dt.date(2026, 1, 2), None, de) == "02.01.2026"
    assert format_when(dt.datetime(2026, 1, 2, 3, 4), None, de) == "02.01.2026 03:04"
    tz = dt.timezone(dt.timedelta(hours=-5, minutes=-30))
    assert format_when(dt.datetime(2026, 1, 2, 3, 4, tzinfo=tz), None, de).endswith("UTC-05:30")


@pytest.mark.parametrize("kind", list(Kind))
def test_subject_is_reference_and_ticket_subject(renderer: Renderer, kind: Kind) -> None:
    mail = renderer.render(make_notification(kind, ticket_subject="  Drucker\r\n klemmt\x00 "))
    assert mail.subject == "[T-1042] Drucker klemmt"


@pytest.mark.parametrize(("locale", "expected"), [("en", "Ticket 1042"), ("de", "Ticket 1042")])
def test_empty_ticket_subject_becomes_a_localized_ticket_title(
    renderer: Renderer, locale: str, expected: str
) -> None:
    mail = renderer.render(make_notification(Kind.STAFF, locale=locale, ticket_subject=""))
    assert mail.subject == f"[T-1042] {expected}"


def test_subject_is_never_evaluated(renderer: Renderer) -> None:
    mail = renderer.render(make_notification(ticket_subject="{{ 7*7 }} <b>"))
    assert mail.subject == "[T-1042] {{ 7*7 }} <b>"


def test_templates_see_jinjas_globals(tmp_path: Path) -> None:
    # The renderer hands each template its globals as a plain dict (a cheaper copy per
    # render than Jinja's ChainMap): a custom template may still use every one of them.
    root = _copy_templates(tmp_path)
    (root / "en" / "staff.txt").write_text(
        "{% set ns = namespace(n=0) %}{% for i in range(3) %}{% set ns.n = ns.n + i %}"
        "{% endfor %}{{ ns.n }} {{ dict(a=1)['a'] }} {{ cycler('x', 'y').next() }}"
        " {{ joiner(',')() }}[{{ lipsum(1, False, 5, 10) | length > 0 }}]\n",
        encoding="utf-8",
    )
    mail = Renderer(root).render(make_notification(Kind.STAFF, locale="en"))
    assert mail.text.startswith("3 1 x [True]")


def test_undefined_variables_are_errors(tmp_path: Path) -> None:
    root = _copy_templates(tmp_path)
    (root / "en" / "staff.txt").write_text("{{ no_such_variable }}\n", encoding="utf-8")
    renderer = Renderer(root)
    with pytest.raises(RenderError, match="'no_such_variable' is undefined") as caught:
        renderer.render(make_notification(Kind.STAFF, locale="en"))
    assert "\n" not in str(caught.value)
    with pytest.raises(RenderError):
        renderer.check()


def test_syntax_errors_stop_construction(tmp_path: Path) -> None:
    root = _copy_templates(tmp_path)
    (root / "de" / "customer_update.html").write_text("{% if %}", encoding="utf-8")
    with pytest.raises(RenderError, match=r"de/customer_update\.html line 1"):
        Renderer(root)


def test_render_errors_carry_no_mail_text(tmp_path: Path) -> None:
    root = _copy_templates(tmp_path)
    # An undefined key named by the text itself, and a plain Python error.
    (root / "en" / "customer_content.txt").write_text("{{ {}[activity_text] }}\n")
    (root / "en" / "customer_update.txt").write_text("{{ update_text.index('zzz') }}\n")
    renderer = Renderer(root)
    for kind, field in (
        (Kind.CUSTOMER_CONTENT, "activity_text"),
        (Kind.CUSTOMER_UPDATE, "update_text"),
    ):
        n = make_notification(kind, locale="en", **{field: "PRIVATE-TEXT"})
        with pytest.raises(RenderError) as caught:
            renderer.render(n)
        message = str(caught.value)
        assert "PRIVATE-TEXT" not in message
        assert "\n" not in message
        assert caught.value.__cause__ is None
        assert caught.value.__suppress_context__


def test_the_renderer_compiles_templates_once(tmp_path: Path) -> None:
    root = _copy_templates(tmp_path)
    renderer = Renderer(root)
    before = renderer.render(make_notification(locale="en"))
    (root / "en" / "customer_content.txt").write_text("changed\n", encoding="utf-8")
    assert renderer.render(make_notification(locale="en")).text == before.text


def test_a_locale_folder_babel_does_not_know_still_renders(tmp_path: Path) -> None:
    root = _copy_templates(tmp_path)
    shutil.copytree(root / "en", root / "custom")
    renderer = Renderer(root)
    renderer.check()
    mail = renderer.render(make_notification(Kind.STAFF, locale="custom"))
    assert "Nov 27, 2026" in mail.text


# --- what the frame adds, per kind (issue 15) ------------------------------------------------

LETTER = "Sehr geehrte Frau Smith,\n\nanbei unser Angebot.\n\nMit freundlichen Grüßen\nAlice Jones"
# (greeting, sign-off) the shipped frames write, per locale.
FRAME_WORDS = {"en": ("Dear ", "Kind regards"), "de": ("Guten Tag", "Mit freundlichen Grüßen")}


@pytest.mark.parametrize("locale", ["en", "de"])
def test_customer_content_is_the_letter_alone_in_its_frame(renderer: Renderer, locale: str) -> None:
    # The staff member's letter has its own salutation and sign-off: none is added.
    n = make_notification(
        Kind.CUSTOMER_CONTENT,
        locale=locale,
        activity_text=LETTER,
        attachments=("standard/terms.pdf", "invoices/R-77.pdf"),
    )
    mail = renderer.render(n)
    greeting, sign_off = FRAME_WORDS[locale]
    lines = mail.text.splitlines()
    assert lines[0] == "[T-1042] Printer on floor 3 jams"
    assert lines[1] == ""
    assert mail.text.count("Sehr geehrte") == mail.html.count("Sehr geehrte") == 1
    assert mail.text.count("Mit freundlichen Grüßen") == 1
    assert mail.html.count("Mit freundlichen Grüßen") == 1
    for body in (mail.text, mail.html):
        assert greeting not in body
        assert "Helpdesk-Team" not in body
        assert "helpdesk team" not in body
        assert "terms.pdf" in body
        assert "R-77.pdf" in body
        assert "T-1042" in body
    assert "-- \n" in mail.text  # the footer
    assert mail.text.index("Alice Jones") < mail.text.index("terms.pdf") < mail.text.index("-- ")
    if locale == "en":
        assert sign_off not in mail.text + mail.html


@pytest.mark.parametrize("locale", ["en", "de"])
def test_customer_update_frames_the_status_line_with_greeting_and_sign_off(
    renderer: Renderer, locale: str
) -> None:
    mail = renderer.render(make_notification(Kind.CUSTOMER_UPDATE, locale=locale))
    greeting, sign_off = FRAME_WORDS[locale]
    for body in (mail.text, mail.html):
        assert f"{greeting}" in body
        assert "Dana Smith" in body
        assert sign_off in body
        assert body.index(greeting) < body.index("Your ticket is in progress.")
        assert body.index("Your ticket is in progress.") < body.index(sign_off)


@pytest.mark.parametrize("locale", ["en", "de"])
def test_a_recipient_known_only_by_address_is_greeted_without_it(
    renderer: Renderer, locale: str
) -> None:
    bare = Contact("sales@vendor.test", "sales@vendor.test", locale)
    mail = renderer.render(make_notification(Kind.SUPPLIER, recipient=bare))
    assert "sales@vendor.test" not in mail.text + mail.html
    hello = "Hello," if locale == "en" else "Guten Tag,"
    assert mail.text.startswith(hello)
    named = renderer.render(make_notification(Kind.SUPPLIER, locale=locale))
    assert "ACME Parts," in named.text


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("locale", ["en", "de"])
def test_text_bodies_are_wrapped_keeping_urls_and_the_writers_breaks(
    renderer: Renderer, kind: Kind, locale: str
) -> None:
    url = "https://portal.example.test/tickets/1042/attachments/quote-2026-11-27.pdf?download=1"
    text = (
        "Sehr geehrte Frau Smith,\n\n"
        + "der Techniker kommt am Montag zwischen neun und zwölf Uhr, bitte halten Sie "
        + f"den Zugang zum Drucker frei. Das Angebot finden Sie unter {url} zum Download.\n"
        + "Zeile zwei bleibt eine eigene Zeile.\n\nViele Grüße\nAlice Jones"
    )
    field = "update_text" if kind is Kind.CUSTOMER_UPDATE else "activity_text"
    mail = renderer.render(make_notification(kind, locale=locale, **{field: text}))
    lines = mail.text.splitlines()
    assert url in lines  # whole, on a line of its own
    assert all(len(line) <= 76 for line in lines if line != url), mail.text
    assert max(len(line) for line in lines if line != url) >= 60  # wrapped, not chopped
    assert "Zeile zwei bleibt eine eigene Zeile." in lines
    assert "Viele Grüße" in lines
    assert "Alice Jones" in lines
    # Only line breaks changed: the words are all there, in order.
    assert " ".join(text.split()) in " ".join(mail.text.split())
    assert url in mail.html


@pytest.mark.parametrize(
    ("locale", "heading", "notice"),
    [
        ("en", "E-mail on ticket [T-1042]", "This is a follow-up to an earlier activity."),
        ("de", "E-mail zum Ticket [T-1042]", "Dies ist eine Folgeaktivität"),
    ],
)
def test_the_follow_up_notice_is_set_apart_from_the_heading_and_the_facts(
    renderer: Renderer, locale: str, heading: str, notice: str
) -> None:
    n = make_notification(Kind.STAFF, locale=locale, parent_activity_id="5000")
    lines = renderer.render(n).text.splitlines()
    assert lines[0].startswith(heading)
    assert lines[1] == ""
    assert lines[2].startswith(notice)
    assert lines[3] == ""
    assert lines[4].startswith(("Type:", "Art:"))
    # Without a parent, the heading is followed by one blank line and the facts.
    first = renderer.render(make_notification(Kind.STAFF, locale=locale)).text.splitlines()
    assert first[1] == ""
    assert first[2].startswith(("Type:", "Art:"))
