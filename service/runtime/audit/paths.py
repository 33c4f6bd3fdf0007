"""Every path the audit answers, and the endpoint name metrics count it under."""

from __future__ import annotations

# AsgiFastStream routes a request to a sub-app only when the path matches exactly (no
# prefixes), so each path is registered on its own; anything else under /ui is its 404.
PATHS: dict[str, str] = {
    "/deliveries": "deliveries",
    "/dead-letters": "dead_letters",
    "/openapi.json": "openapi",
    "/ui": "ui",
    "/ui/": "ui",
    "/ui/login": "login",
    "/ui/logout": "logout",
    "/ui/static/audit.css": "static",
    "/ui/static/favicon.svg": "static",
}

ENDPOINTS: tuple[str, ...] = tuple(dict.fromkeys(PATHS.values()))
"""Endpoint label values, in PATHS order."""


def endpoint_of(path: str) -> str:
    """The metric label for a request path ("other" for one the audit does not serve)."""
    return PATHS.get(path, "other")
