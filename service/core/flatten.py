"""Included templates compiled into the template that includes them (Jinja's own parser).

A `{% include %}` costs a new Context (a copy of every variable and global) and a nested
generator on every render, ~6 per mail. Written into the including template as a scope of
its own, the same nodes render the same text without either. Only where the two are the
same by construction: the included template must not need to be a template of its own,
and the include must see no more than the context.

Pure: it reads templates through the environment's loader, as Jinja's include would.
"""

from __future__ import annotations

from jinja2 import Environment, TemplateNotFound, nodes

# An included template that has any of these stays an include: blocks, `self` and
# `extends` belong to a template; macros and imports are its exports.
_OWN_NODES = (
    nodes.Extends,
    nodes.Block,
    nodes.Macro,
    nodes.Import,
    nodes.FromImport,
    nodes.EvalContextModifier,  # `{% autoescape %}` and extensions' modifiers
)
# An include inside these is handed more than the context (a loop's variables, a macro's
# arguments, `caller`, a `with`'s names) or another eval context: it stays an include.
_LOCAL_NODES = (
    nodes.For,
    nodes.Macro,
    nodes.CallBlock,
    nodes.FilterBlock,
    nodes.With,
    nodes.Scope,
    nodes.OverlayScope,
    nodes.EvalContextModifier,
)


def flatten(env: Environment, ast: nodes.Template, name: str) -> nodes.Template:
    """`ast` (the template `name`, parsed by `env`) with its plain includes put in place.

    An include stays an include when its name is not a constant, it is `ignore missing` or
    `without context`, its template is missing, escapes differently, includes itself, or
    has any of `_OWN_NODES`. The rest becomes a `Scope` of the included template's nodes
    (flattened in turn), so its `set`s stay its own, as they would in an include.
    """
    _put_in_place(env, ast, (name,))
    return ast


def _put_in_place(env: Environment, node: nodes.Node, names: tuple[str, ...]) -> None:
    for _, value in node.iter_fields():
        if isinstance(value, nodes.Node):
            if not isinstance(value, _LOCAL_NODES):
                _put_in_place(env, value, names)
        elif isinstance(value, list):
            for i, child in enumerate(value):
                if isinstance(child, nodes.Include):
                    value[i] = _included(env, child, names) or child
                elif isinstance(child, nodes.Node) and not isinstance(child, _LOCAL_NODES):
                    _put_in_place(env, child, names)


def _included(
    env: Environment, include: nodes.Include, names: tuple[str, ...]
) -> nodes.Scope | None:
    target = include.template
    if not (
        include.with_context
        and not include.ignore_missing
        and isinstance(target, nodes.Const)
        and isinstance(target.value, str)
        and env.loader is not None
    ):
        return None
    name = env.join_path(target.value, names[-1])
    if name in names or _escapes(env, name) != _escapes(env, names[-1]):
        return None
    try:
        source, filename, _ = env.loader.get_source(env, name)
    except TemplateNotFound:
        return None  # an error at render time, as Jinja would raise it
    ast = env.parse(source, name, filename)
    if any(True for _ in ast.find_all(_OWN_NODES)) or any(
        n.name == "self" for n in ast.find_all(nodes.Name)
    ):
        return None
    _put_in_place(env, ast, (*names, name))
    scope = nodes.Scope(ast.body, lineno=include.lineno)
    scope.set_environment(env)
    return scope


def _escapes(env: Environment, name: str) -> bool:
    autoescape = env.autoescape
    return bool(autoescape(name) if callable(autoescape) else autoescape)
