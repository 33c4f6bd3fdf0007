"""The audit's one secret: NOTIFY_HTTP_TOKEN, checked in constant time.

The API takes it as `Authorization: Bearer <token>`; the page keeps a value derived from
it in a cookie, so the cookie alone does not open the API and a new token ends every
page session.
"""

from __future__ import annotations

import hashlib
import hmac

COOKIE = "notifier_audit"
COOKIE_PATH = "/ui"
COOKIE_MAX_AGE = 12 * 3600
"""A page session lasts a working day; then the token is asked for again."""


def _digest(value: str) -> bytes:
    # Hashing first gives compare_digest equal lengths: the time of a comparison then
    # tells nothing about the token's length, nor how much of it a guess got right.
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class Token:
    """NOTIFY_HTTP_TOKEN, compared in constant time with what a request presents."""

    def __init__(self, secret: str) -> None:
        self._digest = _digest(secret)
        self._cookie = hmac.new(secret.encode(), b"notifier audit page", hashlib.sha256).hexdigest()
        self._cookie_digest = _digest(self._cookie)

    def matches(self, presented: str) -> bool:
        """Whether `presented` is the token."""
        return hmac.compare_digest(_digest(presented), self._digest)

    def cookie_value(self) -> str:
        """What the page's cookie holds after a login with the right token."""
        return self._cookie

    def cookie_matches(self, presented: str) -> bool:
        """Whether a cookie's value is the one a login with the current token set."""
        return hmac.compare_digest(_digest(presented), self._cookie_digest)
