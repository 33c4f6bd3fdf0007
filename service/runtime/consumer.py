"""The one place below FastStream: a batch handler that commits, rewinds and measures by hand.

FastStream's batch subscriber (with `AckPolicy.MANUAL`) fetches and hands us batches; three
things it cannot do are done here, on the subscriber's public `consumer` (aiokafka's):
- Keep header bytes: its default parser decodes every header value as UTF-8, and one binary
  header would fail the whole batch forever. Our parser hook hands the raw records on.
- Rewind safely: its `nack()` seeks every partition of the batch, and aiokafka refuses a seek
  on a partition this instance no longer owns after a rebalance. We seek only owned ones.
- Survive a commit that races a rebalance: the records come back to whoever owns them now,
  and the ledger keeps them from being sent twice.
- Commit at most every `commit_interval` seconds: a finished batch's offsets are committed
  at once when the last commit is that old, otherwise they wait (at most that long) for the
  next batch's commit or for a timer. A commit is a broker round trip on every batch's path
  (7 ms on Kafka 4 with its default coordinator linger), while what waits is only offsets
  of records already done: a crash or a rebalance reads them again and the ledger skips
  them. The offsets are those of finished batches, never the consumer's position, since
  the next batch may already be fetched when the timer fires.
- Catch up before serving: aiokafka fetches a partition again only once its buffered records
  were taken, so under steady load a batch holds what arrived while the previous one was
  served, a whole batch's time late. A batch that was waiting in the buffer asks once more,
  briefly, for what arrived since, and is served with it (`CATCH_UP_MS`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    ConsumerStoppedError,
    IllegalStateError,
    KafkaError,
)
from faststream.kafka.message import FAKE_CONSUMER, KafkaMessage
from faststream.kafka.subscriber.usecase import BatchSubscriber

from service.delivery.dead_letters import Record, RetryLater
from service.delivery.dispatch import REVOKE_WAIT_SECONDS, Dispatcher, Revoked
from service.delivery.ledger import LedgerUnavailable
from service.runtime.metrics import Metrics

log = logging.getLogger("service.runtime.consumer")

REWIND_PAUSE_SECONDS = 1.0
# A batch that was already waiting when it was asked for (the poll took less than
# BUFFERED_SECONDS) after a batch that took at least BUSY_SECONDS to serve holds records
# that old: it waits up to CATCH_UP_MS for the ones written since. Measured with aiokafka
# on one broker at 200 records/s and 60 ms per batch: records 91 ms old when served
# (median) without, 35 ms with a 10 ms catch-up.
BUFFERED_SECONDS = 0.003
BUSY_SECONDS = 0.02
CATCH_UP_MS = 10


def record_of(raw: ConsumerRecord[Any, Any]) -> Record:
    return Record(
        topic=raw.topic,
        partition=raw.partition,
        offset=raw.offset,
        key=raw.key,
        value=raw.value,
        headers=tuple((k, v if isinstance(v, bytes) else b"") for k, v in raw.headers),
        timestamp_ms=raw.timestamp,
    )


class BatchConsumer:
    """Serves each batch through the dispatcher, then commits it or rewinds it."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        metrics: Metrics,
        max_records: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        commit_interval: float,
    ) -> None:
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._max_records = max_records
        self._clock = clock
        self._commit_interval = commit_interval
        self._subscriber: BatchSubscriber | None = None
        # When the previous batch's handling began and ended (monotonic).
        self._began = self._ended = 0.0
        # Next offset of each partition whose batches are all done, not yet committed.
        self._done: dict[TopicPartition, int] = {}
        self._committed_at = float("-inf")
        self._commit_lock = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()

    def attach(self, subscriber: BatchSubscriber) -> None:
        """The FastStream subscriber whose batches this handles."""
        self._subscriber = subscriber

    @property
    def consumer(self) -> AIOKafkaConsumer | None:
        """The subscriber's aiokafka consumer, while it runs."""
        return self._subscriber.consumer if self._subscriber is not None else None

    async def parse(self, records: tuple[ConsumerRecord[Any, Any], ...], original: Any) -> Any:
        """FastStream parser hook: the batch as it came, bodies and headers left as bytes."""
        first, last = records[0], records[-1]
        return KafkaMessage(
            records,
            body=b"",
            message_id=f"{first.topic}-{first.partition}-{first.offset}-{last.offset}",
            consumer=self.consumer or FAKE_CONSUMER,
        )

    async def decode(self, message: Any, original: Any) -> None:
        """FastStream decoder hook: bodies are parsed by the dispatcher, which dead-letters."""
        return

    async def handle(self, message: KafkaMessage) -> None:
        """Serve one batch; commit it only when every record is done."""
        raw: list[ConsumerRecord[Any, Any]] = list(message.raw_message)
        began = self._clock()
        try:
            raw += await self._catch_up(began, len(raw))
            await self._serve([record_of(r) for r in raw])
        finally:
            self._began, self._ended = began, self._clock()

    async def _catch_up(self, began: float, taken: int) -> list[ConsumerRecord[Any, Any]]:
        """What arrived while the batch waited in the fetch buffer, if it did (see above).

        The records come after the batch's own on each partition, and are consumed, rewound
        and committed with it.
        """
        consumer = self.consumer
        room = self._max_records - taken
        buffered = began - self._ended < BUFFERED_SECONDS
        busy = self._ended - self._began >= BUSY_SECONDS
        if consumer is None or room <= 0 or not (buffered and busy):
            return []
        try:
            more = await consumer.getmany(timeout_ms=CATCH_UP_MS, max_records=room)
        except (KafkaError, IllegalStateError, ConsumerStoppedError) as exc:
            # aiokafka raises only when it handed out no record: the batch goes as it is.
            log.warning("catch-up fetch failed", extra={"error": type(exc).__name__})
            return []
        return [record for records in more.values() for record in records]

    async def _serve(self, records: list[Record]) -> None:
        """The batch through the dispatcher; commit it, or rewind it when it failed."""
        try:
            await self._dispatcher.handle_batch(records)
        except Revoked:
            # Partitions moved away mid-batch: what was sent is recorded, the rest is read
            # again by the new owner (or by us, from the last commit, if they came back).
            self._metrics.rewind("rebalanced")
            self._rewind(records)
            return
        except (RetryLater, LedgerUnavailable):
            # Rewind every partition of the batch; the ledger keeps what was sent.
            self._metrics.rewind("retry_later")
            self._rewind(records)
            return
        except Exception as exc:
            # Anything unforeseen must not let the next commit pass these records by:
            # rewind too, and pause so a persistent fault does not spin.
            self._metrics.rewind("error")
            log.error(
                "batch failed, rewinding",
                extra={"error": type(exc).__name__, "records": len(records)},
                exc_info=True,
            )
            self._rewind(records)
            await asyncio.sleep(REWIND_PAUSE_SECONDS)
            return
        # Every record of the batch is done (sent and recorded, dead-lettered or skipped):
        # only now may its offsets be committed.
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            self._done[tp] = max(self._done.get(tp, 0), record.offset + 1)
        due = self._committed_at + self._commit_interval - asyncio.get_running_loop().time()
        if due <= 0 or self._dispatcher.stopping:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(due, self._flush_later)

    def _flush_later(self) -> None:
        self._timer = None
        task = asyncio.create_task(self.flush())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def flush(self) -> None:
        """Commit the offsets of every finished batch (of partitions this instance owns)."""
        async with self._commit_lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._committed_at = asyncio.get_running_loop().time()
            consumer = self.consumer
            if consumer is None or not self._done:
                return
            # Only partitions this instance owns now: one lost in a rebalance is not among them.
            owned = consumer.assignment()
            offsets = {tp: offset for tp, offset in self._done.items() if tp in owned}
            self._done = {}
            if not offsets:
                return
            try:
                await consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError) as exc:
                # The group rebalanced under us: the new owner reads these records again
                # and the ledger skips what was sent.
                self._metrics.rewind("rebalanced")
                log.warning("commit refused after a rebalance", extra={"error": type(exc).__name__})
            except KafkaError as exc:
                # The broker is away: the records are read again after a restart or a
                # rebalance, and the ledger skips them; the next commit carries later ones.
                log.warning("commit failed", extra={"error": type(exc).__name__})

    def forget(self, partitions: set[TopicPartition]) -> None:
        """These partitions moved away: whoever owns them now commits them, and a commit of
        ours must never move one of them back."""
        for tp in partitions:
            self._done.pop(tp, None)

    def _rewind(self, records: list[Record]) -> None:
        consumer = self.consumer
        if consumer is None:
            return
        owned = consumer.assignment()
        earliest: dict[TopicPartition, int] = {}
        for record in records:
            tp = TopicPartition(record.topic, record.partition)
            earliest[tp] = min(earliest.get(tp, record.offset), record.offset)
        for tp, offset in earliest.items():
            if tp in owned:
                consumer.seek(tp, offset)

    @property
    def listener(self) -> ConsumerRebalanceListener:
        """For the subscriber: tells the dispatcher which partitions it loses."""
        return _Rebalance(self._dispatcher, self)

    async def measure_lag(self) -> None:
        """Records behind the end of each owned partition, from the last commit."""
        consumer = self.consumer
        partitions = list(consumer.assignment()) if consumer is not None else []
        if consumer is None or not partitions:
            self._metrics.lags({})
            return
        try:
            ends = await consumer.end_offsets(partitions)
            starts = await consumer.beginning_offsets(partitions)
            behind = {}
            for tp in partitions:
                # Nothing committed yet: count from the oldest record retention has kept.
                committed = await consumer.committed(tp)
                start = starts[tp] if committed is None else committed
                behind[tp.partition] = max(0, ends[tp] - start)
        except (KafkaError, IllegalStateError) as exc:  # the next round tries again
            log.warning("consumer lag not measured", extra={"error": type(exc).__name__})
            return
        self._metrics.lags(behind)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """On a revocation: take no new record of the lost partitions, and give the ones in
    flight a moment to finish, so the next owner finds them recorded instead of claimed.

    aiokafka waits for this before the group rebalances; nothing is committed here (the
    batch handler commits only whole batches, and never a partition it lost), and the
    offsets of lost partitions that wait to be committed are dropped.
    """

    def __init__(self, dispatcher: Dispatcher, consumer: BatchConsumer) -> None:
        self._dispatcher = dispatcher
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        partitions = {(tp.topic, tp.partition) for tp in revoked}
        if not partitions:
            return
        # Not committed here: a commit waits for the group, which waits for this listener.
        self._consumer.forget(revoked)
        self._dispatcher.revoke(partitions)
        try:
            async with asyncio.timeout(REVOKE_WAIT_SECONDS):
                await self._dispatcher.quiesce(partitions)
        except TimeoutError:
            log.warning(
                "records still in flight after a revocation; their claims keep them safe",
                extra={"partitions": len(partitions)},
            )

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        # A batch that began before the rebalance may have finished records of these since.
        self._consumer.forget(assigned)
