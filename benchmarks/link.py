"""The SMTP pool alone over a link with a round-trip time, against another checkout's pool.

    python -m benchmarks.link --baseline /work/base           # RTT 0, 2 and 10 ms
    python -m benchmarks.link --rtt-ms 5 --connections 8 --mails 4000

On loopback a round trip costs next to nothing, so the whole-service benchmark cannot
show what pipelining across mails saves on a real network: one round trip per mail on a
busy connection instead of two. This puts a delaying TCP relay (its own process: each
chunk forwarded half the RTT after it arrived, in order, both ways) between the pool and
Postfix's `smtp-sink`, and times `SmtpPool.send` of pre-built mails over a few
connections, this checkout's pool and `--baseline`'s in alternating rounds (each a child
process with that checkout first on its path). Loopback only, bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from benchmarks.sinks import SmtpSink

HERE = Path(__file__).resolve()
CHECKOUT = HERE.parents[1]
MESSAGE = (
    b"From: helpdesk@example.test\r\nTo: customer@example.test\r\nSubject: ticket update\r\n"
    b"Message-ID: <bench@example.test>\r\n\r\n" + b"Your ticket was updated.\r\n" * 400
)


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Forward what `reader` gives, each chunk `delay` seconds after it arrived, in order."""
    pending: collections.deque[tuple[float, bytes]] = collections.deque()
    arrived = asyncio.Event()
    done = False

    async def deliver() -> None:
        while True:
            while not pending:
                if done:
                    writer.close()
                    return
                arrived.clear()
                await arrived.wait()
            due, data = pending.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    delivering = asyncio.create_task(deliver())
    try:
        while data := await reader.read(65536):
            pending.append((time.monotonic() + delay, data))
            arrived.set()
    except ConnectionError:
        pass
    finally:
        done = True
        arrived.set()
        await asyncio.gather(delivering, return_exceptions=True)


async def proxy(listen: int, upstream: int, rtt: float) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
        await asyncio.gather(_relay(reader, up_writer, rtt / 2), _relay(up_reader, writer, rtt / 2))

    server = await asyncio.start_server(serve, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


async def client(port: int, mails: int, connections: int) -> dict[str, object]:
    import service
    from service.delivery.smtp import SmtpConfig, SmtpPool

    pool = SmtpPool(SmtpConfig(host="127.0.0.1", port=port, pool_size=connections, timeout=30))
    # Connections opened first, so the timing is the mails alone.
    await asyncio.gather(
        *(
            pool.send("helpdesk@example.test", "warm@example.test", MESSAGE)
            for _ in range(connections)
        )
    )
    started = time.perf_counter()
    cpu = time.process_time()
    await asyncio.gather(
        *(pool.send("helpdesk@example.test", f"u{i}@example.test", MESSAGE) for i in range(mails))
    )
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu
    await pool.close()
    return {
        "service": str(Path(service.__file__).parents[1]),
        "mails_per_second": mails / seconds,
        "cpu_ms_per_mail": cpu * 1000 / mails,
    }


def _run_client(checkout: Path, port: int, mails: int, connections: int) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    args = ["client", "--port", str(port), "--mails", str(mails), "--connections", str(connections)]
    out = subprocess.run(
        [sys.executable, str(HERE), *args],
        cwd=checkout,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    ).stdout
    result: dict[str, object] = json.loads(out)
    if Path(str(result["service"])).resolve() != checkout.resolve():
        raise SystemExit(f"the client imported {result['service']}, not {checkout}")
    return result


def _best(
    checkouts: dict[str, Path], sink: SmtpSink, port: int, args: argparse.Namespace
) -> dict[str, Best]:
    """The best round of each checkout, the checkouts alternating round by round."""
    best: dict[str, Best] = {}
    for _ in range(args.rounds):
        for name, checkout in checkouts.items():
            before = sink.count
            result = _run_client(checkout, port, args.mails, args.connections)
            sent = args.mails + args.connections  # the warm-up mails too
            count, _ = sink.wait_for(before + sent, 10)
            if count != before + sent:
                raise SystemExit(f"{name}: smtp-sink took {count - before} of {sent} mails")
            rate, cpu = (
                float(str(result["mails_per_second"])),
                float(str(result["cpu_ms_per_mail"])),
            )
            if name not in best or rate > best[name].rate:
                best[name] = Best(rate, cpu)
    return best


@dataclass(frozen=True)
class Best:
    rate: float  # mails/s
    cpu: float  # ms of the client's CPU per mail


def compare(args: argparse.Namespace) -> None:
    from benchmarks.sinks import wait_port
    from devkit.process import free_port, terminate

    checkouts = {"this": CHECKOUT}
    if args.baseline is not None:
        checkouts["baseline"] = args.baseline.resolve()
    from benchmarks.sinks import SmtpSink

    with tempfile.TemporaryDirectory() as work:
        sink = SmtpSink(free_port(), Path(work) / "smtp-sink.counters")
        sink.start()
        try:
            for rtt in (float(r) for r in args.rtt_ms.split(",")):
                relay = None
                port = sink.port
                if rtt > 0:
                    port = free_port()
                    command = ["proxy", "--port", str(port), "--upstream", str(sink.port)]
                    relay = subprocess.Popen(
                        [sys.executable, str(HERE), *command, "--rtt-ms", str(rtt)],
                        start_new_session=True,
                    )
                    wait_port(port, 10)
                try:
                    best = _best(checkouts, sink, port, args)
                finally:
                    terminate(relay, 5)
                line = ", ".join(
                    f"{name} {b.rate:.0f} mails/s ({b.cpu:.3f} ms CPU/mail)"
                    for name, b in best.items()
                )
                if "baseline" in best:
                    line += f"; this / baseline {best['this'].rate / best['baseline'].rate:.2f}"
                print(f"RTT {rtt:g} ms, {args.connections} connections, {args.mails} mails: {line}")
        finally:
            sink.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "mode", nargs="?", default="compare", choices=["compare", "proxy", "client"]
    )
    parser.add_argument("--baseline", type=Path, help="another checkout whose pool runs too")
    parser.add_argument("--rtt-ms", default="0,2,10", help="round-trip times, comma-separated")
    parser.add_argument("--connections", type=int, default=2)
    parser.add_argument("--mails", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode == "proxy":
        asyncio.run(proxy(args.port, args.upstream, float(args.rtt_ms) / 1000))
    elif args.mode == "client":
        print(json.dumps(asyncio.run(client(args.port, args.mails, args.connections))))
    else:
        sys.path.insert(0, str(CHECKOUT))
        compare(args)


if __name__ == "__main__":
    main()
