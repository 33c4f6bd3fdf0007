"""A render worker's work alone: `MailFactory.build` over the workload, two checkouts.

    python -m benchmarks.build --baseline CHECKOUT [--events 2000] [--rounds 3]

Each round runs this checkout and then the other one in a child process of its own (its
checkout first on the path: its service, its templates, its `benchmarks.events`), which
builds every mail of the same workload (same seed, same run id) once to warm up, then five
times, and reports its best pass in µs of CPU per mail. Rounds alternate, so a burst of load
elsewhere on the machine hits a round, not a checkout. No Kafka, no network, no pickling:
for changes to rendering, attachments, MIME and `.ics` (the workers' share of a mail).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
CHECKOUT = HERE.parents[1]
PASSES = 5


def child(events: int) -> dict[str, object]:
    """In the checkout under test: the best of PASSES builds of the workload's mails."""
    import service
    from benchmarks.events import build_workload, notifications
    from service.delivery.build import MailSpec
    from service.runtime.settings import default_templates_dir

    with tempfile.TemporaryDirectory(prefix="notifier-build-") as tmp:
        workload = build_workload(Path(tmp), events, run="build")
        notes = notifications(workload, workload.events)
        factory = MailSpec(
            templates_dir=default_templates_dir(),
            attachments_dir=workload.attachments_dir,
            max_attachment_bytes=10 << 20,
            max_mail_bytes=25 << 20,
            sender="Helpdesk <helpdesk@helpdesk.test>",
            reply_to="support@helpdesk.test",
            domain="helpdesk.test",
        ).factory()
        for n in notes:  # warm-up: templates compiled, CSS shapes and files cached
            factory.build(n)
        best = float("inf")
        for _ in range(PASSES):
            started = time.process_time()
            for n in notes:
                factory.build(n)
            best = min(best, time.process_time() - started)
    return {
        "service": str(Path(service.__file__).parents[1]),
        "mails": len(notes),
        "us_per_mail": best * 1e6 / len(notes),
    }


def _run_child(checkout: Path, events: int) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run(
        [sys.executable, str(HERE), "child", "--events", str(events)],
        cwd=checkout,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    ).stdout
    result: dict[str, object] = json.loads(out)
    if Path(str(result["service"])).resolve() != checkout.resolve():
        raise SystemExit(f"the child imported {result['service']}, not {checkout}")
    return result


def compare(baseline: Path | None, events: int, rounds: int) -> dict[str, list[float]]:
    """µs per mail of each checkout, one figure per round."""
    checkouts = {"this": CHECKOUT}
    if baseline is not None:
        checkouts["baseline"] = baseline.resolve()
    figures: dict[str, list[float]] = {name: [] for name in checkouts}
    for _ in range(rounds):
        for name, checkout in checkouts.items():
            result = _run_child(checkout, events)
            figures[name].append(float(str(result["us_per_mail"])))
    mails = result["mails"]
    for name, values in figures.items():
        shown = " / ".join(f"{v:.1f}" for v in values)
        print(f"{name}: {shown} µs CPU per mail (MailFactory.build, {mails} mails, best of 5)")
    if baseline is not None:
        ratio = min(figures["this"]) / min(figures["baseline"])
        print(f"this / baseline, best rounds: {ratio:.2f}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", nargs="?", choices=["compare", "child"], default="compare")
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT")
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.mode == "child":
        print(json.dumps(child(args.events)))
    else:
        compare(args.baseline, args.events, args.rounds)


if __name__ == "__main__":
    main()
