"""The dashboard and alert rules against a real Prometheus scraping the real service."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from devkit.config import service_env
from devkit.events import example, mixed_examples, publish
from devkit.process import ServiceProcess, free_port, terminate
from devkit.smtp import SmtpRecorder
from devkit.waiting import poll

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
SCRAPE_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "notifier.json"

# Grafana's variables, as Grafana would expand them for this short test: every instance,
# a rate window of many 1 s scrapes, and a dashboard range covering the whole test.
GRAFANA_VARIABLES = {"$instance": ".*", "$__rate_interval": "1m", "$__range": "10m"}

# Dashboard queries that may legitimately return nothing here, each with its reason.
EMPTY_ALLOWED = {
    # FastStream creates this counter's series on the first exception that escapes the
    # Kafka handler. The handler turns every failure into a dead letter or a rewind, so a
    # healthy run has none; the query must still parse and evaluate.
    "faststream_received_processed_messages_exceptions_total",
}

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


@pytest.fixture(scope="module")
def promtool() -> str:
    if PROMTOOL is None:
        pytest.fail("promtool not found: apt-get install prometheus (.ci/run does)")
    return PROMTOOL


def run_promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=60, check=False
    )


# -- Prometheus ----------------------------------------------------------------------------


class PrometheusServer:
    """The `prometheus` binary on 127.0.0.1 with its own config, storage and log."""

    def __init__(self, config: Path, data_dir: Path, port: int) -> None:
        self.config = config
        self.data_dir = data_dir
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = data_dir / "prometheus.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        if PROMETHEUS is None:
            pytest.fail("prometheus not found: apt-get install prometheus (.ci/run does)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.data_dir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"prometheus not ready after {timeout} s")

    def stop(self) -> None:
        terminate(self._proc, 10)
        self._proc = None

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>; returns `data`, raises with Prometheus's error otherwise."""
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        if body.get("status") != "success":
            raise PromQLError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else []
        if data["resultType"] in ("scalar", "string"):
            result = [{"metric": {}, "value": data["result"]}]
        return result

    def query_range(self, expr: str, seconds: int) -> list[dict[str, Any]]:
        now = time.time()
        data = self.api("query_range", query=expr, start=now - seconds, end=now, step="1s")
        result: list[dict[str, Any]] = data["result"]
        return result


class PromQLError(AssertionError):
    """Prometheus refused a query or an API call."""


def scrape_config(service_port: int) -> dict[str, Any]:
    """The shipped scrape config, pointed at the service under test, at 1 s intervals."""
    config: dict[str, Any] = yaml.safe_load(SCRAPE_CONFIG.read_text())
    config["global"] = {
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "evaluation_interval": "1s",
    }
    config["rule_files"] = [str(ALERTS)]  # the shipped rules, unchanged
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "notifier"]
    job.pop("dns_sd_configs", None)  # the compose replicas: no such name here
    job["static_configs"] = [{"targets": [f"127.0.0.1:{service_port}"]}]
    config["scrape_configs"] = [job]
    return config


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[int], PrometheusServer]]:
    started: list[PrometheusServer] = []

    def start(service_port: int) -> PrometheusServer:
        config = tmp_path / "prometheus.yml"
        config.write_text(yaml.safe_dump(scrape_config(service_port)))
        server = PrometheusServer(config, tmp_path / "prometheus", free_port())
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


# -- dashboard queries ---------------------------------------------------------------------


def dashboard_targets() -> list[tuple[str, str, bool]]:
    """(panel title, expression with Grafana's variables expanded, instant?) of every target."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    targets = []
    for panel in walk(json.loads(DASHBOARD.read_text())["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"unexpanded variable in {panel['title']}: {expr}"
            targets.append((panel["title"], expr, bool(target.get("instant"))))
    return targets


def allowed_empty(expr: str) -> bool:
    return any(name in expr for name in EMPTY_ALLOWED)


def alert_exprs() -> dict[str, str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


# -- the service ---------------------------------------------------------------------------


def service_values(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """{sorted labels: value} of one sample name in a /metrics text."""
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match:
            labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match[1] or "")))
            found[labels] = float(match[2])
    return found


@pytest.fixture
async def service(
    kafka_bootstrap: str, topic: str, smtp_server: SmtpRecorder, tmp_path: Path
) -> AsyncIterator[ServiceProcess]:
    env = service_env(
        tmp_path,
        bootstrap=kafka_bootstrap,
        topic=topic,
        smtp_port=smtp_server.port,
        smtp_timeout_seconds=3,
        reply_to=None,
    )
    proc = ServiceProcess(env, free_port(), log_path=tmp_path / "service.log")
    await asyncio.to_thread(proc.start, 30)
    try:
        yield proc
    finally:
        await asyncio.to_thread(proc.stop, 30)


# -- tests without a service ---------------------------------------------------------------


def test_promtool_check_rules_passes_on_the_shipped_alerts(promtool: str) -> None:
    done = run_promtool(promtool, "check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr
    rules = sum(
        1 for line in ALERTS.read_text().splitlines() if line.strip().startswith("- alert:")
    )
    assert f"SUCCESS: {rules} rules found" in done.stdout


def test_promtool_check_config_passes_on_the_shipped_scrape_config(promtool: str) -> None:
    done = run_promtool(promtool, "check", "config", str(SCRAPE_CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr


# Synthetic series for `promtool test rules`: each alert fires on the trouble it is meant
# for, after the time its `for:` promises, and not on the harmless look-alike next to it.


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    inner = ", ".join(f'{k}="{v}"' for k, v in {"job": "notifier", **labels}.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def fires(alert: str, at: str, *alerts: dict[str, Any]) -> dict[str, Any]:
    """`alert` at `at` is firing exactly for `alerts` ({"labels":…, "summary":…})."""
    return {
        "eval_time": at,
        "alertname": alert,
        "exp_alerts": [
            {"exp_labels": a["labels"], "exp_annotations": a["annotations"]} for a in alerts
        ],
    }


def dead_letters(instance: str, stage: str, count: str) -> dict[str, Any]:
    return {
        "labels": {"severity": "warning", "instance": instance, "stage": stage},
        "annotations": {
            "summary": f"Dead letters at stage {stage} on {instance}",
            "description": f"{count} record(s) went to the dead-letter topic at stage {stage}"
            " in the last 5 minutes. Read x-error-reason on the DLQ, fix the cause, then"
            f" `notifier dlq replay --stage {stage}`.",
        },
    }


def lag_growing(instance: str, partition: str) -> dict[str, Any]:
    return {
        "labels": {"severity": "warning", "instance": instance, "partition": partition},
        "annotations": {
            "summary": f"Consumer lag growing on partition {partition} ({instance})",
            "description": f"The lag of partition {partition} is above 1000 records and has"
            " grown over the last 10 minutes: mail goes out slower than events come in."
            " Check SMTP latency and failures, retries and the pool utilisation.",
        },
    }


def smtp_failing(instance: str, ratio: str) -> dict[str, Any]:
    return {
        "labels": {"severity": "critical", "instance": instance},
        "annotations": {
            "summary": f"SMTP failure ratio {ratio} on {instance}",
            "description": "More than 5 % of SMTP send attempts failed over the last 5 minutes"
            " (for 5 minutes). Transient failures are retried and delay mail; permanent ones"
            " are dead-lettered.",
        },
    }


def stalled(instance: str, waiting: str) -> dict[str, Any]:
    return {
        "labels": {"severity": "critical", "instance": instance},
        "annotations": {
            "summary": f"Notifier consumes nothing while {waiting} records wait ({instance})",
            "description": "The consumer lag is above 0 and no event was consumed for 10"
            " minutes. The consumer may be stuck, fenced out of its group, or blocked on a"
            " record.",
        },
    }


def unsafe_ledger(instance: str) -> dict[str, Any]:
    return {
        "labels": {"severity": "critical", "instance": instance},
        "annotations": {
            "summary": f"SQLite ledger shared by several instances of a group ({instance})",
            "description": f"{instance} keeps its ledger in SQLite while other instances"
            " consume in its group: mail could be sent twice. Give every instance one"
            " PostgreSQL ledger (NOTIFY_LEDGER_URL=postgresql://...), or run one instance.",
        },
    }


def throttling(instance: str, count: str) -> dict[str, Any]:
    return {
        "labels": {"severity": "warning", "instance": instance},
        "annotations": {
            "summary": f"Mail throttled per recipient on {instance}",
            "description": f"{count} mail(s) went over the hourly limit to one address in the"
            " last 15 minutes and wait in the dead-letter topic (stage throttled). Find the"
            " cause with GET /deliveries?status=throttled, then release them with"
            " `notifier dlq replay --stage throttled`.",
        },
    }


def down(instance: str) -> dict[str, Any]:
    return {
        "labels": {"severity": "critical", "instance": instance, "job": "notifier"},
        "annotations": {
            "summary": f"Notifier {instance} is down",
            "description": f"Prometheus could not scrape {instance}/metrics for a minute.",
        },
    }


EVENTS = "notifier_events_total"
LAG = "notifier_consumer_lag"
SENDS = "notifier_smtp_send_seconds_count"
CREATED = {"type": "ticketActivity.created", "outcome": "processed"}

RULE_TESTS: list[dict[str, Any]] = [
    {
        # A dead letter at minute 3: the alert fires at once and clears 5 minutes later.
        "interval": "1m",
        "input_series": [
            series("notifier_dead_letters_total", "0 0 0 1x10", instance="n", stage="decode"),
            series("notifier_dead_letters_total", "0x13", instance="n", stage="smtp"),
        ],
        "alert_rule_test": [
            fires("NotifierDeadLetters", "2m"),
            fires("NotifierDeadLetters", "4m", dead_letters("n", "decode", "1")),
            fires("NotifierDeadLetters", "10m"),
        ],
    },
    {
        # Partition 0 falls behind by 100 records a minute; 1 is high but steady; 2 grows
        # but stays low. Events keep being consumed, so the consumer is not stalled.
        "interval": "1m",
        "input_series": [
            series(LAG, "500+100x30", instance="n", partition="0"),
            series(LAG, "5000x30", instance="n", partition="1"),
            series(LAG, "0+10x30", instance="n", partition="2"),
            series(EVENTS, "0+50x30", instance="n", **CREATED),
        ],
        "alert_rule_test": [
            fires("NotifierConsumerLagGrowing", "7m"),
            fires("NotifierConsumerLagGrowing", "15m", lag_growing("n", "0")),
            fires("NotifierStalled", "15m"),
        ],
    },
    {
        # 10 % of SMTP attempts fail on "bad", 2 % on "ok".
        "interval": "1m",
        "input_series": [
            series(SENDS, "0+90x20", instance="bad", outcome="accepted"),
            series(SENDS, "0+10x20", instance="bad", outcome="transient"),
            series(SENDS, "0+98x20", instance="ok", outcome="accepted"),
            series(SENDS, "0+2x20", instance="ok", outcome="permanent"),
        ],
        "alert_rule_test": [
            fires("NotifierSmtpFailureRatioHigh", "4m"),
            fires("NotifierSmtpFailureRatioHigh", "12m", smtp_failing("bad", "10%")),
        ],
    },
    {
        # Work waits everywhere: "stuck" stopped consuming after minute 2, "busy" consumes,
        # "new" has not consumed a single event since it started.
        "interval": "1m",
        "input_series": [
            series(LAG, "40x20", instance="stuck", partition="0"),
            series(EVENTS, "0 5 10x19", instance="stuck", **CREATED),
            series(LAG, "40x20", instance="busy", partition="0"),
            series(EVENTS, "0+5x20", instance="busy", **CREATED),
            series(LAG, "40x20", instance="new", partition="0"),
        ],
        "alert_rule_test": [
            fires("NotifierStalled", "4m"),
            fires("NotifierStalled", "9m", stalled("new", "40")),
            fires("NotifierStalled", "13m", stalled("new", "40"), stalled("stuck", "40")),
        ],
    },
    {
        # "n" stops answering at 1m; "blip" misses one scrape only.
        "interval": "30s",
        "input_series": [
            series("up", "1 1 0 0 0 0 0 0", instance="n"),
            series("up", "1 1 0 1 1 1 1 1", instance="blip"),
        ],
        "alert_rule_test": [
            fires("NotifierDown", "1m30s"),
            fires("NotifierDown", "3m", down("n")),
        ],
    },
    {
        # "shared" finds a second member at 2m; "alone" never does.
        "interval": "30s",
        "input_series": [
            series("notifier_unsafe_ledger", "0 0 0 0 1 1 1 1 1 1", instance="shared"),
            series("notifier_unsafe_ledger", "0x9", instance="alone"),
        ],
        "alert_rule_test": [
            fires("NotifierUnsafeLedger", "2m30s"),
            fires("NotifierUnsafeLedger", "4m", unsafe_ledger("shared")),
        ],
    },
    {
        # "loop" throttles 4 mails at minute 3; "quiet" sends many, throttles none.
        "interval": "1m",
        "input_series": [
            series(
                "notifier_notifications_total",
                "0 0 0 4x20",
                instance="loop",
                kind="customer_content",
                outcome="throttled",
            ),
            series(
                "notifier_notifications_total",
                "0x23",
                instance="quiet",
                kind="customer_content",
                outcome="throttled",
            ),
            series(
                "notifier_notifications_total",
                "0+100x23",
                instance="quiet",
                kind="customer_content",
                outcome="sent",
            ),
        ],
        "alert_rule_test": [
            fires("NotifierThrottling", "2m"),
            fires("NotifierThrottling", "5m", throttling("loop", "4")),
            fires("NotifierThrottling", "20m"),
        ],
    },
]


def test_alert_rules_fire_on_trouble_and_stay_quiet_otherwise(
    promtool: str, tmp_path: Path
) -> None:
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(
        yaml.safe_dump(
            {"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": RULE_TESTS}
        )
    )
    done = run_promtool(promtool, "test", "rules", str(tests))
    assert done.returncode == 0, done.stdout + done.stderr


# -- the whole chain -----------------------------------------------------------------------


@pytest.mark.timeout(120, func_only=True)
async def test_real_prometheus_runs_every_dashboard_query_and_fires_the_dead_letter_alert(
    service: ServiceProcess,
    prometheus_factory: Callable[[int], PrometheusServer],
    smtp_server: SmtpRecorder,
    kafka_bootstrap: str,
    topic: str,
    promtool: str,
) -> None:
    started = time.monotonic()
    until = started + 90  # one budget for every wait below; pytest-timeout stops at 120 s

    def left() -> float:
        return until - time.monotonic()

    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = round(time.monotonic() - started, 1)

    prom = await asyncio.to_thread(prometheus_factory, service.http_port)
    done = run_promtool(promtool, "check", "config", str(prom.config))
    assert done.returncode == 0, done.stdout + done.stderr
    # The zeros of the pre-registered counters must be in Prometheus before anything
    # happens, or increase() has no starting point.
    await poll(
        lambda: prom.query('notifier_dead_letters_total{stage="decode"} == 0'),
        left(),
        "scrape",
        interval=0.5,
        blocking=True,
    )
    lap("first scrape")

    # Trouble on purpose: ACME refuses mail (5xx: a dead letter at stage smtp), the first
    # message gets a 4xx (a retry), one record is not JSON (a dead letter at stage decode),
    # one department is unknown (unresolved), one supplier mail carries personal data (withheld).
    smtp_server.fail_rcpt("orders@acme.test")
    smtp_server.fail_next(1)
    events = mixed_examples()
    await publish(kafka_bootstrap, topic, [*events, b"{not json"])

    def consumed(count: int) -> bool:
        events_total = service_values(service.metrics_text(), "notifier_events_total")
        done = sum(
            v for labels, v in events_total.items() if ("outcome", "retry_later") not in labels
        )
        return done >= count

    await poll(
        lambda: consumed(len(events) + 1),
        left(),
        "the service to consume every record",
        interval=0.5,
        blocking=True,
    )
    lap("records consumed")
    dead = service_values(service.metrics_text(), "notifier_dead_letters_total")
    assert dead[(("stage", "decode"),)] == 1
    assert dead[(("stage", "smtp"),)] == 1

    # Once the failure series exist in Prometheus, one more 4xx makes the SMTP failure ratio
    # rise within the rule's 5m window: the alert must go pending (its `for:` is 5m).
    transient = 'notifier_smtp_send_seconds_count{outcome="transient"}'
    await poll(
        lambda: prom.query(transient),
        left(),
        "the transient failure in Prometheus",
        interval=0.5,
        blocking=True,
    )
    smtp_server.fail_next(1)
    await publish(kafka_bootstrap, topic, [example("05-follow-up.json")])
    await poll(
        lambda: consumed(len(events) + 2),
        left(),
        "the follow-up event",
        interval=0.5,
        blocking=True,
    )
    lap("follow-up consumed")

    # Every dashboard query returns data (the lag gauge appears after the service's first
    # 10 s measurement), except the allow-listed ones, which must still evaluate.
    targets = dashboard_targets()
    assert len(targets) >= 30

    def empty_queries() -> list[str]:
        return [
            f"{title}: {expr}"
            for title, expr, _ in targets
            if not allowed_empty(expr) and not prom.query(expr)
        ]

    missing = await asyncio.to_thread(empty_queries)
    while missing and time.monotonic() < until:
        await asyncio.sleep(1)
        missing = await asyncio.to_thread(empty_queries)
    assert missing == [], "dashboard queries without data"
    for title, expr, instant in targets:
        result = prom.query(expr) if instant else prom.query_range(expr, 30)
        assert result or allowed_empty(expr), f"{title}: {expr} returned nothing"
    lap("dashboard queries")

    # The dashboard's variable lists the service's instance.
    instances = prom.api("label/instance/values", **{"match[]": "notifier_build_info"})
    assert f"127.0.0.1:{service.http_port}" in instances

    # Every alert expression evaluates; every rule is healthy in the rule manager.
    for expr in alert_exprs().values():
        prom.query(expr)  # raises PromQLError on a bad expression

    def rules_evaluated() -> list[dict[str, Any]]:
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        return rules if all(r.get("lastEvaluation", "").startswith("20") for r in rules) else []

    rules = await poll(
        rules_evaluated, left(), "every rule to be evaluated", interval=0.5, blocking=True
    )
    assert {r["name"] for r in rules} == set(alert_exprs())
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []

    def alerts() -> dict[tuple[str, str], str]:
        found = prom.api("alerts")["alerts"]
        return {(a["labels"]["alertname"], a["labels"].get("stage", "")): a["state"] for a in found}

    def dead_letter_alerts_firing() -> dict[tuple[str, str], str]:
        now = alerts()
        wanted = {("NotifierDeadLetters", "decode"), ("NotifierDeadLetters", "smtp")}
        return now if all(now.get(k) == "firing" for k in wanted) else {}

    state = await poll(
        dead_letter_alerts_firing,
        left(),
        "NotifierDeadLetters to fire",
        interval=0.5,
        blocking=True,
    )
    lap("dead-letter alert firing")
    state = await poll(
        lambda: alerts() if ("NotifierSmtpFailureRatioHigh", "") in alerts() else {},
        left(),
        "NotifierSmtpFailureRatioHigh to go pending",
        interval=0.5,
        blocking=True,
    )
    assert state[("NotifierSmtpFailureRatioHigh", "")] == "pending"
    firing = {name for (name, _), s in alerts().items() if s == "firing"}
    assert firing == {"NotifierDeadLetters"}, alerts()
    lap("done")
    print(f"timings (s since test start): {timings}")
