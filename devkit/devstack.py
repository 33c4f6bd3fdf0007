"""`notifier dev`: a local Kafka broker and an SMTP capture for development (`scripts/demo`).

Run as `python -m devkit.devstack up|kafka|smtp`; `notifier dev` execs that from a checkout.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import sys
import threading
from pathlib import Path

from devkit.kafka import KafkaNode, KafkaNodeError, kafka_jar_dir
from devkit.smtp import Stoppable, run_smtp_capture

DEV_KAFKA_PORT = 9092
DEV_CONTROLLER_PORT = 9093
DEV_SMTP_PORT = 1025


def main(argv: list[str]) -> int:
    """`notifier dev up|kafka|smtp [options]`; argv is what follows "dev", e.g. ["up"].

    up: Kafka on 127.0.0.1:9092 and SMTP capture on 127.0.0.1:1025 into ./var/mail;
    kafka: only the broker; smtp: only the capture. Runs until Ctrl-C or SIGTERM.
    """
    parser = argparse.ArgumentParser(prog="notifier dev", description=main.__doc__)
    parser.add_argument("what", choices=["up", "kafka", "smtp"])
    parser.add_argument("--var", type=Path, default=Path("var"), help="state dir (./var)")
    parser.add_argument("--kafka-port", type=int, default=DEV_KAFKA_PORT)
    parser.add_argument("--controller-port", type=int, default=DEV_CONTROLLER_PORT)
    parser.add_argument("--smtp-port", type=int, default=DEV_SMTP_PORT)
    parser.add_argument("--fresh", action="store_true", help="wipe Kafka's data first")
    args = parser.parse_args(argv)

    stop = threading.Event()
    # SIGTERM ends the wait like Ctrl-C does, so both paths stop the servers in order.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    node: KafkaNode | None = None
    smtp: Stoppable | None = None
    try:
        if args.what in ("up", "kafka"):
            kafka_dir = args.var / "kafka"
            if args.fresh:
                shutil.rmtree(kafka_dir, ignore_errors=True)
            node = KafkaNode(kafka_dir, args.kafka_port, args.controller_port)
            print(f"kafka: starting (jars: {kafka_jar_dir()})", flush=True)
            node.start()
            print(f"kafka: {node.bootstrap}  data: {node.data_dir}  log: {node.log_path}")
        if args.what in ("up", "smtp"):
            maildir = (args.var / "mail").resolve()
            smtp = run_smtp_capture("127.0.0.1", args.smtp_port, maildir)
            print(f"smtp:  127.0.0.1:{args.smtp_port}  mail: {maildir}")
        print("ready; Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            if node is not None and not node.running:
                print(f"kafka: broker exited, see {node.log_path}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        pass
    except (KafkaNodeError, OSError) as e:
        print(f"notifier dev: {e}", file=sys.stderr)
        return 1
    finally:
        if smtp is not None:
            with contextlib.suppress(Exception):
                smtp.stop()
        if node is not None:
            node.stop()
        print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
