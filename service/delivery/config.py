"""The dispatcher's settings, as plain values built once at start-up."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from service.core.routing import RoutingPolicy


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """The settings the dispatcher needs, as plain values."""

    envelope_from: str
    domain: str
    policy: RoutingPolicy = field(default_factory=RoutingPolicy)
    concurrency: int = 64
    retry_initial: float = 0.5
    retry_max: float = 30.0
    retry_budget: float = 120.0
    attachment_wait: float = 300.0
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    """This instance, as named in the ledger's claims."""
    lease_seconds: float = 60.0
    recipient_limit: int = 0
    """Mails per address and rolling hour, across instances; 0: no limit."""
    group_id: str = "ticket-notifier"
    history_grace: float = 3600.0
    max_event_age: float | None = None
