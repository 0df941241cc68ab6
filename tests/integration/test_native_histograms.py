"""Exponential histograms from the stock OpenTelemetry SDK, through a real agent, into a real Prometheus as native
histograms (the protobuf exposition), and left out (counted) of text scrapes."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.metrics import Observation
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.sdk.metrics import Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    InMemoryMetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from tests.conftest import Agent, assert_promtool_clean, http_get, wait_until
from tests.integration.test_otlp_input import post
from tests.integration.test_prometheus import Prometheus

pytestmark = pytest.mark.slow

PROTOBUF = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited"


class App:
    """A stock SDK MeterProvider exporting OTLP to the agent, histograms aggregated as exponential ones (a view),
    with an in-memory reader beside the exporter that tells what the SDK recorded."""

    def __init__(self, agent: Agent, temporality: AggregationTemporality, exponential: bool = True) -> None:
        self.memory = InMemoryMetricReader()
        exporter = OTLPMetricExporter(endpoint=f"127.0.0.1:{agent.grpc_port}", insecure=True,
                                      preferred_temporality={Histogram: temporality})
        views = [View(instrument_type=Histogram, aggregation=ExponentialBucketHistogramAggregation())]
        self.provider = MeterProvider(
            resource=Resource.create({"service.name": "shop", "service.instance.id": "shop-1", "region": "eu"}),
            metric_readers=[PeriodicExportingMetricReader(exporter, export_interval_millis=600_000), self.memory],
            views=views if exponential else [])
        self.meter = self.provider.get_meter("shop")

    def flush(self) -> None:
        assert self.provider.force_flush(10_000)

    def recorded(self, name: str) -> tuple[int, float, int]:
        """Count, sum and scale of the SDK's own cumulative point for ``name``."""
        data = self.memory.get_metrics_data()
        (metric,) = [m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
                     if m.name == name]
        (point,) = metric.data.data_points
        return point.count, point.sum, point.scale


@pytest.fixture
def app_factory() -> Iterator[Callable[..., App]]:
    """Apps shut down (their last export sent) before the agents they export to stop."""
    made: list[App] = []

    def make(agent: Agent, temporality: AggregationTemporality, exponential: bool = True) -> App:
        made.append(App(agent, temporality, exponential))
        return made[-1]

    yield make
    for app in made:
        app.provider.shutdown()


def record(histogram: object, values: Sequence[float]) -> None:
    for value in values:
        histogram.record(value)  # type: ignore[attr-defined]


def scalar(prometheus: Prometheus, promql: str) -> float:
    (result,) = wait_until(lambda: prometheus.query(promql), 30, promql)
    return float(result["value"][1])


def test_sdk_exponential_histograms_are_native_histograms_in_prometheus_and_counted_out_of_text(
    agent_factory: Callable[..., Agent], app_factory: Callable[..., App], tmp_path: Path
) -> None:
    agent = agent_factory().start()
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{agent.port}", features="native-histograms")
    try:
        cumulative = app_factory(agent, AggregationTemporality.CUMULATIVE)
        checkout = cumulative.meter.create_histogram("checkout.duration", unit="s")
        record(checkout, [0.0, 1.0, 1.0, 1.05, 1.1])  # within 10% of 1: the SDK picks scale 10, served as 8
        cumulative.flush()
        delta = app_factory(agent, AggregationTemporality.DELTA)
        wait = delta.meter.create_histogram("queue.wait", unit="s")
        record(wait, [1.0, 1.05, 1.1])
        delta.flush()
        record(wait, [0.0, 1.0, 1000.0])  # a wider range: a lower scale, which the first delta is merged down to
        delta.flush()
        count, total, scale = cumulative.recorded("checkout.duration")
        assert (count, scale) == (5, 10)
        (series,) = wait_until(lambda: prometheus.query("checkout_duration_seconds"), 30, "the native histogram")
        assert "histogram" in series and "value" not in series  # stored as a native histogram, not a float
        assert (series["metric"]["exported_job"], series["metric"]["exported_instance"]) == ("shop", "shop-1")
        assert scalar(prometheus, "histogram_count(checkout_duration_seconds)") == count
        assert scalar(prometheus, "histogram_sum(checkout_duration_seconds)") == total
        # 3 of the 5 observations are at most 1 (0, 1, 1), and 1 is a bucket boundary at every schema
        assert scalar(prometheus, "histogram_quantile(0.6, checkout_duration_seconds)") == 1.0
        count, total, _ = delta.recorded("queue.wait")
        assert count == 6
        wait_until(lambda: scalar(prometheus, "histogram_count(queue_wait_seconds)") == count, 30,
                   "both deltas merged in Prometheus")
        assert scalar(prometheus, "histogram_sum(queue_wait_seconds)") == total
        assert scalar(prometheus, "histogram_quantile(0.5, queue_wait_seconds)") == 1.0  # 0, 1, 1 of 6
        assert scalar(prometheus, "histogram_quantile(1, queue_wait_seconds)") >= 1000.0

        # Prometheus scrapes protobuf only, so the left-out count grows by the two series per text scrape here
        _, text = http_get(agent.url + "/metrics")
        assert "checkout_duration" not in text and "queue_wait" not in text
        assert 'sidetrace_app_metrics_dropped_points_total{reason="exponential_histogram"} 2.0' in text
        assert_promtool_clean(text)
        _, openmetrics = http_get(agent.url + "/metrics", headers={"Accept": "application/openmetrics-text"})
        assert "checkout_duration" not in openmetrics
        assert 'sidetrace_app_metrics_dropped_points_total{reason="exponential_histogram"} 4.0' in openmetrics
        request = urllib.request.Request(agent.url + "/metrics", headers={"Accept": PROTOBUF})
        with urllib.request.urlopen(request, timeout=5) as response:  # carries them: not counted
            assert response.headers["Content-Type"].startswith("application/vnd.google.protobuf")
            assert b"checkout_duration_seconds" in response.read()
        _, text = http_get(agent.url + "/metrics")
        assert 'sidetrace_app_metrics_dropped_points_total{reason="exponential_histogram"} 6.0' in text
    finally:
        prometheus.stop()


def test_protobuf_and_text_scrapes_store_the_same_series_and_values_for_every_ordinary_family(
    agent_factory: Callable[..., Agent], app_factory: Callable[..., App], tmp_path: Path
) -> None:
    agent = agent_factory().start()
    target = f"127.0.0.1:{agent.port}"
    (tmp_path / "text").mkdir()
    (tmp_path / "protobuf").mkdir()
    text = Prometheus(tmp_path / "text", target)
    protobuf = Prometheus(tmp_path / "protobuf", target, features="native-histograms")
    try:
        app = app_factory(agent, AggregationTemporality.CUMULATIVE, exponential=False)
        app.meter.create_counter("orders").add(3, {"payment": "card"})
        app.meter.create_up_down_counter("carts.open").add(-2)
        app.meter.create_observable_gauge("queue.depth", [lambda _options: [Observation(7.5, {"queue": "a"})]])
        record(app.meter.create_histogram("request.duration", unit="s"), [0.2, 3.0, 40.0])
        app.flush()
        apps_exponential = app_factory(agent, AggregationTemporality.CUMULATIVE)
        record(apps_exponential.meter.create_histogram("size", unit="By"), [5.0])
        apps_exponential.flush()
        tracing = TracerProvider(resource=Resource.create({"service.name": "shop"}))
        tracing.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"127.0.0.1:{agent.grpc_port}",
                                                                        insecure=True)))
        for name in ("GET /cart", "GET /cart", "charge"):
            with tracing.get_tracer("shop").start_as_current_span(name):
                pass
        tracing.shutdown()
        names = "orders_total|carts_open|queue_depth|request_duration_seconds_.*|target_info|sidetrace_build_info|" \
                "sidetrace_config_.*|sidetrace_app_metrics_series|traces_span_metrics_.*|up"
        selector = f'{{__name__=~"{names}"}}'

        def stored(prometheus: Prometheus) -> dict[str, str]:
            # Prometheus 2.x keeps a text bucket's le as written ("2") and writes a protobuf one's as "2.0" (3.x
            # writes both as "2.0"): le is compared as the number it is.
            series = {}
            for sample in prometheus.query(selector):
                labels = sample["metric"]
                if "le" in labels:
                    labels["le"] = str(float(labels["le"]))
                series[json.dumps(labels, sort_keys=True)] = sample["value"][1]
            return series

        wait_until(lambda: protobuf.query("size_bytes"), 30, "the exponential histogram, scraped as protobuf")
        wait_until(lambda: text.query('sidetrace_app_metrics_series == 5'), 30, "every app series, scraped as text")
        wait_until(lambda: text.query('sum(traces_span_metrics_calls_total) == 3'), 30, "the span metrics")
        # both have scraped the same state once each has scraped after the last export
        def difference() -> list[tuple[str, str | None, str | None]]:
            a, b = stored(text), stored(protobuf)
            return sorted((key, a.get(key), b.get(key)) for key in set(a) | set(b) if a.get(key) != b.get(key))

        wait_until(lambda: not difference(), 30, "the two stores to agree")
        assert not text.query("size_bytes")  # each Prometheus scraped in its own format
        from_text = stored(text)
        app_labels = {"exported_instance": "shop-1", "exported_job": "shop", "instance": target, "job": "sidetrace",
                      "otel_scope_name": "shop"}
        assert from_text[json.dumps({"__name__": "orders_total", "payment": "card", **app_labels},
                                    sort_keys=True)] == "3"
        assert from_text[json.dumps({"__name__": "request_duration_seconds_bucket", "le": "5.0", **app_labels},
                                    sort_keys=True)] == "2"
        span_labels = {"instance": target, "job": "sidetrace", "service_name": "shop",
                       "span_kind": "SPAN_KIND_INTERNAL", "span_name": "GET /cart", "status_code": "STATUS_CODE_UNSET"}
        assert from_text[json.dumps({"__name__": "traces_span_metrics_duration_milliseconds_count", **span_labels},
                                    sort_keys=True)] == "2"
        info = [json.loads(key) for key in from_text if '"target_info"' in key]
        assert [labels["region"] for labels in info] == ["eu"]
        # the host's families too: the same metric names either way
        count_by_name = 'count by (__name__) ({job="sidetrace", __name__!~"size_bytes"})'
        assert ({s["metric"]["__name__"] for s in text.query(count_by_name)}
                == {s["metric"]["__name__"] for s in protobuf.query(count_by_name)})
    finally:
        text.stop()
        protobuf.stop()



def raw_point(metric: object, name: str, scale: int, count: int, zero_count: int = 0, zero_threshold: float = 0.0,
              positive: tuple[int, list[int]] = (0, []), negative: tuple[int, list[int]] = (0, [])) -> None:
    added = metric.add()  # type: ignore[attr-defined]
    added.name = name
    added.exponential_histogram.aggregation_temporality = AggregationTemporality.CUMULATIVE.value
    point = added.exponential_histogram.data_points.add()
    point.scale, point.count, point.sum = scale, count, 0.0
    point.zero_count, point.zero_threshold = zero_count, zero_threshold
    point.positive.offset, point.negative.offset = positive[0], negative[0]
    point.positive.bucket_counts.extend(positive[1])
    point.negative.bucket_counts.extend(negative[1])


def test_raw_otlp_points_the_sdk_does_not_make_reach_prometheus_exactly(
    agent_factory: Callable[..., Agent], tmp_path: Path
) -> None:
    agent = agent_factory().start()
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{agent.port}", features="native-histograms")
    try:
        request = ExportMetricsServiceRequest()
        resource_metrics = request.resource_metrics.add()
        kv = resource_metrics.resource.attributes.add()
        kv.key, kv.value.string_value = "service.name", "raw"
        metrics = resource_metrics.scope_metrics.add().metrics
        # values in (-4, -2] twice, [-0.5, 0.5] once, (2, 4] twice
        raw_point(metrics, "balance", 0, 5, zero_count=1, zero_threshold=0.5, positive=(1, [2]), negative=(1, [2]))
        raw_point(metrics, "idle", 3, 0)  # no observation yet: still a native histogram, not a classic one
        raw_point(metrics, "coarse", -5, 1, positive=(0, [1]))  # no schema holds it
        summary = metrics.add(name="wait").summary.data_points.add(count=12, sum=30.0)  # no SDK makes these
        summary.quantile_values.add(quantile=0.5, value=1.5)
        status, _, _ = post(agent.otlp_http + "/v1/metrics", request.SerializeToString())
        assert status == 200
        assert scalar(prometheus, "histogram_count(balance)") == 5
        assert scalar(prometheus, "histogram_quantile(0.4, balance)") == -2.0  # the upper bound of (-4, -2]
        assert scalar(prometheus, "histogram_count(idle)") == 0
        (idle,) = prometheus.query("idle")
        assert "histogram" in idle and not prometheus.query("idle_count")
        assert not prometheus.query("coarse") and not prometheus.query("histogram_count(coarse)")
        assert scalar(prometheus, 'wait{quantile="0.5"}') == 1.5 and scalar(prometheus, "wait_count") == 12
        _, text = http_get(agent.url + "/metrics")
        assert 'sidetrace_app_metrics_dropped_points_total{reason="exponential_histogram_scale"} 1.0' in text
    finally:
        prometheus.stop()


def test_an_app_without_an_instance_id_makes_the_same_series_in_both_formats_with_honor_labels(
    agent_factory: Callable[..., Agent], tmp_path: Path
) -> None:
    # As the OTel Prometheus compatibility spec says, an app without service.instance.id gets instance="": with
    # honor_labels (as dashboards/prometheus/scrape.yml sets) its series have no instance, whichever the format.
    agent = agent_factory().start()
    target = f"127.0.0.1:{agent.port}"
    scrape = ("scrape_configs:\n  - job_name: sidetrace\n    honor_labels: true\n    static_configs:\n"
              f"      - targets: ['{target}']\n")
    (tmp_path / "text").mkdir()
    (tmp_path / "protobuf").mkdir()
    text = Prometheus(tmp_path / "text", target, scrape)
    protobuf = Prometheus(tmp_path / "protobuf", target, scrape, features="native-histograms")
    provider = MeterProvider(resource=Resource({"service.name": "cart"}), metric_readers=[  # no detectors
        PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"127.0.0.1:{agent.grpc_port}", insecure=True),
                                      export_interval_millis=600_000)])
    try:
        provider.get_meter("cart").create_counter("orders").add(3)
        assert provider.force_flush(10_000)
        stored = [wait_until(lambda p=p: p.query("orders_total"), 30, "the app's counter") for p in (text, protobuf)]
        assert [[sample["metric"] for sample in samples] for samples in stored] == [
            [{"__name__": "orders_total", "job": "cart", "otel_scope_name": "cart"}]] * 2
        own = [p.query("sidetrace_build_info")[0]["metric"] for p in (text, protobuf)]
        assert [(labels["job"], labels["instance"]) for labels in own] == [("sidetrace", target)] * 2
    finally:
        provider.shutdown()
        text.stop()
        protobuf.stop()
