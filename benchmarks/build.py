"""A render worker's work alone: `MailFactory.build` over the workload, two checkouts.

    python -m benchmarks.build --baseline CHECKOUT [--events 2000] [--rounds 3]
    python -m benchmarks.build --baseline CHECKOUT --workers 2

Each round runs this checkout and then the other one in a child process of its own (its
checkout first on the path: its service, its templates, its `benchmarks.events`), which
builds every mail of the same workload (same seed, same run id) once to warm up, then five
times, and reports its best pass in µs of CPU per mail. Rounds alternate, so a burst of load
elsewhere on the machine hits a round, not a checkout. No Kafka, no network, no pickling:
for changes to rendering, attachments, MIME and `.ics` (the workers' share of a mail).

With `--workers N` the child builds the same mails through a `WorkerPool` of N processes
instead, on uvloop as the service does, in batches of 500 split into chunks as the service
splits them, and reports the hand-off's cost: µs of CPU per mail in the child itself (its
event loop and any thread it has) and in its workers, the best pass of each.
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
from typing import Any

HERE = Path(__file__).resolve()
CHECKOUT = HERE.parents[1]
PASSES = 5
BATCH = 500  # NOTIFY_BATCH_MAX_RECORDS' default


def child(events: int, workers: int = 0) -> dict[str, object]:
    """In the checkout under test: the best of PASSES builds of the workload's mails."""
    import service
    from benchmarks.events import build_workload, notifications
    from service.delivery.build import MailSpec
    from service.runtime.settings import default_templates_dir

    with tempfile.TemporaryDirectory(prefix="notifier-build-") as tmp:
        workload = build_workload(Path(tmp), events, run="build")
        notes = notifications(workload, workload.events)
        spec = MailSpec(
            templates_dir=default_templates_dir(),
            attachments_dir=workload.attachments_dir,
            max_attachment_bytes=10 << 20,
            max_mail_bytes=25 << 20,
            sender="Helpdesk <helpdesk@helpdesk.test>",
            reply_to="support@helpdesk.test",
            domain="helpdesk.test",
        )
        figures = _pooled(spec, notes, workers) if workers else _inline(spec, notes)
    return {"service": str(Path(service.__file__).parents[1]), "mails": len(notes), **figures}


def _inline(spec: Any, notes: list[Any]) -> dict[str, float]:
    factory = spec.factory()
    for n in notes:  # warm-up: templates compiled, CSS shapes and files cached
        factory.build(n)
    best = float("inf")
    for _ in range(PASSES):
        started = time.process_time()
        for n in notes:
            factory.build(n)
        best = min(best, time.process_time() - started)
    return {"us_per_mail": best * 1e6 / len(notes)}


def _pooled(spec: Any, notes: list[Any], workers: int) -> dict[str, float]:
    import asyncio

    import psutil
    import uvloop

    from service.delivery.workers import WorkerPool

    me = psutil.Process()

    def workers_cpu() -> float:
        return sum(sum(c.cpu_times()[:2]) for c in me.children())

    async def run() -> dict[str, float]:
        pool = WorkerPool(spec, workers)
        await pool.start()
        try:
            passes = []
            for _ in range(PASSES + 1):  # the first warms the workers up
                mine, theirs = time.process_time(), workers_cpu()
                for start in range(0, len(notes), BATCH):
                    batch = notes[start : start + BATCH]
                    await asyncio.gather(*map(pool.build_chunk, pool.chunks(batch)))
                passes.append((time.process_time() - mine, workers_cpu() - theirs))
        finally:
            pool.close()
        here = min(mine for mine, _ in passes[1:])  # each side's best pass
        there = min(theirs for _, theirs in passes[1:])
        return {
            "us_per_mail": here * 1e6 / len(notes),
            "workers_us_per_mail": there * 1e6 / len(notes),
        }

    return uvloop.run(run())


def _run_child(checkout: Path, events: int, workers: int) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run(
        [sys.executable, str(HERE), "child", "--events", str(events), "--workers", str(workers)],
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


def compare(
    baseline: Path | None, events: int, rounds: int, workers: int = 0
) -> dict[str, list[dict[str, float]]]:
    """µs per mail of each checkout, one set of figures per round."""
    checkouts = {"this": CHECKOUT}
    if baseline is not None:
        checkouts["baseline"] = baseline.resolve()
    figures: dict[str, list[dict[str, float]]] = {name: [] for name in checkouts}
    for _ in range(rounds):
        for name, checkout in checkouts.items():
            result = _run_child(checkout, events, workers)
            figures[name].append({k: float(str(v)) for k, v in result.items() if "us" in k})
    mails = result["mails"]
    what = f"a WorkerPool of {workers}" if workers else "MailFactory.build"
    for name, values in figures.items():
        shown = " / ".join(f"{v['us_per_mail']:.1f}" for v in values)
        line = f"{name}: {shown} µs CPU per mail ({what}, {mails} mails, best of {PASSES})"
        if workers:
            there = " / ".join(f"{v['workers_us_per_mail']:.1f}" for v in values)
            line += f"; in its workers {there}"
        print(line)
    if baseline is not None:
        best = {name: min(v["us_per_mail"] for v in values) for name, values in figures.items()}
        print(f"this / baseline, best rounds: {best['this'] / best['baseline']:.2f}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", nargs="?", choices=["compare", "child"], default="compare")
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT")
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--workers", type=int, default=0, help="through a WorkerPool of N (0: in one process)"
    )
    args = parser.parse_args()
    if args.mode == "child":
        print(json.dumps(child(args.events, args.workers)))
    else:
        compare(args.baseline, args.events, args.rounds, args.workers)


if __name__ == "__main__":
    main()
