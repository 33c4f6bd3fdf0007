"""Scale-out benchmark (issue 12): one backlog drained by 1, 2 and 3 instances on a shared
PostgreSQL ledger and by 1 on SQLite, in one run.

    python -m benchmarks.scaleout             # quick: 6,000 events (~10k mails) per drain, ~3 min
    python -m benchmarks.scaleout --smoke     # tiny: the harness works
    python -m benchmarks.scaleout --configs postgresql:1,postgresql:3 --rounds 2 --events 10000

On a local Kafka (or `--bootstrap`), Postfix's `smtp-sink` and a throwaway PostgreSQL
cluster (devkit/postgres.py; or `--postgres URL` of a server where it may create
databases), the same events are published once per configuration into a topic of its own
(6 partitions), before any drain starts. Each configuration then starts its `notifier run`
processes (production timings, a consumer group and a fresh ledger of its own) and drains
its topic into the sink. Measured, for each:

- mails/s over the steady window: from the moment the group is Stable with every instance
  (joins and their rebalances are over) to the moment 90 % of the mails were accepted
  (after that, instances whose partitions are done idle while the others finish); and
  over the whole drain (first to last mail), joins and tail included;
- CPU ms per mail in the same window, summed over every instance's processes (the service
  and its render workers, psutil), and per instance; the PostgreSQL server's CPU per mail
  (postmaster and backends); how busy the whole machine was.

Every drain must deliver every mail once: the sink's count and the sum of the instances'
`sent` counters both equal the expected mails. Writes benchmarks/out/scaleout.{json,md}.
`--rounds N` repeats the configurations N times, interleaved, and keeps the best round of
each (the machine may be shared).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks.events import Workload, build_workload, notifications
from benchmarks.run import parse_env
from benchmarks.sampler import ResourceSampler, Sample, metric_sum
from benchmarks.sinks import SmtpSink
from devkit.config import service_env
from devkit.events import CLOUDEVENT_HEADERS, encode, stamped, ticket_key
from devkit.kafka import KafkaNode
from devkit.postgres import PostgresCluster, create_database
from devkit.process import ServiceProcess, free_port
from devkit.topics import Record, create_topics, group_members, produce

OUT = Path(__file__).resolve().parent / "out"
PARTITIONS = 6
STEADY_END = 0.9  # the steady window ends when this share of the mails was accepted
MODES = {"smoke": 300, "quick": 6_000, "full": 20_000}
DEFAULT_CONFIGS = "postgresql:1,postgresql:2,postgresql:3,sqlite:1"


@dataclass(frozen=True, slots=True)
class Config:
    """A ledger backend and a number of instances."""

    backend: str  # "postgresql" or "sqlite"
    instances: int

    @property
    def name(self) -> str:
        return f"{self.backend} ×{self.instances}"

    @property
    def tag(self) -> str:
        return f"{self.backend[:2]}{self.instances}"


def parse_configs(text: str) -> list[Config]:
    configs = []
    for item in text.split(","):
        backend, _, count = item.strip().partition(":")
        if backend not in ("postgresql", "sqlite") or not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(f"expected postgresql:N or sqlite:N, got {item!r}")
        configs.append(Config(backend, int(count)))
    return configs


class MachineSampler:
    """The whole machine's busy CPU seconds (all cores, every process), every 0.1 s."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []  # (t, busy s, total s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="machine-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def _run(self) -> None:
        while not self._stop.is_set():
            times = psutil.cpu_times()
            total = sum(times)
            idle = times.idle + getattr(times, "iowait", 0.0)
            self.samples.append((time.monotonic(), total - idle, total))
            self._stop.wait(0.1)

    def busy_pct(self, t0: float, t1: float) -> float | None:
        """Percent of all cores busy between t0 and t1 (nearest samples)."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return None
        (_, b0, a0), (_, b1, a1) = inside[0], inside[-1]
        return 100 * (b1 - b0) / (a1 - a0) if a1 > a0 else None


class MainSampler(ResourceSampler):
    """CPU of the service's own process alone, without its render workers."""

    def _tree(self) -> list[psutil.Process]:
        assert self._ps is not None
        return [self._ps]


def count_at(samples: list[Sample], t: float) -> float:
    """Mails accepted by time t (the sink's count, interpolated between samples)."""
    before = [s for s in samples if s.t <= t]
    after = [s for s in samples if s.t >= t]
    if not before:
        return float(after[0].count) if after else 0.0
    if not after:
        return float(before[-1].count)
    a, b = before[-1], after[0]
    if b.t == a.t:
        return float(a.count)
    return a.count + (b.count - a.count) * (t - a.t) / (b.t - a.t)


def time_of(samples: list[Sample], count: float) -> float | None:
    """When the sink's count first reached `count`, interpolated."""
    for a, b in itertools.pairwise(samples):
        if b.count >= count > a.count:
            return a.t + (b.t - a.t) * (count - a.count) / (b.count - a.count)
    return None


@dataclass
class Bench:
    args: argparse.Namespace
    bootstrap: str
    work: Path
    workload: Workload
    expected: int
    sink: SmtpSink
    postgres: str | None  # server URL to create ledger databases on
    postgres_pid: int | None  # the server's postmaster, when we started it (its CPU)
    machine: MachineSampler
    topics: dict[str, str] = field(default_factory=dict)  # config tag + round → topic


async def drain(bench: Bench, config: Config, topic: str, tag: str) -> dict[str, Any]:
    """Start the instances of `config`, let them drain `topic` into the sink, measure."""
    if config.backend == "postgresql":
        assert bench.postgres is not None
        ledger = create_database(bench.postgres, f"bench_{tag}_{uuid.uuid4().hex[:6]}")
    else:
        ledger = f"sqlite:///{bench.work / f'ledger-{tag}.sqlite3'}"
    group = f"{topic}-{tag}"
    env = service_env(
        bench.work,
        bootstrap=bench.bootstrap,
        topic=topic,
        smtp_port=bench.sink.port,
        timings={},
        group_id=group,
        directory_file=bench.workload.directory_file,
        attachments_dir=bench.workload.attachments_dir,
        ledger_url=ledger,
        # The workload mails few addresses many times: no hourly limit, explicitly.
        recipient_limit_per_hour=0,
    )
    env.update(bench.args.env)
    base = bench.sink.count
    procs = [
        ServiceProcess(env, free_port(), log_path=bench.work / f"{tag}-{i}.log")
        for i in range(config.instances)
    ]
    samplers: list[ResourceSampler] = []
    mains: list[ResourceSampler] = []
    database: ResourceSampler | None = None
    texts: list[str] = []
    started = time.monotonic()
    try:
        if config.backend == "postgresql" and bench.postgres_pid is not None:
            database = ResourceSampler(bench.postgres_pid)
            database.start()
        for p in procs:
            p.spawn()
            assert p.pid is not None
            samplers.append(ResourceSampler(p.pid, progress=lambda: bench.sink.count - base))
            samplers[-1].start()
            mains.append(MainSampler(p.pid, interval=0.2))
            mains[-1].start()
        await asyncio.gather(*(asyncio.to_thread(p.wait_healthy, 120) for p in procs))
        stable = await stable_group(bench.bootstrap, group, config.instances, within=120)
        timeout = 120 + bench.expected / 50
        # Polled every 50 ms, not 2: the samples time the drain; the harness stays quiet.
        count, last = await asyncio.to_thread(
            bench.sink.wait_for, base + bench.expected, timeout, 0.05
        )
        await asyncio.sleep(0.5)  # the ledger and counters settle before the scrape
        texts = [await asyncio.to_thread(p.metrics_text) for p in procs]
    finally:
        for sampler in [*samplers, *mains]:
            sampler.stop()
        if database is not None:
            database.stop()
        codes = await asyncio.gather(*(asyncio.to_thread(p.stop, 60) for p in procs))
    done = count - base
    if done < bench.expected:
        raise RuntimeError(
            f"{config.name}: {done} of {bench.expected} mails:\n{procs[0].log_tail()}"
        )
    progress = samplers[0].samples
    first = time_of(progress, 0.5) or started
    t0, t1 = max(stable, first), time_of(progress, STEADY_END * bench.expected) or last
    steady = t1 > t0 + 1.0
    if not steady:  # the group settled late: only the whole drain can be told
        t0, t1 = first, last
    mails = count_at(progress, t1) - count_at(progress, t0)
    seconds = t1 - t0
    cpu = [s.cpu_at(t1) - s.cpu_at(t0) for s in samplers]
    main_cpu = [s.cpu_at(t1) - s.cpu_at(t0) for s in mains]
    db_cpu = database.cpu_at(t1) - database.cpu_at(t0) if database is not None else None
    sent = sum(metric_sum(text, "notifier_notifications_total", outcome="sent") for text in texts)
    return {
        "config": config.name,
        "backend": config.backend,
        "instances": config.instances,
        "mails": bench.expected,
        "sent_metric": sent,
        "exit_codes": list(codes),
        "steady_window": steady,
        "window_mails": round(mails),
        "window_seconds": round(seconds, 2),
        "rate": mails / seconds if seconds > 0 else None,
        "drain_seconds": round(last - first, 2),
        "drain_rate": (bench.expected - 1) / (last - first) if last > first else None,
        "startup_to_stable_seconds": round(stable - started, 2),
        "cpu_ms_per_mail": 1000 * sum(cpu) / mails if mails else None,
        "cpu_ms_per_mail_by_instance": [round(1000 * c / mails, 3) for c in cpu] if mails else [],
        "cores_used_by_instances": sum(cpu) / seconds if seconds > 0 else None,
        "cores_used_by_main_processes": [round(c / seconds, 2) for c in main_cpu]
        if seconds > 0
        else [],
        "postgres_cpu_ms_per_mail": 1000 * db_cpu / mails if db_cpu is not None and mails else None,
        "machine_busy_pct": bench.machine.busy_pct(t0, t1),
        "peak_rss_mb_by_instance": [round(s.peak_rss() / 2**20, 1) for s in samplers],
    }


async def stable_group(bootstrap: str, group: str, members: int, within: float) -> float:
    """When the group was first seen Stable with `members` members (time.monotonic())."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            state, ids = await group_members(bootstrap, group)
            if state == "Stable" and len(ids) == members:
                return time.monotonic()
        await asyncio.sleep(0.1)
    raise RuntimeError(f"group {group} never Stable with {members} members in {within} s")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="notifier-scaleout-"))
    node: KafkaNode | None = None
    cluster: PostgresCluster | None = None
    sink: SmtpSink | None = None
    machine = MachineSampler()
    machine.start()
    run_id = f"s{uuid.uuid4().hex[:6]}"
    try:
        bootstrap = args.bootstrap
        if not bootstrap:
            node = KafkaNode(work / "kafka")
            node.start()
            bootstrap = node.bootstrap
        postgres, postgres_pid = args.postgres, None
        if any(c.backend == "postgresql" for c in args.configs) and not postgres:
            cluster = PostgresCluster()
            cluster.start()
            postgres, postgres_pid = cluster.url(), cluster.pid()
        step(f"workload: {args.events} events")
        workload = build_workload(work, args.events, run=run_id)
        expected = len(notifications(workload, workload.events))
        sink = SmtpSink(free_port(), work / "smtp-sink.counters")
        sink.start()
        bench = Bench(
            args, bootstrap, work, workload, expected, sink, postgres, postgres_pid, machine
        )
        plan = [(r, c) for r in range(args.rounds) for c in args.configs]
        for r, config in plan:
            topic = f"scaleout-{run_id}-{config.tag}-r{r}"
            bench.topics[f"{config.tag}-r{r}"] = topic
            await create_topics(bootstrap, [topic, f"{topic}.dlq"], PARTITIONS)
        # Every backlog is in place before the first drain: no publishing competes with one.
        step(f"publishing {len(plan)} backlogs of {args.events} events ({expected} mails)")
        records = [
            Record(ticket_key(e), encode(stamped(e)), CLOUDEVENT_HEADERS) for e in workload.events
        ]
        for topic in bench.topics.values():
            await produce(bootstrap, topic, records, linger_ms=20)
        runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in args.configs}
        for r, config in plan:
            step(f"{config.name} draining (round {r + 1}/{args.rounds})")
            topic = bench.topics[f"{config.tag}-r{r}"]
            result = await drain(bench, config, topic, f"{config.tag}r{r}")
            step(
                f"  {result['rate']:.0f} mails/s, {result['cpu_ms_per_mail']:.3f} CPU ms/mail,"
                f" machine {result['machine_busy_pct'] or 0:.0f}% busy"
            )
            runs[config.name].append(result)
        best = {
            name: {
                **max(rounds, key=lambda x: x["rate"] or 0),
                "round_rates": [x["rate"] for x in rounds],
            }
            for name, rounds in runs.items()
        }
        return {
            "mode": args.mode,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "events": args.events,
            "mails_per_drain": expected,
            "partitions": PARTITIONS,
            "rounds": args.rounds,
            "service_env_overrides": args.env,
            "results": best,
            "environment": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
                "loadavg_after": os.getloadavg(),
            },
        }
    finally:
        machine.stop()
        if sink is not None:
            sink.stop()
        if cluster is not None:
            cluster.remove()
        if node is not None:
            node.stop()
        if args.keep:
            print(f"work dir kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: dict[str, Any]) -> str:
    """The results as a Markdown table, and what they say."""
    rows = [
        "| ledger × instances | mails/s (steady) | mails/s (whole drain) | CPU ms/mail"
        " (all instances) | CPU ms/mail per instance | PostgreSQL CPU ms/mail"
        " | cores used by instances (main processes) | machine busy |",
        "| --- | ---: | ---: | ---: | --- | ---: | --- | ---: |",
    ]
    by_name = results["results"]
    for name, r in by_name.items():
        steady = "" if r["steady_window"] else " (whole)"
        rows.append(
            f"| {name} | {_num(r['rate'])}{steady} | {_num(r['drain_rate'])}"
            f" | {_num(r['cpu_ms_per_mail'], 3)}"
            f" | {', '.join(f'{c:.3f}' for c in r['cpu_ms_per_mail_by_instance'])}"
            f" | {_num(r['postgres_cpu_ms_per_mail'], 3)}"
            f" | {_num(r['cores_used_by_instances'], 2)}"
            f" ({', '.join(f'{c:.2f}' for c in r['cores_used_by_main_processes'])})"
            f" | {_num(r['machine_busy_pct'])}% |"
        )
    one = by_name.get("postgresql ×1")
    lines = [
        f"# Scale-out benchmark ({results['mode']}): {results['events']} events →"
        f" {results['mails_per_drain']} mails per drain, {results['partitions']} partitions,"
        f" {results['environment']['cpus']} CPUs, {results['started']}",
        "",
        *rows,
        "",
    ]
    if one and one["rate"]:
        ratios = [
            f"{name}: {r['rate'] / one['rate']:.2f}×"
            for name, r in by_name.items()
            if r["rate"] and name != "postgresql ×1"
        ]
        lines.append("Throughput against postgresql ×1: " + ", ".join(ratios) + ".")
    lines.append(
        "Steady window: from the group Stable with every instance to 90 % of the mails;"
        " CPU summed over each instance's processes (service and render workers); in"
        " brackets, each instance's main process alone (1.00 is one core: its limit)."
    )
    return "\n".join(lines) + "\n"


def step(text: str) -> None:
    print(f"[scaleout {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks.scaleout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", dest="mode", action="store_const", const="smoke")
    size.add_argument("--full", dest="mode", action="store_const", const="full")
    parser.set_defaults(mode="quick")
    parser.add_argument("--events", type=int, help="backlog size (overrides the mode's)")
    parser.add_argument(
        "--configs",
        type=parse_configs,
        default=parse_configs(DEFAULT_CONFIGS),
        help=f"comma-separated BACKEND:INSTANCES (default {DEFAULT_CONFIGS})",
    )
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; best counts")
    parser.add_argument("--bootstrap", help="use this Kafka broker instead of starting one")
    parser.add_argument("--postgres", help="server URL to create ledger databases on")
    parser.add_argument(
        "--env",
        type=parse_env,
        action="append",
        default=[],
        metavar="NOTIFY_X=Y",
        help="service setting for every instance (repeatable)",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--keep", action="store_true", help="keep the temporary work dir")
    args = parser.parse_args(argv)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    args.env = dict(args.env)
    args.events = args.events or MODES[args.mode]
    args.out.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run(args))
    (args.out / "scaleout.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    text = table(results)
    (args.out / "scaleout.md").write_text(text)
    print(text)
    print(f"written: {args.out / 'scaleout.json'}, {args.out / 'scaleout.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
