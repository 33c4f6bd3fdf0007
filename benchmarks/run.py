"""The benchmark harness of issue 6: ceiling, naive baseline and the service, in one run.

    python -m benchmarks.run            # quick: ~5k events, 2-3 minutes
    python -m benchmarks.run --full     # 100k-event backlog (memory while draining), ~15 min
    python -m benchmarks.run --smoke    # tiny, proves the harness works (CI)

On a real Kafka broker (started from the cached jars, or `--bootstrap HOST:PORT`) and
Postfix's `smtp-sink`, it measures in one run:

source        the physical line: Postfix's smtp-source (C) pushing messages of the
              workload's mean size into the same smtp-sink over as many sessions;
(a) ceiling   aiosmtplib sending pre-built bytes of the same mails over as many
              connections as the service's SMTP pool (NOTIFY_SMTP_POOL_SIZE);
(b) naive     aiokafka + EmailMessage (policy.default) + one aiosmtplib send at a time,
              on a prefix of the same backlog;
(c) service   `python -m service run` (child process) draining the pre-loaded backlog:
              notifications/s from the sink's own counter, CPU ms per notification and
              RSS from psutil, peak RSS from VmHWM;
(c0) baseline with --baseline CHECKOUT, that checkout's service draining the same backlog
              (a new group) after (c) in every round: CPU per mail of both, same run;
latency       the service at a fixed publish rate (200 events/s) against a stamping
              SMTP server: publish time (= the event's `time`) to acceptance, per mail.

Writes `results.json` and `results.png` to `--out` (default benchmarks/out) and prints
the table. `--env NOTIFY_X=Y` tunes the service (NOTIFY_SMTP_POOL_SIZE also sets the
ceiling's connections); `--profile` adds profiled drains (pyinstrument and/or cProfile,
`--profilers`) and a per-stage CPU budget (benchmarks/breakdown.py). `--rounds N`
interleaves a, b, c N times and keeps the best of each (quick mode: 2), because the
machine may be shared. For sizing proposals only: `--experiments` patches the service
in its own process (benchmarks/serve.py) and `--replicas N` runs N service processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
from aiokafka import AIOKafkaProducer

from benchmarks.ceiling import prebuild, run_ceiling, run_smtp_source
from benchmarks.events import Workload, build_workload, more_events, notifications
from benchmarks.naive import run_naive
from benchmarks.sampler import ResourceSampler, histogram, histogram_quantile, metric_sum
from benchmarks.sinks import SmtpSink, StampingSink
from devkit.config import service_env as shared_service_env
from devkit.events import CLOUDEVENT_HEADERS, encode, stamped, ticket_key
from devkit.kafka import KafkaNode
from devkit.process import ServiceProcess, free_port
from devkit.topics import create_topics

OUT = Path(__file__).resolve().parent / "out"
PHASES = ("source", "ceiling", "naive", "service", "baseline", "latency", "profile")
HEADERS = list(CLOUDEVENT_HEADERS)


@dataclass(frozen=True)
class Mode:
    name: str
    events: int  # backlog drained by the service
    naive_events: int  # prefix of the backlog drained by the naive consumer
    ceiling_max: int  # at most this many mails for the ceiling
    latency_seconds: float
    profile_events: int
    rounds: int  # interleaved rounds of (a), (b), (c)


MODES = {
    "smoke": Mode("smoke", 200, 100, 2_000, 2.0, 200, 1),
    "quick": Mode("quick", 5_000, 1_500, 20_000, 15.0, 5_000, 2),
    "full": Mode("full", 100_000, 8_000, 40_000, 60.0, 20_000, 1),
}


# --- Kafka helpers -------------------------------------------------------------------------


def producer(bootstrap: str, linger_ms: int) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=True,
        linger_ms=linger_ms,
        max_batch_size=512 * 1024,
    )


async def publish_backlog(bootstrap: str, topic: str, events: list[dict[str, Any]]) -> float:
    """Publish every event (keyed by ticket) as fast as the broker takes them; seconds taken."""
    started = time.perf_counter()
    p = producer(bootstrap, linger_ms=20)
    await p.start()
    try:
        for start in range(0, len(events), 5_000):
            futures = [
                await p.send(topic, value=encode(stamped(e)), key=ticket_key(e), headers=HEADERS)
                for e in events[start : start + 5_000]
            ]
            await asyncio.gather(*futures)
    finally:
        await p.stop()
    return time.perf_counter() - started


async def publish_paced(
    bootstrap: str, topic: str, events: list[dict[str, Any]], rate: float
) -> dict[str, float]:
    """Publish at `rate` events/s; `time` is stamped at send. Activity id → publish time."""
    sent: dict[str, float] = {}
    p = producer(bootstrap, linger_ms=0)
    await p.start()
    try:
        futures = []
        t0 = time.monotonic()
        for i, event in enumerate(events):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            at = time.time()
            sent[event["data"]["activity"]["id"]] = at
            futures.append(
                await p.send(
                    topic, value=encode(stamped(event, at)), key=ticket_key(event), headers=HEADERS
                )
            )
        await asyncio.gather(*futures)
    finally:
        await p.stop()
    return sent


# --- phases --------------------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    mode: Mode
    bootstrap: str
    work: Path
    out: Path
    workload: Workload
    expected: int  # notifications the backlog yields
    sink: SmtpSink
    run_id: str
    pool_size: int


def service_env(ctx: Context, topic: str, smtp_port: int, tag: str) -> dict[str, str]:
    """The shared service settings with the production timings and this workload's files."""
    env = shared_service_env(
        ctx.work,
        bootstrap=ctx.bootstrap,
        topic=topic,
        smtp_port=smtp_port,
        timings={},
        group_id=f"{topic}-{tag}",
        directory_file=ctx.workload.directory_file,
        attachments_dir=ctx.workload.attachments_dir,
        ledger_url=f"sqlite:///{ctx.work / f'ledger-{tag}.sqlite3'}",
        smtp_pool_size=ctx.pool_size,
        # The workload mails few addresses many times: no hourly limit, explicitly.
        recipient_limit_per_hour=0,
    )
    env.update(ctx.args.env)
    return env


def service_process(
    ctx: Context,
    env: dict[str, str],
    log: Path,
    *,
    profile_out: Path | None = None,
    profiler: str = "pyinstrument",
) -> ServiceProcess:
    """`python -m service run` (or `benchmarks.serve`), under a profiler if `profile_out`.

    A profiled service is stopped with SIGINT, which ends in KeyboardInterrupt, so that
    the profiler still writes its report; otherwise with SIGTERM, as in production.
    """
    command = [sys.executable]
    if profile_out is not None and profiler == "cprofile":
        command += ["-m", "cProfile", "-o", str(profile_out)]
    elif profile_out is not None:
        command += ["-m", "pyinstrument", "-r", "pyisession", "-o", str(profile_out)]
    command += ["-m", "benchmarks.serve"] if ctx.args.launcher else ["-m", "service", "run"]
    stop = signal.SIGINT if profile_out is not None else signal.SIGTERM
    return ServiceProcess(env, free_port(), log_path=log, command=command, stop_signal=stop)


async def phase_ceiling(ctx: Context, notes: list[Any]) -> dict[str, Any]:
    messages = prebuild(notes, ctx.workload.attachments_dir, limit=2_000)
    total = min(ctx.expected, ctx.mode.ceiling_max)
    base = ctx.sink.count
    result = await run_ceiling(ctx.sink.port, messages, total, ctx.pool_size)
    accepted, _ = ctx.sink.wait_for(base + total, 10)
    return {
        "messages": result.messages,
        "accepted_by_sink": accepted - base,
        "connections": result.connections,
        "seconds": result.seconds,
        "rate": result.rate,
        "cpu_ms_per_notification": 1000 * result.cpu_seconds / total,
        "mean_message_bytes": statistics.fmean(len(m) for _, m in messages),
    }


def phase_source(ctx: Context, message_bytes: int) -> dict[str, Any]:
    """The physical line: Postfix's smtp-source (C) into the same smtp-sink, same pool size."""
    total = min(ctx.expected, ctx.mode.ceiling_max)
    base = ctx.sink.count
    result = run_smtp_source(ctx.sink.port, total, ctx.pool_size, message_bytes)
    accepted, _ = ctx.sink.wait_for(base + total, 10)
    return {
        "messages": result.messages,
        "accepted_by_sink": accepted - base,
        "sessions": result.sessions,
        "message_bytes": result.message_bytes,
        "seconds": result.seconds,
        "rate": result.rate,
    }


async def measured(phase: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """The phase's result plus how busy the whole machine was meanwhile (all processes)."""
    before = psutil.cpu_times()
    result = await phase
    after = psutil.cpu_times()
    total = sum(after) - sum(before)
    idle = (after.idle + after.iowait) - (before.idle + before.iowait)
    result["machine"] = {
        "busy_pct": round(100 * (1 - idle / total), 1) if total > 0 else None,
        "loadavg_1m": os.getloadavg()[0],
    }
    return result


async def phase_naive(ctx: Context, topic: str, tag: str) -> dict[str, Any]:
    base = ctx.sink.count
    result = await run_naive(
        bootstrap=ctx.bootstrap,
        topic=topic,
        group=f"{topic}-{tag}",
        smtp_port=ctx.sink.port,
        directory_file=ctx.workload.directory_file,
        attachments_dir=ctx.workload.attachments_dir,
        max_events=ctx.mode.naive_events,
        limit_seconds=600,
    )
    accepted, _ = ctx.sink.wait_for(base + result.messages, 10)
    return {
        "events": result.events,
        "messages": result.messages,
        "accepted_by_sink": accepted - base,
        "seconds": result.seconds,
        "rate": result.rate,
        "cpu_ms_per_notification": 1000 * result.cpu_seconds / max(1, result.messages),
    }


def phase_service(
    ctx: Context, topic: str, tag: str, checkout: Path | None = None
) -> dict[str, Any]:
    """(c), or with `checkout` the same drain by another checkout's `python -m service run`
    (its own .venv): the old commit that CPU per mail is compared with (--baseline)."""
    base = ctx.sink.count
    replicas = 1 if checkout is not None else ctx.args.replicas
    env = service_env(ctx, topic, ctx.sink.port, tag)
    if replicas > 1:
        # Same group and ledger file; the SMTP connections are shared out between them.
        env["NOTIFY_SMTP_POOL_SIZE"] = str(max(1, ctx.pool_size // replicas))
    if checkout is not None:
        env["PYTHONPATH"] = str(checkout)
        procs = [
            ServiceProcess(
                env,
                free_port(),
                log_path=ctx.work / f"{tag}.log",
                cwd=checkout,
                command=[str(checkout / ".venv" / "bin" / "python"), "-m", "service", "run"],
            )
        ]
    else:
        procs = [service_process(ctx, env, ctx.work / f"{tag}-{i}.log") for i in range(replicas)]
    samplers: list[ResourceSampler] = []
    proc = procs[0]
    started = time.monotonic()
    texts = []
    try:
        for p in procs:
            p.spawn()
            assert p.pid is not None
            samplers.append(ResourceSampler(p.pid, progress=lambda: ctx.sink.count - base))
            samplers[-1].start()
            p.wait_healthy(60)
        first = ctx.sink.wait_first(base, 120)
        if first is None:
            raise RuntimeError(f"service sent nothing:\n{proc.log_tail()}")
        timeout = 120 + ctx.expected / 100
        if checkout is None:
            count, last = ctx.sink.wait_for(base + ctx.expected, timeout)
        else:
            # The old commit may route this workload to a few more or fewer mails: wait
            # for its expected count or for 5 s without a new mail, and count what came.
            count, last = wait_quiet(ctx.sink, base + ctx.expected, timeout, quiet=5.0)
        time.sleep(0.3)  # let the ledger and counters settle before the scrape
        peaks = [sampler.peak_rss() for sampler in samplers]
        texts = [p.metrics_text() for p in procs]
    finally:
        for sampler in samplers:
            sampler.stop()
        codes = [p.stop(60) for p in procs]
    code = next((c for c in codes if c), codes[0])
    text = "\n".join(texts)
    peak = max(peaks)
    done = count - base
    if done < ctx.expected and checkout is None:
        raise RuntimeError(f"service delivered {done} of {ctx.expected}:\n{proc.log_tail()}")
    if done < 0.5 * ctx.expected:
        raise RuntimeError(f"baseline delivered {done} of {ctx.expected}:\n{proc.log_tail()}")
    seconds = last - first
    cpu = sum(sampler.cpu_at(last) - sampler.cpu_at(first) for sampler in samplers)
    main = sum(sampler.cpu_at(last, "main") - sampler.cpu_at(first, "main") for sampler in samplers)
    samples = samplers[0].samples
    drain = [s for s in samples if first <= s.t <= last]
    rss = [s.rss for s in drain] or [samples[-1].rss]
    # Memory flatness: RSS over the last 80 % of the drain against its first 20 %.
    cut = [s for s in drain if s.count >= 0.2 * ctx.expected]
    return {
        "events": len(ctx.workload.events),
        "notifications": done,
        "checkout": str(checkout) if checkout is not None else None,
        "sent_metric": metric_sum(text, "notifier_notifications_total", outcome="sent"),
        "dead_letters_metric": metric_sum(text, "notifier_dead_letters_total"),
        "startup_to_first_mail_seconds": first - started,
        "seconds": seconds,
        "rate": (done - 1) / seconds if seconds > 0 else None,
        "cpu_seconds": cpu,
        # CPU between the first and the last mail, over the mails in between.
        "cpu_ms_per_notification": 1000 * cpu / done,
        "cpu_utilisation": cpu / seconds if seconds > 0 else None,
        # The event loop's process alone (the render workers excluded): near 1.0 it is
        # what bounds the rate.
        "main_cpu_ms_per_notification": 1000 * main / done,
        "main_utilisation": main / seconds if seconds > 0 else None,
        # Every process's CPU over the drain, in CPUs: the service, the broker, the sink.
        "machine_cpus_busy": (
            (samplers[0].cpu_at(last, "busy") - samplers[0].cpu_at(first, "busy")) / seconds
            if seconds > 0
            else None
        ),
        "peak_rss_mb": peak / 2**20,
        "replicas": replicas,
        "peak_rss_mb_all_replicas": sum(peaks) / 2**20,
        "drain_rss_mb": {
            "first": rss[0] / 2**20,
            "max": max(rss) / 2**20,
            "last": rss[-1] / 2**20,
            "growth_after_20pct_mb": ((cut[-1].rss - cut[0].rss) / 2**20) if len(cut) > 1 else 0,
        },
        "exit_code": code,
        "series": [
            {"t": round(s.t - first, 3), "count": s.count, "rss_mb": round(s.rss / 2**20, 2)}
            for s in samples
        ],
    }


async def phase_latency(ctx: Context, topic: str) -> dict[str, Any]:
    rate = ctx.args.rate
    total = int(rate * ctx.mode.latency_seconds)
    warm = more_events(ctx.workload, 20, f"{ctx.run_id}w", seed=8)
    events = more_events(ctx.workload, total, f"{ctx.run_id}l", seed=9)
    warm_expected = len(notifications(ctx.workload, warm))
    expected = len(notifications(ctx.workload, events))
    stamps_path = ctx.work / "stamps.txt"
    sink = StampingSink(free_port(), stamps_path)
    sink.start()
    proc = service_process(
        ctx, service_env(ctx, topic, sink.port, "latency"), ctx.work / "latency.log"
    )
    try:
        proc.start(60)
        await publish_paced(ctx.bootstrap, topic, warm, rate)
        await wait_sent(proc, warm_expected, 60)
        published = await publish_paced(ctx.bootstrap, topic, events, rate)
        await wait_sent(proc, warm_expected + expected, 60 + total / 50)
        text = proc.metrics_text()
    finally:
        proc.stop(60)
        sink.stop()
    start = min(published.values())
    timeline = sorted(
        (published[activity] - start, at - published[activity])
        for at, activity in sink.stamps()
        if activity in published
    )
    latencies = sorted(lat for _, lat in timeline)
    buckets = histogram(text, "notifier_delivery_latency_seconds")
    return {
        "rate_events_per_second": rate,
        "events": total,
        "notifications": expected,
        "stamped": len(latencies),
        "method": "stamping SMTP server (benchmarks/sinks.py): acceptance wall time minus "
        "publish wall time per mail, same host clock",
        "p50_ms": 1000 * quantile(latencies, 0.50),
        "p90_ms": 1000 * quantile(latencies, 0.90),
        "p99_ms": 1000 * quantile(latencies, 0.99),
        "max_ms": 1000 * latencies[-1],
        "histogram_p50_ms": 1000 * (histogram_quantile(0.5, buckets) or 0),
        "histogram_p99_ms": 1000 * (histogram_quantile(0.99, buckets) or 0),
        "histogram_note": "notifier_delivery_latency_seconds (includes the 20 warm-up events; "
        "coarse buckets 10/25/50/100/250 ms, linear interpolation)",
        "timeline": [
            {"published_s": round(p, 3), "latency_ms": round(1000 * lat, 2)}
            for p, lat in timeline[:: max(1, len(timeline) // 1000)]
        ],
        "cdf_ms": [
            round(1000 * latencies[int(i * (len(latencies) - 1) / 200)], 2) for i in range(201)
        ],
    }


def wait_quiet(sink: SmtpSink, target: int, timeout: float, quiet: float) -> tuple[int, float]:
    """Until `target` mails or `quiet` s without one; (count, when the last was seen)."""
    deadline = time.monotonic() + timeout
    count, last = sink.wait_for(target, 0)
    while count < target and time.monotonic() < deadline:
        count, last = sink.wait_for(target, min(quiet, deadline - time.monotonic()))
        if count < target and time.monotonic() - last >= quiet:
            break
    return count, last


async def wait_sent(proc: ServiceProcess, target: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sent = metric_sum(
            await asyncio.to_thread(proc.metrics_text),
            "notifier_notifications_total",
            outcome="sent",
        )
        if sent >= target:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"service sent fewer than {target} mails in {seconds} s:\n{proc.log_tail()}")


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile of sorted values."""
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q * len(values) + 0.5) - 1))]


def phase_profile(ctx: Context, topic: str) -> dict[str, Any]:
    """Drain the backlog again (new group, new ledger) under each profiler; write reports."""
    from benchmarks.breakdown import breakdown

    files: list[str] = []
    events = min(len(ctx.workload.events), ctx.mode.profile_events)
    target = len(notifications(ctx.workload, ctx.workload.events[:events]))
    for profiler in ctx.args.profilers:
        path = ctx.work / f"profile-{profiler}.out"
        base = ctx.sink.count
        proc = service_process(
            ctx,
            service_env(ctx, topic, ctx.sink.port, f"profile-{profiler}"),
            ctx.work / f"profile-{profiler}.log",
            profile_out=path,
            profiler=profiler,
        )
        proc.start(timeout=90)
        try:
            ctx.sink.wait_for(base + target, 120 + target / 20)
        finally:
            proc.stop(60)
        files += render_profile(profiler, path, ctx.out)
    budget = breakdown(min(events, 3000))
    (ctx.out / "breakdown.json").write_text(json.dumps(budget, indent=2) + "\n")
    return {
        "events_until": events,
        "notifications": target,
        "files": [*files, "breakdown.json"],
        "cpu_budget": budget,
    }


def render_profile(profiler: str, path: Path, out: Path) -> list[str]:
    if profiler == "cprofile":
        import io
        import pstats

        text = io.StringIO()
        stats = pstats.Stats(str(path), stream=text)
        stats.strip_dirs()
        text.write("=== by own time (tottime) ===\n")
        stats.sort_stats("tottime").print_stats(45)
        text.write("\n=== by cumulative time ===\n")
        stats.sort_stats("cumulative").print_stats(60)
        (out / "profile-cprofile.txt").write_text(text.getvalue())
        shutil.copyfile(path, out / "profile-cprofile.pstats")
        return ["profile-cprofile.txt", "profile-cprofile.pstats"]
    from pyinstrument.renderers import ConsoleRenderer, HTMLRenderer
    from pyinstrument.session import Session

    session = Session.load(str(path))
    tree = ConsoleRenderer(unicode=True, color=False, show_all=False, short_mode=False)
    flat = ConsoleRenderer(unicode=True, color=False, flat=True, show_all=True)
    (out / "profile.txt").write_text(tree.render(session))
    (out / "profile-flat.txt").write_text(flat.render(session))
    (out / "profile.html").write_text(HTMLRenderer().render(session))
    shutil.copyfile(path, out / "profile.pyisession")
    return ["profile.txt", "profile-flat.txt", "profile.html", "profile.pyisession"]


# --- reporting -----------------------------------------------------------------------------


# Issue 16's targets, all from one run.
TARGETS = {"c_over_a": 0.9, "c_over_b": 6.0, "cpu_cut": 0.30, "p50_ms": 30.0, "p99_ms": 100.0}


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {"targets": TARGETS}
    rate = {
        k: results[k]["rate"]
        for k in ("source", "ceiling", "naive", "service", "baseline")
        if k in results
    }
    if "service" in rate and "ceiling" in rate:
        summary["c_over_a"] = rate["service"] / rate["ceiling"]
        summary["meets_c_over_a"] = summary["c_over_a"] >= TARGETS["c_over_a"]
    if "service" in rate and "naive" in rate:
        summary["c_over_b"] = rate["service"] / rate["naive"]
        summary["meets_c_over_b"] = summary["c_over_b"] >= TARGETS["c_over_b"]
    if "service" in rate and "source" in rate:
        summary["c_over_source"] = rate["service"] / rate["source"]
    if "ceiling" in rate and "source" in rate:
        summary["a_over_source"] = rate["ceiling"] / rate["source"]
    if "service" in results and "baseline" in results:
        old = results["baseline"]["cpu_ms_per_notification"]
        new = results["service"]["cpu_ms_per_notification"]
        summary["cpu_cut"] = 1 - new / old
        summary["meets_cpu_cut"] = summary["cpu_cut"] >= TARGETS["cpu_cut"]
    if "latency" in results:
        summary["meets_p50"] = results["latency"]["p50_ms"] <= TARGETS["p50_ms"]
        summary["meets_p99"] = results["latency"]["p99_ms"] <= TARGETS["p99_ms"]
    return summary


def _yes(flag: object) -> str:
    return "yes" if flag else "NO"


def table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, ...]] = [
        ("", "notif/s", "CPU ms/notif", "peak RSS MB", "mails", "machine busy")
    ]
    for name, label in (
        ("source", "smtp-source (C)"),
        ("ceiling", "(a) ceiling"),
        ("naive", "(b) naive"),
        ("service", "(c) service"),
        ("baseline", "(c0) old commit"),
    ):
        if name in results:
            r = results[name]
            peak = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
            busy = r.get("machine", {}).get("busy_pct")
            cpu = r.get("cpu_ms_per_notification")
            rows.append(
                (
                    label,
                    f"{r['rate']:.0f}",
                    f"{cpu:.3f}" if cpu is not None else "-",
                    peak,
                    str(r.get("notifications", r.get("messages"))),
                    f"{busy:.0f}%" if busy is not None else "-",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    s = results["summary"]
    lines.append("")
    config = results["config"]
    if config.get("experiments") or config.get("replicas", 1) > 1:
        lines.append(
            f"NOT the plain service: experiments {config.get('experiments')}, "
            f"replicas {config.get('replicas', 1)}"
        )
    ratios = []
    t = s["targets"]
    if "c_over_a" in s:
        ratios.append(
            f"c/a = {s['c_over_a']:.2f} (target ≥ {t['c_over_a']}: {_yes(s['meets_c_over_a'])})"
        )
    if "c_over_b" in s:
        ratios.append(
            f"c/b = {s['c_over_b']:.1f} (target ≥ {t['c_over_b']:.0f}: {_yes(s['meets_c_over_b'])})"
        )
    if ratios:
        lines.append("   ".join(ratios))
    if "c_over_source" in s:
        lines.append(
            f"physical line: the service reaches {100 * s['c_over_source']:.0f} % of what "
            f"smtp-source (C) pushes into the same smtp-sink ({results['source']['rate']:.0f} "
            f"msg/s of {results['source']['message_bytes']} B over "
            f"{results['source']['sessions']} sessions)"
            + (f"; (a) reaches {100 * s['a_over_source']:.0f} %" if "a_over_source" in s else "")
        )
    if "cpu_cut" in s:
        lines.append(
            f"CPU per mail {results['service']['cpu_ms_per_notification']:.3f} ms vs "
            f"{results['baseline']['cpu_ms_per_notification']:.3f} ms for the old commit in "
            f"this run: "
            + (
                f"{100 * s['cpu_cut']:.0f} % less"
                if s["cpu_cut"] >= 0
                else f"{-100 * s['cpu_cut']:.0f} % MORE"
            )
            + f" (target ≥ {100 * t['cpu_cut']:.0f} % less: {_yes(s['meets_cpu_cut'])})"
        )
    rounds = [
        f"{name} " + "/".join(f"{x:.0f}" for x in results[name]["round_rates"])
        for name in ("source", "ceiling", "naive", "service", "baseline")
        if len(results.get(name, {}).get("round_rates", [])) > 1
    ]
    if rounds:
        lines.append("notif/s per round (best counts): " + ", ".join(rounds))
    if "service" in results:
        c = results["service"]
        d = c["drain_rss_mb"]
        lines.append(
            f"service drain: {c['events']} events → {c['notifications']} mails in "
            f"{c['seconds']:.1f} s, CPU {100 * (c['cpu_utilisation'] or 0):.0f}% of a core "
            f"({100 * (c.get('main_utilisation') or 0):.0f}% in the event loop's process; "
            f"the machine {c.get('machine_cpus_busy') or 0:.2f} of {os.cpu_count()} CPUs busy); "
            f"RSS first/max/last {d['first']:.0f}/{d['max']:.0f}/{d['last']:.0f} MB, "
            f"growth after the first 20 %: {d['growth_after_20pct_mb']:+.1f} MB"
        )
    if "latency" in results:
        lat = results["latency"]
        lines.append(
            f"latency at {lat['rate_events_per_second']:.0f} events/s ({lat['stamped']} mails): "
            f"p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, max {lat['max_ms']:.1f} ms "
            f"(targets p50 ≤ {t['p50_ms']:.0f}: {_yes(s.get('meets_p50'))}, "
            f"p99 ≤ {t['p99_ms']:.0f}: {_yes(s.get('meets_p99'))}); service histogram estimate "
            f"p50 {lat['histogram_p50_ms']:.0f} ms, p99 {lat['histogram_p99_ms']:.0f} ms"
        )
    if "profile" in results:
        lines.append(f"profile: {', '.join(results['profile']['files'])}")
    return "\n".join(lines)


COLORS = {"ceiling": "#999999", "naive": "#d62728", "service": "#1f77b4"}
LABELS = {"ceiling": "(a) ceiling", "naive": "(b) naive", "service": "(c) service"}


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [k for k in ("ceiling", "naive", "service") if k in results]
    fig, axes = plt.subplots(2, 3, figsize=(18, 9))
    ax = axes[0][0]
    bars = ax.bar(
        [LABELS[k] for k in present],
        [results[k]["rate"] for k in present],
        color=[COLORS[k] for k in present],
    )
    ax.bar_label(bars, fmt="%.0f")
    if "ceiling" in results:
        ax.axhline(
            TARGETS["c_over_a"] * results["ceiling"]["rate"],
            ls="--",
            color="#555555",
            label=f"{100 * TARGETS['c_over_a']:.0f} % of (a)",
        )
    if "naive" in results:
        ax.axhline(
            TARGETS["c_over_b"] * results["naive"]["rate"],
            ls=":",
            color="#d62728",
            label=f"{TARGETS['c_over_b']:.0f} × (b)",
        )
    ax.set_ylabel("notifications / s")
    ax.set_title("Throughput, same run (targets dashed)")
    ax.legend(loc="upper right", fontsize=8)

    ax = axes[0][1]
    bars = ax.bar(
        [LABELS[k] for k in present],
        [results[k]["cpu_ms_per_notification"] for k in present],
        color=[COLORS[k] for k in present],
    )
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylabel("CPU ms / notification")
    ax.set_title("CPU per mail ((a),(b): harness process; (c): service and its workers)")

    ax, mem = axes[0][2], axes[1][2]
    if "service" in results:
        c = results["service"]
        series = c["series"]
        ts = [p["t"] for p in series]
        ax.plot(ts, [p["count"] for p in series], color=COLORS["service"])
        ax.set_xlabel("s since the first mail")
        ax.set_ylabel("mails accepted", color=COLORS["service"])
        twin = ax.twinx()
        twin.plot(ts, [p["rss_mb"] for p in series], color="#2ca02c")
        twin.set_ylabel("service RSS MB", color="#2ca02c")
        twin.set_ylim(bottom=0)
        ax.set_title(f"Service draining {c['events']} events ({c['notifications']} mails)")
        drained = [p for p in series if p["count"] > 0]
        mem.plot([p["count"] for p in drained], [p["rss_mb"] for p in drained], color="#2ca02c")
        mem.set_ylim(bottom=0)
        mem.set_xlabel("mails accepted")
        mem.set_ylabel("service RSS MB")
        mem.set_title(f"Memory while draining (peak {c['peak_rss_mb']:.0f} MB)")
    else:
        ax.set_axis_off()
        mem.set_axis_off()

    cdf_ax, time_ax = axes[1][0], axes[1][1]
    if "latency" in results:
        lat = results["latency"]
        cdf = lat["cdf_ms"]
        cdf_ax.plot(cdf, [i / (len(cdf) - 1) for i in range(len(cdf))], color=COLORS["service"])
        cdf_ax.axvline(
            TARGETS["p99_ms"],
            ls="--",
            color="#d62728",
            label=f"target p99 {TARGETS['p99_ms']:.0f} ms",
        )
        cdf_ax.axhline(0.99, ls=":", color="#555555")
        cdf_ax.set_xlim(0, max(200.0, 1.1 * lat["p99_ms"]))
        cdf_ax.set_xlabel("publish → SMTP acceptance, ms")
        cdf_ax.set_ylabel("fraction of mails")
        cdf_ax.set_title(
            f"Latency at {lat['rate_events_per_second']:.0f} events/s: "
            f"p50 {lat['p50_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms"
        )
        cdf_ax.legend(loc="lower right", fontsize=8)
        points = lat["timeline"]
        time_ax.scatter(
            [p["published_s"] for p in points],
            [p["latency_ms"] for p in points],
            s=3,
            color=COLORS["service"],
        )
        time_ax.axhline(TARGETS["p99_ms"], ls="--", color="#d62728")
        time_ax.set_xlabel("published at, s")
        time_ax.set_ylabel("latency, ms")
        time_ax.set_title("Latency over the run")
    else:
        cdf_ax.set_axis_off()
        time_ax.set_axis_off()
    s = results["summary"]
    ratios = "".join(
        f", {name} {s[key]:.2f}"
        for name, key in (("c/a", "c_over_a"), ("c/b", "c_over_b"))
        if key in s
    )
    config = results["config"]
    extra = f", experiments {config['experiments']}" if config.get("experiments") else ""
    if config.get("replicas", 1) > 1:
        extra += f", {config['replicas']} replicas"
    fig.suptitle(
        f"ticket-notifier benchmark ({results['mode']}, {results['environment']['cpus']} CPUs, "
        f"pool {config['pool_size']}{extra}){ratios}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    mode = MODES[args.mode]
    if args.events:
        mode = replace(
            mode,
            events=args.events,
            naive_events=min(mode.naive_events, args.events),
            profile_events=min(mode.profile_events, args.events),
        )
    out: Path = args.out
    work = Path(tempfile.mkdtemp(prefix="notifier-bench-"))
    run_id = f"b{uuid.uuid4().hex[:6]}"
    node: KafkaNode | None = None
    sink: SmtpSink | None = None
    load_before = os.getloadavg()
    try:
        bootstrap = args.bootstrap
        if not bootstrap:
            node = KafkaNode(work / "kafka")
            node.start()
            bootstrap = node.bootstrap
        step(f"workload: {mode.events} events")
        workload = build_workload(work, mode.events, run=run_id)
        notes = notifications(workload, workload.events)
        sink = SmtpSink(free_port(), work / "smtp-sink.counters")
        sink.start()
        pool_size = int(args.env.get("NOTIFY_SMTP_POOL_SIZE", "8"))
        ctx = Context(
            args, mode, bootstrap, work, out, workload, len(notes), sink, run_id, pool_size
        )
        backlog, latency_topic = f"bench-{run_id}", f"bench-{run_id}-latency"
        await create_topics(
            bootstrap,
            [backlog, f"{backlog}.dlq", latency_topic, f"{latency_topic}.dlq"],
            args.partitions,
        )
        step(f"publishing the backlog: {mode.events} events ({len(notes)} notifications)")
        publish_seconds = await publish_backlog(bootstrap, backlog, workload.events)
        results: dict[str, Any] = {
            "mode": mode.name,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": {
                "events": mode.events,
                "notifications": len(notes),
                "partitions": args.partitions,
                "pool_size": pool_size,
                "rounds": args.rounds,
                "replicas": args.replicas,
                "experiments": args.experiments or None,
                "launcher": "python -m benchmarks.serve"
                if args.launcher
                else "python -m service run",
                "service_env_overrides": dict(args.env),
                "publish_seconds": publish_seconds,
            },
        }
        phases = args.phases
        runs: dict[str, list[dict[str, Any]]] = {
            "source": [],
            "ceiling": [],
            "naive": [],
            "service": [],
            "baseline": [],
        }
        if "baseline" in phases and args.baseline is None:
            phases = phases - {"baseline"}
        # Rounds interleave a, b, c so that a burst of load from elsewhere on a shared
        # machine hits one round rather than one contender; the best round of each counts.
        for r in range(args.rounds):
            tag = f" (round {r + 1}/{args.rounds})" if args.rounds > 1 else ""
            if "source" in phases:
                step(f"physical line: smtp-source -> smtp-sink{tag}")
                size = round(
                    statistics.fmean(
                        len(m) for _, m in prebuild(notes, ctx.workload.attachments_dir, limit=500)
                    )
                )
                runs["source"].append(await measured(asyncio.to_thread(phase_source, ctx, size)))
            if "ceiling" in phases:
                step(f"(a) ceiling{tag}")
                runs["ceiling"].append(await measured(phase_ceiling(ctx, notes)))
            if "naive" in phases:
                step(f"(b) naive baseline{tag}")
                runs["naive"].append(await measured(phase_naive(ctx, backlog, f"naive{r}")))
            if "service" in phases:
                step(f"(c) service draining the backlog{tag}")
                runs["service"].append(
                    await measured(asyncio.to_thread(phase_service, ctx, backlog, f"service{r}"))
                )
            if "baseline" in phases:
                step(f"(c0) the old commit ({args.baseline}) draining the backlog{tag}")
                runs["baseline"].append(
                    await measured(
                        asyncio.to_thread(
                            phase_service, ctx, backlog, f"baseline{r}", args.baseline
                        )
                    )
                )
        for name, rounds in runs.items():
            if rounds:
                best = max(rounds, key=lambda x: float(x["rate"]))
                results[name] = {**best, "round_rates": [x["rate"] for x in rounds]}
        if "latency" in phases:
            step(f"latency at {args.rate:.0f} events/s for {mode.latency_seconds:.0f} s")
            results["latency"] = await measured(phase_latency(ctx, latency_topic))
        if "profile" in phases:
            step("profile (pyinstrument) of the service draining the backlog")
            results["profile"] = await asyncio.to_thread(phase_profile, ctx, backlog)
        results["summary"] = summarise(results)
        results["environment"] = {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        }
        return results
    finally:
        if sink is not None:
            sink.stop()
        if node is not None:
            node.stop()
        if args.keep:
            print(f"work dir kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def step(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def parse_env(item: str) -> tuple[str, str]:
    name, eq, value = item.partition("=")
    if not eq or not name.startswith("NOTIFY_"):
        raise argparse.ArgumentTypeError(f"expected NOTIFY_NAME=VALUE, got {item!r}")
    return name, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--full",
        dest="mode",
        action="store_const",
        const="full",
        help="100k-event backlog: memory while draining (~15 min)",
    )
    size.add_argument(
        "--smoke", dest="mode", action="store_const", const="smoke", help="tiny, for CI"
    )
    parser.set_defaults(mode="quick")
    parser.add_argument("--events", type=int, help="backlog size (overrides the mode's)")
    parser.add_argument(
        "--rounds", type=int, help="interleaved rounds of a, b, c; the best of each counts"
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="(c) as N service processes in one group sharing the ledger and the pool size",
    )
    parser.add_argument("--rate", type=float, default=200.0, help="events/s of the latency run")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--bootstrap", help="use this Kafka broker instead of starting one")
    parser.add_argument(
        "--env",
        type=parse_env,
        action="append",
        default=[],
        metavar="NOTIFY_X=Y",
        help="service setting (repeatable); NOTIFY_SMTP_POOL_SIZE also sets the ceiling's"
        " connections",
    )
    parser.add_argument(
        "--phases",
        type=lambda v: set(v.split(",")),
        default=set(PHASES) - {"profile"},
        help=f"comma-separated subset of {','.join(PHASES)} (default: all but profile)",
    )
    parser.add_argument("--profile", action="store_true", help="add the profile phase")
    parser.add_argument(
        "--profilers",
        type=lambda v: v.split(","),
        default=["pyinstrument"],
        help="profile phase: pyinstrument, cprofile or both (comma-separated)",
    )
    parser.add_argument(
        "--launcher",
        action="store_true",
        help="start the service with `python -m benchmarks.serve` (same app, no CLI layer)",
    )
    parser.add_argument(
        "--experiments",
        default="",
        metavar="A,B",
        help="patch the service to size a proposal (implies --launcher; see benchmarks/serve.py):"
        " buffered-logs, no-css-inline, batch-timeout=MS",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="CHECKOUT",
        help="also drain the backlog with this checkout's `python -m service run` (its own"
        " .venv; e.g. the commit before a performance change), interleaved with (c) in each"
        " round: CPU per mail of both in the same run",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--keep", action="store_true", help="keep the temporary work dir")
    args = parser.parse_args(argv)
    # aiokafka logs retriable broker hiccups (a fresh broker creating its offsets topic).
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.experiments:
        args.launcher = True
        os.environ["BENCH_EXPERIMENTS"] = args.experiments
    else:
        os.environ.pop("BENCH_EXPERIMENTS", None)
    args.env = dict(args.env)
    if args.rounds is None:
        args.rounds = MODES[args.mode].rounds
    if args.profile:
        args.phases.add("profile")
    if unknown := args.phases - set(PHASES):
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    results = asyncio.run(run(args))
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    chart(results, args.out / "results.png")
    print(table(results))
    print(f"\nwritten: {args.out / 'results.json'}, {args.out / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
