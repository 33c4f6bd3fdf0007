"""`python -m benchmarks.serve`: the service's app served by uvicorn, as `notifier run` does.

The same `create_app(load_settings())` and JSON logging as `service.cli.cmd_run`, without
the CLI layer; `benchmarks.run --launcher` uses it.

For estimating proposals without editing the service, BENCH_EXPERIMENTS (comma-separated)
patches the service in this process only:

- `batch-timeout=MS`: FastStream's `batch_timeout_ms` (default 200), which is also how
  long its batch subscriber sleeps after an empty poll;
- `buffered-logs`: log records go through a MemoryHandler flushed every 100 ms (and at
  once for WARNING and above) instead of one write per line;
- `no-css-inline`: skip css-inline (NOT equivalent output: only to size its cost);
- `timeline=PATH`: a line per stage of each batch (`handle_batch+`, `claim-`, …) and per
  mail accepted (`accepted+`, until recorded), with its monotonic time, and per record its
  age when the dispatcher got it, appended to PATH (a probe: the writes cost time);
  `python -m benchmarks.timeline PATH` sums it up;
- `waits=PATH`: per awaited stage (building, a mail's SMTP send with its wait for a
  connection, the record, the SQLite thread's work) its calls and summed wall time, as
  JSON, every second;
- `switch-interval=S`: `sys.setswitchinterval(S)` (the GIL's hand-over interval);
- `uvloop`: uvloop's event loop, as `notifier run` has it (this launcher's default is
  asyncio's).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import logging.handlers
import os
import sys
import threading
from typing import Any

import uvicorn

from service.runtime.app import create_app
from service.runtime.logs import configure_logging
from service.runtime.settings import SettingsError, load_settings


def _batch_timeout(ms: int) -> None:
    from faststream.kafka import KafkaBroker

    original = KafkaBroker.subscriber

    @functools.wraps(original)
    def subscriber(self: KafkaBroker, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("batch_timeout_ms", ms)
        return original(self, *args, **kwargs)

    KafkaBroker.subscriber = subscriber  # type: ignore[method-assign]


def _buffered_logs() -> None:
    root = logging.getLogger()
    buffered = [
        logging.handlers.MemoryHandler(1024, logging.WARNING, target=h, flushOnClose=True)
        for h in root.handlers
    ]
    root.handlers[:] = buffered

    def flush() -> None:
        while True:
            threading.Event().wait(0.1)
            for handler in buffered:
                handler.flush()

    threading.Thread(target=flush, name="log-flush", daemon=True).start()


def _no_css_inline() -> None:
    from service.core.render import Renderer

    original = Renderer.__init__

    def init(self: Renderer, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)

        class Identity:
            def inline(self, html: str) -> str:
                return html

        self._inliner = Identity()  # type: ignore[assignment]

    Renderer.__init__ = init  # type: ignore[method-assign]


def _around(cls: Any, name: str, enter: Any, leave: Any) -> None:
    """Patch the coroutine method `cls.name`: `enter()` before it, `leave(state)` after
    it (whatever it raised), `state` being what `enter()` returned."""
    original = getattr(cls, name)

    @functools.wraps(original)
    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        state = enter()
        try:
            return await original(*args, **kwargs)
        finally:
            leave(state)

    setattr(cls, name, wrapped)


def _timeline(path: str) -> None:
    """Probe: monotonic stamps of each batch's stages and of every mail sent, to `path`."""
    import atexit
    import time

    from service.delivery.batches import BatchOpener
    from service.delivery.dispatch import Dispatcher
    from service.delivery.ledger.sqlite import SqliteLedger
    from service.delivery.outcomes import Outcomes
    from service.delivery.workers import WorkerPool
    from service.runtime.consumer import BatchConsumer

    out = open(path, "a", buffering=1)  # noqa: SIM115
    atexit.register(out.close)

    def mark(what: str) -> None:
        out.write(f"{time.monotonic():.6f} {what}\n")

    # How old each record is (from its Kafka timestamp) when the dispatcher gets it, and
    # whether it was fetched by the catch-up poll (after the batch was taken).
    handle, dispatch = BatchConsumer.handle, Dispatcher.handle_batch
    taken: set[tuple[int, int]] = set()

    @functools.wraps(handle)
    async def took(self: BatchConsumer, message: Any) -> None:
        taken.clear()
        taken.update((r.partition, r.offset) for r in message.raw_message)
        await handle(self, message)

    @functools.wraps(dispatch)
    async def aged(self: Dispatcher, records: Any, *args: Any, **kwargs: Any) -> None:
        now = 1000 * time.time()
        for r in records:
            how = "taken" if (r.partition, r.offset) in taken else "caught-up"
            mark(f"age {now - (r.timestamp_ms or 0):.2f} {how}")
        await dispatch(self, records, *args, **kwargs)

    BatchConsumer.handle = took  # type: ignore[method-assign]
    Dispatcher.handle_batch = aged  # type: ignore[method-assign]

    ledger = ("look_up", "first_start", "sent", "sent_mails", "claim", "record_ticket")
    for cls, name in [
        (BatchConsumer, "handle"),
        (Dispatcher, "handle_batch"),
        (BatchOpener, "open"),
        (Outcomes, "sent"),
        (WorkerPool, "build_chunk"),
        *((SqliteLedger, name) for name in ledger),
    ]:
        # Outcomes.sent (a mail accepted, until recorded) apart from the ledger's look-up.
        label = "accepted" if cls is Outcomes else name
        _around(cls, name, lambda n=label: mark(f"{n}+"), lambda _, n=label: mark(f"{n}-"))


def _waits(path: str) -> None:
    """Probe: per awaited stage, how many calls and their summed wall time, to `path`;
    for the SQLite thread's work, its CPU time too."""
    import json
    import time

    from service.delivery.build import InlineBatch
    from service.delivery.dispatch import Dispatcher
    from service.delivery.ledger.sqlite import SqliteLedger
    from service.delivery.outcomes import Outcomes
    from service.delivery.sending import Sender
    from service.delivery.smtp import SmtpPool
    from service.delivery.workers import PooledBatch

    totals: dict[str, list[float]] = {}

    def timed(slot: list[float]) -> tuple[Any, Any]:
        def enter() -> tuple[float, float]:
            return time.perf_counter(), time.thread_time()

        def leave(started: tuple[float, float]) -> None:
            slot[0] += 1
            slot[1] += time.perf_counter() - started[0]
            if len(slot) > 2:
                slot[2] += time.thread_time() - started[1]

        return enter, leave

    for cls, name in [
        (Dispatcher, "handle_batch"),
        (Dispatcher, "_serve"),
        (Sender, "deliver"),
        (Sender, "_build"),
        (PooledBatch, "build"),
        (InlineBatch, "attach"),
        (SmtpPool, "send"),
        (Outcomes, "sent"),
        (SqliteLedger, "_write"),
    ]:
        _around(cls, name, *timed(totals.setdefault(f"{cls.__name__}.{name}", [0, 0.0])))

    # The ledger thread's own work (plain functions run on it): wall and CPU time.
    for name in ("_transaction", "_write_now"):
        original = getattr(SqliteLedger, name)
        enter, leave = timed(
            totals.setdefault(f"SqliteLedger.{name} (thread: wall, CPU)", [0, 0.0, 0.0])
        )

        def in_thread(
            self: Any,
            *args: Any,
            _original: Any = original,
            _enter: Any = enter,
            _leave: Any = leave,
        ) -> Any:
            started = _enter()
            try:
                return _original(self, *args)
            finally:
                _leave(started)

        setattr(SqliteLedger, name, in_thread)

    def dump() -> None:
        while True:
            threading.Event().wait(1.0)
            with open(path, "w") as out:
                json.dump(totals, out)

    threading.Thread(target=dump, name="waits-dump", daemon=True).start()


def main() -> int:
    experiments = [e for e in os.environ.get("BENCH_EXPERIMENTS", "").split(",") if e]
    for experiment in experiments:
        name, _, value = experiment.partition("=")
        if name == "batch-timeout":
            _batch_timeout(int(value))
        elif name == "switch-interval":
            sys.setswitchinterval(float(value))
        elif name == "uvloop":
            import uvloop

            uvloop.install()
        elif name == "waits":
            _waits(value)
        elif name == "timeline":
            _timeline(value)
        elif name == "no-css-inline":
            _no_css_inline()
        elif name != "buffered-logs":
            print(f"benchmarks.serve: unknown experiment {name!r}", file=sys.stderr)
            return 2
    try:
        settings = load_settings()
        configure_logging(settings.log_level)
        if "buffered-logs" in experiments:
            _buffered_logs()
        app = create_app(settings)
    except SettingsError as exc:
        print(f"notifier: bad setting: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        lifespan="on",
        log_config=None,
        access_log=False,
    )
    asyncio.run(uvicorn.Server(config).serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
