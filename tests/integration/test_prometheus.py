"""A real Prometheus (Debian package `prometheus`) scrapes a real agent on loopback."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from sidetrace.agent.app_metrics import DROP_REASONS
from sidetrace.agent.receivers.otlp import REFUSAL_REASONS
from sidetrace.exporters.delivery import SEND_FAILURE_REASONS
from sidetrace.exporters.spool import SET_ASIDE_REASONS, WRITE_FAILURE_CAUSES
from tests.conftest import Agent, assert_promtool_clean, free_port, http_get, stop_process, wait_until

pytestmark = pytest.mark.slow


class Prometheus:
    """A real Prometheus scraping ``target``, or (``target`` None) only taking remote writes; ``features`` for
    ``--enable-feature`` (``native-histograms`` makes it scrape the protobuf exposition)."""

    def __init__(self, tmp: Path, target: str | None, scrape: str | None = None, features: str = "") -> None:
        self.features = [f"--enable-feature={features}"] if features else []
        self.binary = shutil.which("prometheus")
        assert self.binary, "prometheus is not installed: `make test` installs the Debian package"
        self.tmp = tmp
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp / "prometheus.yml"
        if scrape is None:
            scrape = (f"scrape_configs:\n  - job_name: sidetrace\n    static_configs:\n      - targets: ['{target}']\n"
                      if target else "")
        self.config.write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n" + scrape)
        self.start()

    def start(self) -> None:
        """Start (again, on the same port and storage)."""
        with open(self.tmp / "prometheus.log", "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={self.config}", f"--web.listen-address=127.0.0.1:{self.port}",
                 f"--storage.tsdb.path={self.tmp / 'tsdb'}", "--log.level=warn", "--web.enable-remote-write-receiver",
                 *self.features],
                stdout=log, stderr=subprocess.STDOUT,
            )
        wait_until(lambda: self.proc.poll() is None and http_get(self.url + "/-/ready", 1)[0] == 200, 30,
                   "prometheus ready")

    def query(self, promql: str) -> list[dict]:
        status, body = http_get(f"{self.url}/api/v1/query?query={urllib.parse.quote(promql)}")
        assert status == 200, body
        return json.loads(body)["data"]["result"]

    def stop(self) -> None:
        stop_process(self.proc, 15)


@pytest.fixture
def scraped_agent(agent_factory: Callable[..., Agent], tmp_path: Path) -> Iterator[tuple[Agent, Prometheus]]:
    agent = agent_factory("[host]\ninterval_seconds = 0.5\n").start()
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{agent.port}")
    yield agent, prometheus
    prometheus.stop()


def send_over_loopback(total: int) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        received = bytearray()

        def drain() -> None:
            conn, _ = server.accept()
            with conn:
                while chunk := conn.recv(65536):
                    received.extend(chunk)

        reader = threading.Thread(target=drain)
        reader.start()
        with socket.create_connection(server.getsockname(), timeout=10) as client:
            client.sendall(b"x" * total)
        reader.join(10)
    assert len(received) == total


def lo_received(prometheus: Prometheus) -> float | None:
    result = prometheus.query('system_network_io_bytes_total{device="lo",direction="receive"}')
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_agent_and_sees_loopback_traffic(scraped_agent: tuple[Agent, Prometheus]) -> None:
    agent, prometheus = scraped_agent
    up = wait_until(lambda: prometheus.query('up{job="sidetrace"} == 1'), 30, "up == 1 in prometheus")
    assert up[0]["metric"]["instance"] == f"127.0.0.1:{agent.port}"
    before = wait_until(lambda: lo_received(prometheus), 30, "lo receive bytes in prometheus")
    send_over_loopback(8 * 1024 * 1024)
    after = wait_until(lambda: (value := lo_received(prometheus)) and value >= before + 8 * 1024 * 1024 and value,
                       30, "lo receive bytes to grow by the 8 MiB sent")
    assert after >= before + 8 * 1024 * 1024
    build = prometheus.query("sidetrace_build_info")
    assert build[0]["metric"]["version"] == "0.1.0"
    assert prometheus.query('sidetrace_source_collections_total{source="host"} > 1')
    # Prometheus accepted every sample it scraped (its own metrics, read from its /metrics).
    _, own = http_get(prometheus.url + "/metrics")
    rejected = [line for line in own.splitlines() if line.startswith((
        "prometheus_target_scrapes_sample_duplicate_timestamp_total",
        "prometheus_target_scrapes_sample_out_of_order_total",
        "prometheus_target_scrapes_sample_out_of_bounds_total",
    ))]
    assert len(rejected) == 3 and all(line.endswith(" 0") for line in rejected), rejected


def test_every_dashboard_query_is_valid_promql(scraped_agent: tuple[Agent, Prometheus]) -> None:
    _, prometheus = scraped_agent
    dashboard = json.loads((Path(__file__).resolve().parents[2] / "dashboards/grafana/sidetrace.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    wait_until(lambda: prometheus.query('up{job="sidetrace"} == 1'), 30, "a first scrape")
    promql = [expr.replace("$__rate_interval", "1m").replace('"$instance"', '".*"') for expr in expressions]
    for query in promql:
        prometheus.query(query)  # asserts HTTP 200: Prometheus parsed and evaluated it
    throughput = next(query for query in promql if query.startswith("rate(system_network_io_bytes_total"))
    series = wait_until(lambda: prometheus.query(throughput), 30, "the throughput panel to have data")
    assert {s["metric"]["device"] for s in series} >= {"lo"}


ROOT = Path(__file__).resolve().parents[2]


def test_shipped_scrape_config_keeps_the_apps_job_and_instance(
    agent_factory: Callable[..., Agent], tmp_path: Path
) -> None:
    agent = agent_factory().start()
    shipped = (ROOT / "dashboards/prometheus/scrape.yml").read_text()
    assert '"127.0.0.1:9464"' in shipped and "scrape_interval: 15s" in shipped
    scrape = shipped.replace('"127.0.0.1:9464"', f'"127.0.0.1:{agent.port}"').replace("scrape_interval: 15s",
                                                                                     "scrape_interval: 1s")
    prometheus = Prometheus(tmp_path, None, scrape)
    try:
        provider = MeterProvider(
            resource=Resource.create({"service.name": "cart", "service.instance.id": "cart-1"}),
            metric_readers=[PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=f"127.0.0.1:{agent.grpc_port}", insecure=True),
                export_interval_millis=60_000)])
        provider.get_meter("shop").create_counter("orders").add(3)
        assert provider.force_flush(10_000)
        provider.shutdown()
        (series,) = wait_until(lambda: prometheus.query("orders_total"), 30, "the app's counter in Prometheus")
        assert (series["metric"]["job"], series["metric"]["instance"], series["value"][1]) == ("cart", "cart-1", "3")
        assert "exported_job" not in series["metric"]
        (own,) = prometheus.query("sidetrace_build_info")
        assert (own["metric"]["job"], own["metric"]["instance"]) == ("sidetrace", f"127.0.0.1:{agent.port}")
    finally:
        prometheus.stop()


def test_counters_with_known_labels_are_exported_at_zero_from_the_start(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory('[[exporters.otlp]]\nname = "jaeger"\nendpoint = "http://127.0.0.1:1"\n').start()
    _, text = http_get(agent.url + "/metrics")
    lines = set(text.splitlines())
    expected = {'sidetrace_spool_dropped_spans_total{exporter="jaeger",reason="spool_full"} 0.0'}
    expected |= {f'sidetrace_spool_set_aside_spans_total{{exporter="jaeger",reason="{reason}"}} 0.0'
                 for reason in SET_ASIDE_REASONS}
    expected |= {f'sidetrace_spool_failed_writes_total{{cause="{cause}"}} 0.0' for cause in WRITE_FAILURE_CAUSES}
    expected |= {f'sidetrace_source_errors_total{{collector="{collector}",source="host"}} 0.0'
                 for collector in ("cpu", "load", "memory", "paging", "filesystem", "disk", "network", "connections",
                                   "interfaces", "routes")}
    expected |= {f'sidetrace_receiver_{family}_total{{reason="{reason}",transport="{transport}"}} 0.0'
                 for family in ("refused_spans", "refused_requests")
                 for transport, reasons in REFUSAL_REASONS.items() for reason in reasons}
    expected |= {f'sidetrace_exporter_send_failures_total{{exporter="jaeger",reason="{reason}"}} 0.0'
                 for reason in SEND_FAILURE_REASONS}
    expected |= {f'sidetrace_app_metrics_dropped_points_total{{reason="{reason}"}} 0.0' for reason in DROP_REASONS}
    assert sorted(expected - lines) == []
    assert_promtool_clean(text)
