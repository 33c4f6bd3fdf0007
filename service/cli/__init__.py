"""The `notifier` command: run, preview, dlq replay, db, deliveries, publish, bridge, dev."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from service.runtime.settings import SettingsError, settings_or_exit


def cmd_run(args: argparse.Namespace) -> int:
    # Settings first: a bad one stops start-up before the whole service is imported.
    settings = settings_or_exit()
    from service.runtime.app import create_app, settle_heap
    from service.runtime.logs import configure_logging

    configure_logging(settings.log_level)
    try:
        app = create_app(settings)
    except SettingsError as exc:
        print(f"notifier: bad setting: {exc}", file=sys.stderr)
        return 2
    from service.cli.db import check_ledger

    if failed := check_ledger(settings):  # a bad ledger URL, password or schema: one line
        return failed
    settle_heap()
    with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
        runner.run(
            app.run(
                log_level=20,
                # log_config None: uvicorn keeps our JSON logging instead of its own.
                run_extra_options={
                    "host": settings.http_host,
                    "port": settings.http_port,
                    "log_config": None,
                    # FastStream passes it through str.lower(): a string, not a bool.
                    "access_log": "false",
                },
            )
        )
    return 0


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """NOTIFY_EVENT_LOOP: uvloop's loop, or None for the standard library's."""
    if name != "uvloop":
        return None
    import uvloop

    return uvloop.new_event_loop


def cmd_preview(args: argparse.Namespace) -> int:
    from service.cli.preview import preview

    settings = settings_or_exit()
    try:
        return preview(settings, Path(args.event), Path(args.out) if args.out else None)
    except SettingsError as exc:
        print(f"notifier: bad setting: {exc}", file=sys.stderr)
        return 2


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    from service.cli.replay import replay

    settings = settings_or_exit()
    count = asyncio.run(
        replay(
            settings,
            stage=args.stage,
            contains=args.contains,
            limit=args.limit,
            dry_run=args.dry_run,
        )
    )
    print(
        f"replayed {count} dead letter(s) to {settings.topic}"
        if not args.dry_run
        else f"would replay {count} dead letter(s)"
    )
    return 0


def cmd_asyncapi(args: argparse.Namespace) -> int:
    from service.runtime.asyncapi import asyncapi_yaml

    text = asyncapi_yaml()
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def cmd_dev(args: argparse.Namespace) -> int:  # noqa: RET503 (execve does not return)
    # The local stack is dev tooling (devkit/ in a checkout), not part of the package:
    # run it from the checkout this package was imported from, if there is one.
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / "devkit" / "devstack.py").is_file():
        print(
            "notifier dev: needs a checkout of the project (devkit/ is not installed with it)",
            file=sys.stderr,
        )
        return 2
    environ = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(checkout), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    os.execve(sys.executable, [sys.executable, "-m", "devkit.devstack", *args.rest], environ)  # noqa: S606


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="notifier", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="consume ticket activities and send the e-mails")
    run.set_defaults(func=cmd_run)

    pre = sub.add_parser("preview", help="render every mail an event would produce")
    pre.add_argument("event", help="a CloudEvent JSON file ('-' for standard input)")
    pre.add_argument("--out", help="write .eml and .html files into this folder")
    pre.set_defaults(func=cmd_preview)

    dlq = sub.add_parser("dlq", help="dead-letter topic tools")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    rep = dlq_sub.add_parser("replay", help="send dead letters back to the main topic")
    rep.add_argument("--stage", help="only dead letters of this x-error-stage")
    rep.add_argument("--contains", help="only dead letters whose reason contains this text")
    rep.add_argument("--limit", type=int, default=None, help="replay at most this many")
    rep.add_argument("--dry-run", action="store_true", help="count, send nothing, commit nothing")
    rep.set_defaults(func=cmd_dlq_replay)

    from service.cli.db import add_db_commands
    from service.cli.deliveries import add_deliveries_command
    from service.cli.producer import add_producer_commands

    add_producer_commands(sub)
    add_db_commands(sub)
    add_deliveries_command(sub)

    spec = sub.add_parser("asyncapi", help="print the AsyncAPI document of the topics")
    spec.add_argument("--out", help="write it to this file (docs/asyncapi.yaml)")
    spec.set_defaults(func=cmd_asyncapi)

    dev = sub.add_parser("dev", help="local Kafka broker and SMTP capture (see README)")
    dev.add_argument("rest", nargs=argparse.REMAINDER)
    dev.set_defaults(func=cmd_dev)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
