"""Jinja rendering of a notification into subject, wrapped plain text and inlined-CSS HTML."""

from __future__ import annotations

import re
import traceback
from collections.abc import MutableMapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import css_inline
from babel import Locale, UnknownLocaleError
from babel.dates import format_date
from jinja2 import (
    Environment,
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateError,
    TemplateNotFound,
    TemplateSyntaxError,
    select_autoescape,
)
from markupsafe import Markup, escape

from service.core.directory import Contact
from service.core.flatten import flatten
from service.core.inline import CachedInliner
from service.core.routing import Kind, Notification
from service.core.text import one_line
from service.core.wrap import wrap_text

__all__ = ["FALLBACK_LOCALE", "RenderError", "RenderedMail", "Renderer"]

FALLBACK_LOCALE = "en"
# (part, file suffix) of the three templates every kind has per locale folder.
_PARTS = (("subject", ".subject.txt"), ("text", ".txt"), ("html", ".html"))
# Only these messages are safe to repeat: they name template variables, never data.
_UNSAFE_TAG = re.compile(r"[^A-Za-z0-9_-]")
_SAFE_UNDEFINED = re.compile(r"'[A-Za-z_][A-Za-z0-9_]*' is undefined")


@dataclass(frozen=True, slots=True)
class RenderedMail:
    """What the templates produced for one notification."""

    subject: str
    text: str
    html: str


class RenderError(Exception):
    """A template is missing or failed; the message is one line and holds no mail text."""


def nl2br(value: object) -> Markup:
    """Escape text, then turn its line breaks into <br>: data never becomes markup."""
    text = str(value).replace("\r\n", "\n").replace("\r", "\n")
    # escape() leaves "\n" alone and never produces one, so the replace adds only <br>s.
    return escape(text).replace("\n", Markup("<br>\n"))


class _Environment(Environment):
    """Jinja's environment with every template's globals in a plain dict.

    Every render copies its template's globals into its context, and every `{% from ...
    import %}` compares the importing template's globals with the imported one's. Jinja
    keeps them as a ChainMap over the environment's, which lets a later change of the
    environment's globals show; ours never change after construction, and a dict makes
    both ~20 % of a render cheaper.
    """

    def make_globals(self, d: MutableMapping[str, Any] | None) -> MutableMapping[str, Any]:
        return {**self.globals, **(d or {})}


class Renderer:
    """One Jinja environment; every template is compiled once, at construction."""

    def __init__(self, templates_dir: Path) -> None:
        self._loader = FileSystemLoader(str(templates_dir))
        self._env = _Environment(
            loader=self._loader,
            autoescape=select_autoescape(["html"], default_for_string=False, default=False),
            undefined=StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            auto_reload=False,
            # The templates are a fixed set, all compiled here: a plain dict finds an
            # included one faster than the default LRU cache (its lookups reorder a deque).
            cache_size=-1,
        )
        self._env.filters["nl2br"] = nl2br
        # No network: a <link> to a remote stylesheet must not be fetched while rendering.
        # At-rules cannot be inlined: they stay in a <style> block (the layout's @media query
        # that stacks the facts table on narrow screens), everything else becomes style="".
        # Once per shape of the HTML, not per mail (service.core.inline).
        self._inliner = CachedInliner(
            css_inline.CSSInliner(
                keep_style_tags=False, keep_at_rules=True, load_remote_stylesheets=False
            )
        )
        self._templates: dict[tuple[str, str, str], Template] = {}
        folders = (
            sorted(p.name for p in templates_dir.iterdir() if p.is_dir())
            if templates_dir.is_dir()
            else []
        )
        self._folders = {name.lower(): name for name in folders if name[0] not in "._"}
        for folder in self._folders.values():
            for kind in Kind:
                for part, suffix in _PARTS:
                    name = f"{folder}/{kind.value}{suffix}"
                    if (templates_dir / name).is_file():
                        self._templates[folder, kind.value, part] = self._compile(name)

    def _compile(self, name: str) -> Template:
        env = self._env
        try:
            # Its includes put in place (service.core.flatten): the same text, without a
            # context per include. Errors are named from the plain template (`_diagnose`).
            source, filename, _ = self._loader.get_source(env, name)
            ast = flatten(env, env.parse(source, name, filename), name)
            code = env.compile(ast, name, filename)
            template = env.template_class.from_code(env, code, env.make_globals(None))
        except TemplateSyntaxError as exc:
            raise RenderError(_reason(exc)) from None
        except TemplateError as exc:
            raise RenderError(f"{name}: {_reason(exc)}") from None
        return template

    @property
    def locales(self) -> tuple[str, ...]:
        """The locale folders found, e.g. ("de", "en")."""
        return tuple(sorted(self._folders.values()))

    def render(self, n: Notification) -> RenderedMail:
        """Subject, text and HTML for `n`, in the recipient's locale or the fallback.

        The text body is wrapped at 76 columns (service.core.wrap) whatever the template.
        """
        chain = self._chain(n.recipient.locale)
        where = f"{n.kind.value}/{_UNSAFE_TAG.sub('?', n.recipient.locale)[:35] or '-'}"
        chosen = {part: self._pick(chain, n.kind.value, part, where) for part, _ in _PARTS}
        folder, _ = chosen["text"]
        context = _context(n, folder, _babel_locale(n.recipient.locale, folder))
        try:
            subject = chosen["subject"][1].render(context)
            text = wrap_text(chosen["text"][1].render(context))
            html = self._inliner.inline(chosen["html"][1].render(context))
        except Exception as exc:
            # `from None`: a chained cause could carry the data that upset the template.
            raise RenderError(f"{where}: {self._diagnose(chosen, context, exc)}") from None
        return RenderedMail(one_line(subject), text, html)

    def _diagnose(
        self, chosen: dict[str, tuple[str, Template]], context: dict[str, Any], exc: Exception
    ) -> str:
        """The reason, named after the template and line it is in.

        A flattened template's frames carry its own name with an included one's lines: the
        same render through Jinja's plain templates (with their includes) names the right
        one.
        """
        for _, template in chosen.values():
            try:
                self._env.get_template(template.name or "").render(context)
            except Exception as plain:
                return _reason(plain)
        return _reason(exc)

    def check(self) -> None:
        """Render every kind in every locale folder (and a fallback) with sample data."""
        for locale in (*self.locales, "zz"):
            for kind in Kind:
                for full in (True, False):
                    self.render(_sample(kind, locale, full=full))

    def _chain(self, locale: str) -> list[str]:
        # "de-AT" → de-at, de, en: the most specific folder that exists wins.
        norm = (locale or "").strip().lower().replace("_", "-")
        chain = [norm, norm.partition("-")[0], FALLBACK_LOCALE]
        found = [self._folders[c] for c in chain if c in self._folders]
        return list(dict.fromkeys(found)) or [FALLBACK_LOCALE]

    def _pick(self, chain: list[str], kind: str, part: str, where: str) -> tuple[str, Template]:
        for folder in chain:
            template = self._templates.get((folder, kind, part))
            if template is not None:
                return folder, template
        suffix = dict(_PARTS)[part]
        raise RenderError(f"{where}: no template {kind}{suffix} in {', '.join(chain)}")


def _reason(exc: BaseException) -> str:
    """One line naming the template, line and error class; error text only when safe."""
    where = ""
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        filename = frame.f_code.co_filename
        if filename.endswith((".html", ".txt")):
            where = f"{Path(filename).parent.name}/{Path(filename).name} line {lineno}: "
    if isinstance(exc, TemplateSyntaxError):
        where = f"{exc.name or exc.filename or '?'} line {exc.lineno}: "
        return f"{where}{type(exc).__name__}: {one_line(exc.message or '', 200)}"
    if isinstance(exc, TemplateNotFound):
        return f"{where}TemplateNotFound: {one_line(str(exc.name), 200)}"
    message = str(exc)
    if _SAFE_UNDEFINED.fullmatch(message):
        return f"{where}{type(exc).__name__}: {message}"
    return f"{where}{type(exc).__name__}"


@lru_cache(maxsize=256)
def _babel_locale(locale: str, folder: str) -> Locale:
    """The recipient's own locale when the chosen folder speaks its language, else the folder's.

    So "de-AT" reads German text with Austrian dates, and "fr" English text with English
    dates rather than a French date inside an English sentence.
    """
    wanted = _parse_locale(locale)
    fallback = _parse_locale(folder) or Locale.parse(FALLBACK_LOCALE)
    if wanted is not None and wanted.language == fallback.language:
        return wanted
    return fallback


def _parse_locale(tag: str) -> Locale | None:
    try:
        return Locale.parse((tag or "").strip().replace("-", "_"))
    except (ValueError, TypeError, UnknownLocaleError):
        return None


def _time(at: time | datetime) -> str:
    """HH:MM, plus the UTC offset when the value carries one."""
    text = f"{at.hour:02d}:{at.minute:02d}"
    offset = at.utcoffset()
    if offset is None:
        return text
    if offset == timedelta(0):
        return f"{text} UTC"
    sign = "-" if offset < timedelta(0) else "+"
    minutes = abs(int(offset.total_seconds())) // 60
    return f"{text} UTC{sign}{minutes // 60:02d}:{minutes % 60:02d}"


@lru_cache(maxsize=4096)
def _medium_date(day: date, locale: Locale) -> str:
    # Babel formats a date in ~15 us; the same few dates recur across a backlog.
    return format_date(day, "medium", locale=locale)


def format_when(value: date | None, at: time | None, locale: Locale) -> str:
    """A date (medium format) with an optional HH:MM time; "" when nothing is set."""
    if value is None:
        return _time(at) if at is not None else ""
    day = _medium_date(value if not isinstance(value, datetime) else value.date(), locale)
    if at is None and isinstance(value, datetime):
        return f"{day} {_time(value)}"
    return f"{day} {_time(at)}" if at is not None else day


def _name(ref: str) -> str:
    return ref.replace("\\", "/").rpartition("/")[2]


def _context(n: Notification, folder: str, locale: Locale) -> dict[str, Any]:
    return {
        "kind": n.kind.value,
        "lang": folder,
        "ticket_id": n.ticket_id,
        "reference": n.ticket_reference or n.ticket_id,
        "ticket_subject": n.ticket_subject,
        "customer_name": n.customer_name,
        # A recipient known only by address has no name to greet: "Hello," not "Hello x@y,".
        "recipient_name": (
            "" if n.recipient.name.lower() == n.recipient.email.lower() else n.recipient.name
        ),
        "activity_id": n.activity_id,
        "activity_type": n.activity_type or "",
        "author": n.author or "",
        "is_followup": bool(n.parent_activity_id),
        "activity_text": n.activity_text,
        "update_text": n.update_text,
        # Internal: only staff mail and reminders may show it, whatever a template asks for.
        "comment_text": n.comment_text if n.kind.internal else "",
        "dates": [(name, format_when(value, None, locale)) for name, value in n.dates],
        "action_required": format_when(n.action_required, n.action_required_time, locale),
        "followup": format_when(n.followup, n.followup_time, locale),
        "attachments": [_name(ref) for ref in n.attachments],
        "listed_attachments": [_name(ref) for ref in n.listed_attachments],
    }


def _sample(kind: Kind, locale: str, *, full: bool) -> Notification:
    """A notification shaped like routing's output for `kind`; `full` sets every field."""
    staff, supplier = kind.internal, kind is Kind.SUPPLIER
    when = datetime(2026, 11, 27, 9, 15, tzinfo=UTC)
    text = "Line one\nLine <two> & {{ 7*7 }}" if full else ""
    dates: tuple[tuple[str, date | datetime], ...] = ()
    if full and staff:
        dates = (("activity_date", when), ("action_required_date", date(2026, 12, 1)))
    elif full and supplier:
        dates = (("action_required_date", date(2026, 12, 1)),)
    return Notification(
        kind=kind,
        activity_id="5001",
        ticket_id="1042",
        ticket_reference="T-1042" if full else "",
        ticket_subject="Printer on floor 3 jams" if full else "",
        customer_name="Dana Smith" if full else "",
        parent_activity_id="5000" if full else None,
        recipient=Contact(name="Sample Recipient" if full else "", email="r@x.test", locale=locale),
        activity_type="E-mail" if full else None,
        author="Alice Jones" if full else None,
        activity_text=text if kind is not Kind.CUSTOMER_UPDATE else "",
        update_text=text if kind is Kind.CUSTOMER_UPDATE or staff else "",
        comment_text=text if staff else "",
        dates=dates,
        action_required=date(2026, 12, 1) if full and (staff or supplier) else None,
        action_required_time=time(14, 30) if full and (staff or supplier) else None,
        followup=date(2026, 12, 2) if full and staff else None,
        followup_time=time(8, 0) if full and staff else None,
        # A reminder always has its moment; the templates show it as the due date.
        moment="2026-12-02T08:00:00Z" if kind.reminder else "",
        attachments=("docs/manual.pdf",) if full and not staff else (),
        listed_attachments=("docs/manual.pdf", "inv/R-1.pdf") if full and staff else (),
    )
