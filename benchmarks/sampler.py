"""CPU and RSS of the service while it works, sampled with psutil; /metrics text parsing.

The service runs as a child process (devkit.process.ServiceProcess): the honest way to
measure it alone, its CPU time and RSS not mixed with the harness, the broker client that
pre-loads the backlog, or the sinks. They are summed over the service and its children:
the render workers are the service too.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Literal

import psutil


@dataclass(slots=True)
class Sample:
    t: float  # time.monotonic()
    cpu: float  # user + system seconds of the service process
    rss: int  # bytes
    count: int  # mails accepted by the sink so far (from `progress`)
    main: float = 0.0  # user + system seconds of the service process alone (its event loop)
    busy: float = 0.0  # CPU seconds the whole machine spent not idle (all processes, all CPUs)


@dataclass
class ResourceSampler:
    """Samples (CPU, RSS) of process `pid` and its children every `interval` s until stop()."""

    pid: int
    progress: Callable[[], int] | None = None  # e.g. the sink's counter, recorded per sample
    interval: float = 0.1
    samples: list[Sample] = field(default_factory=list)
    _ps: psutil.Process | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._ps = psutil.Process(self.pid)
        self._thread = threading.Thread(target=self._sample, name="service-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    def _tree(self) -> list[psutil.Process]:
        """The service and its worker processes (NOTIFY_RENDER_WORKERS): all count."""
        assert self._ps is not None
        try:
            return [self._ps, *self._ps.children(recursive=True)]
        except psutil.Error:
            return [self._ps]

    def _sample(self) -> None:
        assert self._ps is not None
        while not self._stop.is_set():
            cpu = rss = main = 0.0
            for process in self._tree():
                try:
                    with process.oneshot():
                        times = process.cpu_times()
                        cpu += times.user + times.system
                        rss += process.memory_info().rss
                        if process is self._ps:
                            main = times.user + times.system
                except psutil.Error:
                    if process is self._ps:
                        return
            count = self.progress() if self.progress is not None else 0
            machine = psutil.cpu_times()
            busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
            self.samples.append(Sample(time.monotonic(), cpu, int(rss), count, main, busy))
            self._stop.wait(self.interval)

    def cpu_at(self, t: float, of: Literal["cpu", "main", "busy"] = "cpu") -> float:
        """CPU seconds used by time `t`, interpolated between samples: the service's
        processes (`cpu`), its main process alone (`main`) or the whole machine (`busy`)."""
        before = [s for s in self.samples if s.t <= t]
        after = [s for s in self.samples if s.t >= t]
        value = attrgetter(of)

        if not before:
            return float(value(after[0])) if after else 0.0
        if not after:
            return float(value(before[-1]))
        a, b = before[-1], after[0]
        if b.t == a.t:
            return float(value(a))
        return float(value(a) + (value(b) - value(a)) * (t - a.t) / (b.t - a.t))

    def peak_rss(self) -> int:
        """Sum of VmHWM (the kernel's peak RSS) over the live processes, else the sampled max."""
        sampled = max((s.rss for s in self.samples), default=0)
        peaks = 0
        for process in self._tree():
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{process.pid}/status").read_text()
                found = re.search(r"VmHWM:\s+(\d+) kB", status)
                if found:
                    peaks += int(found[1]) * 1024
        return max(sampled, peaks)


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


def histogram(text: str, name: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of a histogram without labels."""
    out = []
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            found = re.search(r'le="([^"]+)"\}\s+(\S+)', line)
            if found:
                out.append((float(found[1]), float(found[2])))
    return sorted(out)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket."""
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return None
