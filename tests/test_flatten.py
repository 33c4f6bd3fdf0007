"""Tests for service.core.flatten: an include put in place renders what Jinja's include does."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from jinja2 import DictLoader, Environment, StrictUndefined, nodes, select_autoescape

import service.core.render as render_module
from devkit.events import make_notification
from service.core.flatten import flatten
from service.core.render import Renderer, RenderError
from service.core.routing import Kind

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def _env(templates: dict[str, str]) -> Environment:
    return Environment(
        loader=DictLoader(templates),
        autoescape=select_autoescape(["html"], default_for_string=False, default=False),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _flat_and_plain(templates: dict[str, str], name: str, **context: Any) -> tuple[str, str, int]:
    """(flattened render, Jinja's render, includes left in the flattened template)."""
    env = _env(templates)
    source, filename, _ = env.loader.get_source(env, name)  # type: ignore[union-attr]
    ast = flatten(env, env.parse(source, name, filename), name)
    left = sum(1 for _ in ast.find_all(nodes.Include))
    flat = env.template_class.from_code(
        env, env.compile(ast, name, filename), env.make_globals(None)
    )
    return flat.render(context), env.get_template(name).render(context), left


@pytest.mark.parametrize(
    ("templates", "context", "expected"),
    [
        # Jinja drops a template's last newline, and trim_blocks the one after a tag.
        (
            {
                "main.txt": "a {{ x }}\n{% include 'part.txt' %}\nb {{ x }}\n",
                "part.txt": "part {{ x }} {{ y | upper }}\n",
            },
            {"x": 1, "y": "why"},
            "a 1\npart 1 WHYb 1",
        ),
        # an included `set` stays in the included template
        (
            {
                "main.txt": "{% set x = 1 %}{% include 'part.txt' %}|{{ x }}",
                "part.txt": "{% set x = 2 %}{{ x }}",
            },
            {},
            "2|1",
        ),
        # includes nest, and see the variables set before them
        (
            {
                "main.html": "{% set who = '<b>' %}{% if on %}{% include 'a.html' %}{% endif %}",
                "a.html": "[{% include 'b.html' %}]",
                "b.html": "{{ who }}{{ text }}",
            },
            {"on": True, "text": "&"},
            "[&lt;b&gt;&amp;]",
        ),
    ],
    ids=["plain", "own-set", "nested"],
)
def test_a_plain_include_is_put_in_place_and_renders_the_same(
    templates: dict[str, str], context: dict[str, Any], expected: str
) -> None:
    flat, plain, left = _flat_and_plain(templates, next(iter(templates)), **context)
    assert left == 0
    assert flat == plain == expected


@pytest.mark.parametrize(
    ("templates", "context"),
    [
        # a loop's variables
        (
            {
                "main.txt": "{% for i in items %}{% include 'part.txt' %}{% endfor %}",
                "part.txt": "{{ i }},",
            },
            {"items": "ab"},
        ),
        # ignore missing, and a name that is not a constant
        (
            {
                "main.txt": "{% include 'gone.txt' ignore missing %}{% include which %}",
                "p.txt": "p",
            },
            {"which": "p.txt"},
        ),
        # without context
        ({"main.txt": "{% include 'part.txt' without context %}", "part.txt": "x"}, {}),
        # blocks, macros and imports belong to a template of its own
        (
            {
                "main.txt": "{% include 'a.txt' %}{% include 'b.txt' %}{% include 'c.txt' %}",
                "a.txt": "{% block b %}a{% endblock %}",
                "b.txt": "{% macro m() %}b{% endmacro %}{{ m() }}",
                "c.txt": "{% from 'b.txt' import m %}{{ m() }}{{ self }}",
            },
            {},
        ),
        # another escaping: an .html template including a .txt one
        ({"main.html": "{% include 'part.txt' %}", "part.txt": "{{ t }}"}, {"t": "<i>"}),
    ],
    ids=["in-a-loop", "missing-or-named", "without-context", "own-template", "other-escaping"],
)
def test_includes_that_are_more_than_the_context_stay_includes(
    templates: dict[str, str], context: dict[str, Any]
) -> None:
    name = next(iter(templates))
    flat, plain, left = _flat_and_plain(templates, name, **context)
    assert left >= 1
    assert flat == plain


def test_a_template_that_includes_itself_stays_an_include() -> None:
    templates = {"main.txt": "[{% if n %}{% include 'main.txt' %}{% endif %}]"}
    flat, plain, left = _flat_and_plain(templates, "main.txt", n=False)
    assert left == 1
    assert flat == plain == "[]"


@pytest.fixture(scope="module")
def both() -> tuple[Renderer, Renderer]:
    """The shipped templates, flattened and through Jinja's includes."""
    flat = Renderer(TEMPLATES)
    real = render_module.flatten
    render_module.flatten = lambda env, ast, name: ast
    try:
        plain = Renderer(TEMPLATES)
    finally:
        render_module.flatten = real
    return flat, plain


@pytest.mark.parametrize("full", [True, False], ids=["every-field", "bare"])
@pytest.mark.parametrize("locale", ["en", "de", "fr"])
@pytest.mark.parametrize("kind", list(Kind))
def test_shipped_templates_render_byte_for_byte_as_with_includes(
    both: tuple[Renderer, Renderer], kind: Kind, locale: str, full: bool
) -> None:
    flat, plain = both
    texts = (
        {
            "activity_text": "line <1>\n& line 2",
            "update_text": "upd\n\nate",
            "comment_text": "internal & <secret>" if kind.internal else "",
            "attachments": ("a/b.pdf",),
            "listed_attachments": ("c.png",),
        }
        if full
        else {
            "activity_text": "",
            "update_text": "",
            "comment_text": "",
            "attachments": (),
            "listed_attachments": (),
        }
    )
    n = make_notification(kind, locale=locale, **texts)
    assert flat.render(n) == plain.render(n)


def test_an_error_in_an_included_template_names_that_template(tmp_path: Path) -> None:
    root = tmp_path / "templates"
    shutil.copytree(TEMPLATES, root)
    (root / "en" / "_internal.txt").write_text("\n\n{{ no_such_variable }}\n", encoding="utf-8")
    renderer = Renderer(root)
    with pytest.raises(RenderError, match=r"en/_internal\.txt line 3: .*'no_such_variable'"):
        renderer.render(make_notification(Kind.STAFF, locale="en"))
