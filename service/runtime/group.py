"""Who else consumes in this group: an unshared (SQLite) ledger there could send twice."""

from __future__ import annotations

import logging
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from service.runtime.metrics import Metrics

log = logging.getLogger("service.runtime.group")


async def count_members(admin: AIOKafkaAdminClient, group_id: str) -> int:
    """Members of the consumer group right now (0 if the group does not exist yet)."""
    responses = await admin.describe_consumer_groups([group_id])
    members = 0
    for response in responses:
        described: dict[str, Any] = response.to_object()
        for group in described.get("groups", []):
            if group.get("group") == group_id:
                members += len(group.get("members") or [])
    return members


class GroupWatch:
    """Counts the group's members; with a ledger only this instance sees, more than one is
    an error: a partition that moves to another instance could be mailed twice.
    """

    def __init__(
        self, bootstrap_servers: str, group_id: str, shared_ledger: bool, metrics: Metrics
    ) -> None:
        self._bootstrap_servers = bootstrap_servers
        self._group_id = group_id
        self._shared_ledger = shared_ledger
        self._metrics = metrics
        self._admin: AIOKafkaAdminClient | None = None
        self.members = 0

    @property
    def unsafe(self) -> bool:
        """True while other instances share the group but not the ledger."""
        return not self._shared_ledger and self.members > 1

    async def check(self) -> None:
        """Count the members again; log and count the unsafe case when it begins."""
        was_unsafe = self.unsafe
        try:
            if self._admin is None:
                admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap_servers)
                await admin.start()
                self._admin = admin
            self.members = await count_members(self._admin, self._group_id)
        except KafkaError as exc:  # the next round tries again
            log.warning("group members not counted", extra={"error": type(exc).__name__})
            return
        self._metrics.group_members.set(self.members)
        self._metrics.unsafe_ledger.set(1 if self.unsafe else 0)
        if self.unsafe and not was_unsafe:
            log.error(
                "other instances share this consumer group, but not this SQLite ledger: mail "
                "could be sent twice; give every instance one PostgreSQL ledger "
                "(NOTIFY_LEDGER_URL=postgresql://...)",
                extra={"group_id": self._group_id, "members": self.members},
            )

    async def close(self) -> None:
        if self._admin is not None:
            await self._admin.close()
            self._admin = None
