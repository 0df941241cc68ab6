"""App metrics against the OpenTelemetry "Prometheus and OpenMetrics Compatibility" specification, point by point:
the stock SDK and raw OTLP requests sent to a real agent, and the exact lines of its /metrics, each scrape checked
by ``promtool check metrics``."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.internal.decoder import _DecodeVarint32
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider, ObservableCounter
from opentelemetry.sdk.metrics.export import AggregationTemporality as SdkTemporality
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from sidetrace.agent.protobuf_exposition import CONTENT_TYPE as PROTOBUF
from sidetrace.agent.protobuf_exposition import GAUGE, MetricFamily
from tests.conftest import Agent, http_get, scrape_clean, wait_until
from tests.integration.test_otlp_input import post
from tests.integration.test_prometheus import Prometheus

DELTA = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE


def sdk(agent: Agent, delta: bool = False) -> MeterProvider:
    """A stock SDK MeterProvider exporting over OTLP/gRPC to ``agent`` only when flushed; ``delta`` is the SDK's
    ``delta`` temporality preference (counters and histograms delta, up-down counters cumulative)."""
    preferred = dict.fromkeys((Counter, ObservableCounter, Histogram), SdkTemporality.DELTA) if delta else {}
    exporter = OTLPMetricExporter(endpoint=f"127.0.0.1:{agent.grpc_port}", insecure=True,
                                  preferred_temporality=preferred)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
    return MeterProvider(resource=Resource.create({"service.name": "cart", "service.instance.id": "cart-1"}),
                         metric_readers=[reader])


def of(lines: set[str], *names: str) -> set[str]:
    return {line for line in lines if line.startswith(names)}


@pytest.mark.parametrize("temporality", ["cumulative", "delta"])
def test_sdk_counters_and_histograms_are_exact_after_every_export_in_either_temporality(
        agent_factory: Callable[..., Agent], temporality: str) -> None:
    agent = agent_factory().start()
    provider = sdk(agent, delta=temporality == "delta")
    meter = provider.get_meter("cart.orders", "2.1.0")
    orders = meter.create_counter("orders.placed", unit="{order}")
    duration = meter.create_histogram("checkout.duration", unit="s", explicit_bucket_boundaries_advisory=[0.1, 1.0])
    labels = 'instance="cart-1",job="cart",otel_scope_name="cart.orders",otel_scope_version="2.1.0",region="eu"'
    bucket = ('checkout_duration_seconds_bucket{instance="cart-1",job="cart",le="%s",otel_scope_name="cart.orders",'
              'otel_scope_version="2.1.0",region="eu"} %s')
    # Each export: what is recorded before it, then the exact series after it. The third records nothing (a delta
    # SDK sends no point), so the fourth delta starts after a gap: it is added all the same.
    exports = [
        ((2,), (0.0625,), 2, (1, 1, 1), 0.0625),
        ((3, 1), (0.5, 2.0), 6, (1, 2, 3), 2.5625),
        ((), (), 6, (1, 2, 3), 2.5625),
        ((5,), (0.0625,), 11, (2, 3, 4), 2.625),
    ]
    try:
        for adds, records, total, (le_01, le_1, count), seconds in exports:
            for amount in adds:
                orders.add(amount, {"region": "eu"})
            for value in records:
                duration.record(value, {"region": "eu"})
            assert provider.force_flush(10_000)
            lines = scrape_clean(agent)
            assert of(lines, "orders_placed", "checkout_duration") == {
                f"orders_placed_total{{{labels}}} {float(total)}",
                bucket % ("0.1", float(le_01)), bucket % ("1.0", float(le_1)), bucket % ("+Inf", float(count)),
                f"checkout_duration_seconds_count{{{labels}}} {float(count)}",
                f"checkout_duration_seconds_sum{{{labels}}} {seconds!r}",
            }
            assert 'sidetrace_app_metrics_dropped_points_total{reason="delta_overlap"} 0.0' in lines
    finally:
        provider.shutdown()


def test_two_libraries_recording_one_instrument_keep_two_series_labelled_by_scope(
        agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory().start()
    provider = sdk(agent)
    http = provider.get_meter("lib.http", "1.0")
    rpc = provider.get_meter("lib.rpc", "2.0", schema_url="https://opentelemetry.io/schemas/1.21.0",
                             attributes={"team": "core", "name": "shadow"})
    # A point attribute that would pass for the scope's label is left out: the scope's own value stays.
    http.create_counter("requests").add(6, {"otel.scope.name": "spoof", "route": "/a"})
    rpc.create_counter("requests").add(600, {"route": "/a"})
    try:
        assert provider.force_flush(10_000)
        assert of(scrape_clean(agent), "requests") == {
            'requests_total{instance="cart-1",job="cart",otel_scope_name="lib.http",otel_scope_version="1.0",'
            'route="/a"} 6.0',
            'requests_total{instance="cart-1",job="cart",otel_scope_name="lib.rpc",'
            'otel_scope_schema_url="https://opentelemetry.io/schemas/1.21.0",otel_scope_team="core",'
            'otel_scope_version="2.0",route="/a"} 600.0',
        }
    finally:
        provider.shutdown()


def scoped_gauge_request(scope_attributes: dict[str, str], point_attributes: dict[str, str]) -> bytes:
    request = ExportMetricsServiceRequest()
    resource_metrics = request.resource_metrics.add()
    resource_metrics.resource.attributes.add(key="service.name").value.string_value = "worker"
    scope_metrics = resource_metrics.scope_metrics.add(schema_url="https://example.com/s/1")
    scope_metrics.scope.name = "lib"
    for key, value in scope_attributes.items():
        scope_metrics.scope.attributes.add(key=key).value.string_value = value
    point = scope_metrics.metrics.add(name="queue").gauge.data_points.add(as_int=3, time_unix_nano=time.time_ns())
    for key, value in point_attributes.items():
        point.attributes.add(key=key).value.string_value = value
    return request.SerializeToString()


def test_scope_attributes_become_prefixed_labels_joined_when_they_collide_and_win_over_point_attributes(
        agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory().start()
    body = scoped_gauge_request({"a.b": "dot", "a-b": "dash", "version": "9", "schema_url": "x"},
                                {"otel_scope_a_b": "point", "otel_scope_other": "kept", "otel.scope.version": "7"})
    assert post(agent.otlp_http + "/v1/metrics", body)[0] == 200
    assert of(scrape_clean(agent), "queue") == {
        'queue{instance="",job="worker",otel_scope_a_b="dash;dot",otel_scope_name="lib",otel_scope_other="kept",'
        'otel_scope_schema_url="https://example.com/s/1",otel_scope_version=""} 3.0',
    }


def delta_request(start: int, end: int, value: int) -> bytes:
    """A delta counter point and a delta histogram point (``value`` observations of 0.5) over [start, end]."""
    request = ExportMetricsServiceRequest()
    scope_metrics = request.resource_metrics.add().scope_metrics.add()
    scope_metrics.scope.name = "lib"
    total = scope_metrics.metrics.add(name="jobs.done").sum
    total.is_monotonic, total.aggregation_temporality = True, DELTA
    total.data_points.add(start_time_unix_nano=start, time_unix_nano=end, as_int=value)
    histogram = scope_metrics.metrics.add(name="job.duration", unit="s").histogram
    histogram.aggregation_temporality = DELTA
    histogram.data_points.add(start_time_unix_nano=start, time_unix_nano=end, count=value, sum=value * 0.5,
                              explicit_bounds=[1.0], bucket_counts=[value, 0])
    return request.SerializeToString()


def test_delta_points_are_added_only_when_they_follow_on_so_none_counts_twice(
        agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory().start()
    reasons = ("max_series", "max_series_target_info", "reserved_name", "type_conflict", "name_clash",
               "exponential_histogram", "exponential_histogram_scale", "delta_overlap", "out_of_order")
    assert {f'sidetrace_app_metrics_dropped_points_total{{reason="{reason}"}} 0.0' for reason in reasons} \
        <= scrape_clean(agent)  # every reason is there before its first drop, so increase() sees the first one
    t0 = time.time_ns() - 60 * 10**9

    def at(seconds: int) -> int:
        return t0 + seconds * 10**9

    labels = 'instance="",job="unknown_service",otel_scope_name="lib",otel_scope_version=""'
    bucket = 'job_duration_seconds_bucket{instance="",job="unknown_service",le="%s",otel_scope_name="lib",' \
             'otel_scope_version=""} %s'
    steps = [  # (start, end, value), then the cumulative total and the delta_overlap drops (two points a request)
        ((at(0), at(10), 2), 2, 0),  # the first point starts the series
        ((at(10), at(20), 3), 5, 0),  # starts where the last ended: added
        ((at(10), at(20), 3), 5, 2),  # the same delta sent again: dropped
        ((at(15), at(30), 4), 5, 4),  # overlaps what was added: dropped
        ((at(0), at(10), 2), 5, 6),  # an older one arriving late: dropped
        ((at(20), at(20), 9), 5, 8),  # an empty interval where the series ends: dropped (it could come again)
        ((at(40), at(50), 7), 12, 8),  # a gap before it (a restart, a lost point): added
        ((0, at(60), 1), 13, 8),  # no start time: judged by its time alone, after the last: added
        ((0, at(60), 1), 13, 10),  # and the same again: dropped
    ]
    for (start, end, value), total, dropped in steps:
        assert post(agent.otlp_http + "/v1/metrics", delta_request(start, end, value))[0] == 200
        lines = scrape_clean(agent)
        assert of(lines, "jobs_done", "job_duration") == {
            f"jobs_done_total{{{labels}}} {float(total)}",
            bucket % ("1.0", float(total)), bucket % ("+Inf", float(total)),
            f"job_duration_seconds_count{{{labels}}} {float(total)}",
            f"job_duration_seconds_sum{{{labels}}} {total * 0.5}",
        }, (start, end, value)
        assert f'sidetrace_app_metrics_dropped_points_total{{reason="delta_overlap"}} {float(dropped)}' in lines


def cumulative_request(start: int, end: int, value: int) -> bytes:
    """A cumulative counter, a gauge, a cumulative histogram (``value`` observations of 0.5) and a summary, each
    one point over [start, end] worth ``value``."""
    request = ExportMetricsServiceRequest()
    scope_metrics = request.resource_metrics.add().scope_metrics.add()
    scope_metrics.scope.name = "lib"
    total = scope_metrics.metrics.add(name="jobs.seen").sum
    total.is_monotonic, total.aggregation_temporality = True, CUMULATIVE
    total.data_points.add(start_time_unix_nano=start, time_unix_nano=end, as_int=value)
    scope_metrics.metrics.add(name="queue.depth").gauge.data_points.add(time_unix_nano=end, as_double=value)
    histogram = scope_metrics.metrics.add(name="job.wait", unit="s").histogram
    histogram.aggregation_temporality = CUMULATIVE
    histogram.data_points.add(start_time_unix_nano=start, time_unix_nano=end, count=value, sum=value * 0.5,
                              explicit_bounds=[1.0], bucket_counts=[value, 0])
    summary = scope_metrics.metrics.add(name="job.size").summary.data_points.add(
        start_time_unix_nano=start, time_unix_nano=end, count=value, sum=value * 2.0)
    summary.quantile_values.add(quantile=0.5, value=2.0)
    return request.SerializeToString()


def test_a_cumulative_or_gauge_point_older_than_its_series_never_replaces_it_and_a_reset_is_taken(
        agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory().start()
    t0 = time.time_ns() - 60 * 10**9

    def at(seconds: int) -> int:
        return t0 + seconds * 10**9

    labels = 'instance="",job="unknown_service",otel_scope_name="lib",otel_scope_version=""'
    bucket = 'job_wait_seconds_bucket{instance="",job="unknown_service",le="%s",otel_scope_name="lib",' \
             'otel_scope_version=""} %s'
    steps = [  # (start, end, value), then the value each of the four metrics shows and the out_of_order drops
        ((at(0), at(20), 8), 8, 0),
        ((at(0), at(10), 5), 8, 4),  # older (a retry or a batch arriving late): would go back to 5
        ((at(0), at(20), 9), 8, 8),  # as old with another value: the first one stays, as in Prometheus
        ((at(0), at(20), 8), 8, 8),  # the same point again: nothing changes, nothing is counted
        ((at(25), at(30), 2), 2, 8),  # a reset (newer start, lower value) is newer: taken
        ((at(0), at(28), 9), 2, 12),  # the stream before the reset, arriving late: dropped
        ((at(25), 0, 7), 2, 16),  # no time, after timed points: it cannot be placed
        ((at(25), at(40), 3), 3, 16),
    ]
    for (start, end, value), shown, dropped in steps:
        assert post(agent.otlp_http + "/v1/metrics", cumulative_request(start, end, value))[0] == 200
        lines = scrape_clean(agent)
        assert of(lines, "jobs_seen", "queue_depth", "job_wait", "job_size") == {
            f"jobs_seen_total{{{labels}}} {float(shown)}", f"queue_depth{{{labels}}} {float(shown)}",
            bucket % ("1.0", float(shown)), bucket % ("+Inf", float(shown)),
            f"job_wait_seconds_count{{{labels}}} {float(shown)}", f"job_wait_seconds_sum{{{labels}}} {shown * 0.5}",
            f'job_size{{{labels},quantile="0.5"}} 2.0',
            f"job_size_count{{{labels}}} {float(shown)}", f"job_size_sum{{{labels}}} {shown * 2.0}",
        }, (start, end, value)
        assert f'sidetrace_app_metrics_dropped_points_total{{reason="out_of_order"}} {float(dropped)}' in lines


def protobuf_families(agent: Agent) -> dict[str, Any]:
    """The families of ``agent``'s protobuf exposition (what Prometheus asks for with native histograms or created
    timestamps enabled), by name."""
    request = urllib.request.Request(agent.url + "/metrics", headers={"Accept": PROTOBUF})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    families, position = {}, 0
    while position < len(body):
        length, position = _DecodeVarint32(body, position)
        family = MetricFamily.FromString(body[position:position + length])
        families[family.name] = family
        position += length
    return families


def test_start_times_of_counters_histograms_and_summaries_are_their_created_timestamp_in_protobuf_only(
        agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory().start()
    t0 = (time.time_ns() // 10**9 - 60) * 10**9

    def at(seconds: float) -> int:
        return t0 + int(seconds * 10**9)

    for body in (cumulative_request(at(0.25), at(20), 8), delta_request(at(1.5), at(10), 2),
                 delta_request(at(10), at(20), 3)):
        assert post(agent.otlp_http + "/v1/metrics", body)[0] == 200

    def created() -> dict[str, tuple[int, int]]:
        families = protobuf_families(agent)
        assert not [name for name in families if name.endswith("_created")]  # never a series of its own
        stamps = {}
        for name, field in (("jobs_seen_total", "counter"), ("job_wait_seconds", "histogram"),
                            ("job_size", "summary"), ("jobs_done_total", "counter"),
                            ("job_duration_seconds", "histogram")):
            (metric,) = families[name].metric
            stamp = getattr(metric, field).created_timestamp
            stamps[name] = (stamp.seconds, stamp.nanos)
        assert families["queue_depth"].type == GAUGE  # a gauge has none, though its point has a start time
        return stamps

    start = t0 // 10**9
    # cumulative points: their own start; accumulated deltas: the first point's start, not the last one's
    assert created() == {"jobs_seen_total": (start, 250_000_000), "job_wait_seconds": (start, 250_000_000),
                         "job_size": (start, 250_000_000), "jobs_done_total": (start + 1, 500_000_000),
                         "job_duration_seconds": (start + 1, 500_000_000)}
    # a reset (a newer start) moves it
    assert post(agent.otlp_http + "/v1/metrics", cumulative_request(at(25), at(30), 2))[0] == 200
    assert created()["jobs_seen_total"] == (start + 25, 0)
    # the text formats carry no _created samples (Prometheus would store each as a series of its own)
    status, text = http_get(agent.url + "/metrics")
    assert status == 200 and "_created" not in text
    scrape_clean(agent)


def test_a_delta_histogram_whose_bounds_change_starts_over_from_that_point(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory().start()
    t0 = time.time_ns() - 60 * 10**9
    bucket = 'wait_seconds_bucket{instance="",job="unknown_service",le="%s",otel_scope_name="",' \
             'otel_scope_version=""} %s'
    labels = 'instance="",job="unknown_service",otel_scope_name="",otel_scope_version=""'
    steps = [  # (bounds, bucket counts, sum), then the lines after it
        ((1.0,), (2, 0), 1.0, {bucket % ("1.0", "2.0"), bucket % ("+Inf", "2.0")}, 2, 1.0),
        ((5.0,), (0, 1), 6.0, {bucket % ("5.0", "0.0"), bucket % ("+Inf", "1.0")}, 1, 6.0),  # new bounds: over
        ((5.0,), (1, 0), 2.0, {bucket % ("5.0", "1.0"), bucket % ("+Inf", "2.0")}, 2, 8.0),  # then it adds up
    ]
    for n, (bounds, counts, total, buckets, count, running_sum) in enumerate(steps):
        request = ExportMetricsServiceRequest()
        histogram = request.resource_metrics.add().scope_metrics.add().metrics.add(name="wait", unit="s").histogram
        histogram.aggregation_temporality = DELTA
        histogram.data_points.add(start_time_unix_nano=t0 + n * 10**9, time_unix_nano=t0 + (n + 1) * 10**9,
                                  explicit_bounds=bounds, bucket_counts=counts, count=sum(counts), sum=total)
        assert post(agent.otlp_http + "/v1/metrics", request.SerializeToString())[0] == 200
        assert of(scrape_clean(agent), "wait_seconds") == buckets | {
            f"wait_seconds_count{{{labels}}} {float(count)}", f"wait_seconds_sum{{{labels}}} {running_sum}"}


@pytest.mark.slow
def test_attributes_named_like_prometheus_reserved_labels_get_key_so_prometheus_keeps_the_target(
        agent_factory: Callable[..., Agent], tmp_path: Path) -> None:
    # The stock SDK accepts a point attribute named __name__: as a label it would be a second __name__, for which
    # Prometheus fails the whole scrape (every series of the agent lost). Runs of _ become one, and a leading _ gets
    # "key", as the translator gives one.
    agent = agent_factory().start()
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{agent.port}")
    provider = sdk(agent)
    try:
        provider.get_meter("shop").create_counter("orders").add(3, {"__name__": "spoof", "__x": "b", "_tenant": "a"})
        assert provider.force_flush(10_000)
        assert of(scrape_clean(agent), "orders") == {
            'orders_total{instance="cart-1",job="cart",key_name_="spoof",key_tenant="a",key_x="b",'
            'otel_scope_name="shop",otel_scope_version=""} 3.0'}
        (series,) = wait_until(lambda: prometheus.query("orders_total"), 30, "the app's counter in Prometheus")
        assert (series["metric"]["__name__"], series["metric"]["key_name_"], series["value"][1]) == \
            ("orders_total", "spoof", "3")
        assert [up["value"][1] for up in prometheus.query('up{job="sidetrace"}')] == ["1"]
    finally:
        provider.shutdown()
        prometheus.stop()


def test_runs_of_underscores_become_one_in_metric_and_label_names_and_labels_that_then_clash_are_joined(
        agent_factory: Callable[..., Agent]) -> None:
    # The specification: "Multiple consecutive `_` characters MUST be replaced with a single `_` character", for
    # metric names and attribute keys alike; keys that become one label have their values joined with ";" in the
    # order of the original keys ("__x" before "_x", "a..b" before "a__b" before "a_b").
    agent = agent_factory().start()
    provider = sdk(agent)
    meter = provider.get_meter("shop", attributes={"team__id": "t1"})
    meter.create_counter("http..client__calls").add(2, {"a..b": "dots", "a__b": "unders", "a_b": "one",
                                                          "__x": "x", "_x": "y", "rate__limit": "on"})
    meter.create_gauge("disk", unit="io._ops").set(5)
    try:
        assert provider.force_flush(10_000)
        scope = 'otel_scope_name="shop",otel_scope_team_id="t1",otel_scope_version=""'
        assert of(scrape_clean(agent), "http_", "disk") == {
            f'http_client_calls_total{{a_b="dots;unders;one",instance="cart-1",job="cart",key_x="x;y",{scope},'
            f'rate_limit="on"}} 2.0',
            f'disk_io_ops{{instance="cart-1",job="cart",{scope}}} 5.0',
        }
    finally:
        provider.shutdown()


def test_target_info_labels_follow_the_point_rules_and_empty_keys_are_left_out_everywhere(
        agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory().start()
    request = ExportMetricsServiceRequest()
    resource_metrics = request.resource_metrics.add()
    for key, value in {"service.name": "worker", "service.instance.id": "w-1", "job": "rjob", "instance": "rinst",
                       "le": "x", "k8s.pod-name": "a", "k8s.pod.name": "b", "": "empty", "__meta": "m"}.items():
        resource_metrics.resource.attributes.add(key=key).value.string_value = value
    scope_metrics = resource_metrics.scope_metrics.add()
    scope_metrics.scope.name = "lib"
    scope_metrics.scope.attributes.add(key="").value.string_value = "scope-empty"
    point = scope_metrics.metrics.add(name="queue").gauge.data_points.add(as_int=3, time_unix_nano=time.time_ns())
    point.attributes.add(key="").value.string_value = "point-empty"
    point.attributes.add(key="region").value.string_value = "eu"
    assert post(agent.otlp_http + "/v1/metrics", request.SerializeToString())[0] == 200
    lines = scrape_clean(agent)
    assert of(lines, "queue", "target_info") == {
        'queue{instance="w-1",job="worker",otel_scope_name="lib",otel_scope_version="",region="eu"} 3.0',
        'target_info{instance="w-1",job="worker",k8s_pod_name="a;b",key_meta="m"} 1.0',
    }


def raw_metrics(*metrics: tuple[str, str, float], service: str = "worker", delta: bool = False,
                start: int = 0, now: int = 0) -> bytes:
    """A request from ``service`` with (name, kind, value) metrics at ``now`` (default the time): kind ``gauge``,
    or ``counter`` (cumulative unless ``delta``) from ``start`` (default an hour before)."""
    request = ExportMetricsServiceRequest()
    resource_metrics = request.resource_metrics.add()
    resource_metrics.resource.attributes.add(key="service.name").value.string_value = service
    scope_metrics = resource_metrics.scope_metrics.add()
    now = now or time.time_ns()
    start = start or now - 3600 * 10**9
    for name, kind, value in metrics:
        metric = scope_metrics.metrics.add(name=name)
        if kind == "gauge":
            metric.gauge.data_points.add(as_double=value, time_unix_nano=now)
        else:
            metric.sum.is_monotonic = True
            metric.sum.aggregation_temporality = DELTA if delta else CUMULATIVE
            metric.sum.data_points.add(as_double=value, start_time_unix_nano=start, time_unix_nano=now)
    return request.SerializeToString()


def test_two_metric_names_that_become_one_family_keep_the_first_and_count_the_other(
        agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory().start()
    provider = sdk(agent)
    meter = provider.get_meter("shop")
    dotted, underscored = meter.create_counter("req.count"), meter.create_counter("req_count")
    try:
        dotted.add(2)
        assert provider.force_flush(10_000)
        underscored.add(5)  # the next export carries both: req_count would overwrite req.count's series
        assert provider.force_flush(10_000)
        lines = scrape_clean(agent)
        assert of(lines, "req_count") == {
            'req_count_total{instance="cart-1",job="cart",otel_scope_name="shop",otel_scope_version=""} 2.0'}
        assert 'sidetrace_app_metrics_dropped_points_total{reason="name_clash"} 1.0' in lines
    finally:
        provider.shutdown()
    # A name with no character a Prometheus name may hold has no name in the translator (it refuses it): two such
    # gauges would otherwise share one made-up name.
    assert post(agent.otlp_http + "/v1/metrics", raw_metrics(("日本", "gauge", 1), ("中国", "gauge", 2)))[0] == 200
    lines = scrape_clean(agent)
    assert 'sidetrace_app_metrics_dropped_points_total{reason="invalid_name"} 2.0' in lines
    assert not of(lines, "unnamed")


def test_two_apps_whose_metric_names_become_one_family_share_it_and_only_a_series_made_twice_is_refused(
        agent_factory: Callable[..., Agent]) -> None:
    # billing's counter "jobs" and mailer's "jobs.total" are both jobs_total: one family, one TYPE line, a series
    # each (Prometheus sees the same from two exporters of their own). Only billing sending "jobs.total" as well
    # would write one name's points over the other's series: those are refused.
    agent = agent_factory().start()
    assert post(agent.otlp_http + "/v1/metrics", raw_metrics(("jobs", "counter", 3), service="billing"))[0] == 200
    assert post(agent.otlp_http + "/v1/metrics", raw_metrics(("jobs.total", "counter", 4), service="mailer"))[0] \
        == 200
    assert post(agent.otlp_http + "/v1/metrics", raw_metrics(("jobs.total", "counter", 9), service="billing"))[0] \
        == 200
    lines = scrape_clean(agent)
    labels = 'instance="",job="%s",otel_scope_name="",otel_scope_version=""'
    assert of(lines, "jobs") == {f"jobs_total{{{labels % 'billing'}}} 3.0", f"jobs_total{{{labels % 'mailer'}}} 4.0"}
    assert 'sidetrace_app_metrics_dropped_points_total{reason="name_clash"} 1.0' in lines


def test_unit_one_makes_ratio_on_gauges_only_and_per_unit_alone_gives_per(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory().start()
    provider = sdk(agent)
    meter = provider.get_meter("shop")
    meter.create_up_down_counter("queue.fill", unit="1").add(4)
    meter.create_gauge("cpu.utilization", unit="1").set(0.5)
    meter.create_counter("events", unit="1/s").add(7)
    meter.create_gauge("load", unit="{job}/s").set(3)
    try:
        assert provider.force_flush(10_000)
        labels = 'instance="cart-1",job="cart",otel_scope_name="shop",otel_scope_version=""'
        assert of(scrape_clean(agent), "queue_fill", "cpu_utilization", "events", "load") == {
            f"queue_fill{{{labels}}} 4.0", f"cpu_utilization_ratio{{{labels}}} 0.5",
            f"events_per_second_total{{{labels}}} 7.0", f"load_per_second{{{labels}}} 3.0"}
    finally:
        provider.shutdown()


def test_each_drop_reason_is_logged_naming_the_metric_at_most_once_a_minute(
        agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory().start()
    assert post(agent.otlp_http + "/v1/metrics", raw_metrics(("q.len", "gauge", 1), ("q_len", "gauge", 2)))[0] == 200
    assert post(agent.otlp_http + "/v1/metrics", raw_metrics(("q.len", "gauge", 1), ("q_len", "gauge", 2)))[0] == 200
    assert post(agent.otlp_http + "/v1/metrics", raw_metrics(("process.x", "gauge", 1)))[0] == 200
    lines = scrape_clean(agent)
    assert 'sidetrace_app_metrics_dropped_points_total{reason="name_clash"} 2.0' in lines
    assert 'sidetrace_app_metrics_dropped_points_total{reason="reserved_name"} 1.0' in lines
    warnings = wait_until(lambda: [line for line in agent.log().splitlines() if "app metric" in line
                                   and "WARNING" in line and "reserved_name" in line], 10, "the reserved_name log")
    assert len(warnings) == 1 and "'process.x'" in warnings[0]
    (clash,) = [line for line in agent.log().splitlines() if "app metric" in line and "name_clash" in line]
    assert "'q_len'" in clash and "sidetrace_app_metrics_dropped_points_total" in clash


def test_a_sparse_delta_counter_keeps_its_total_while_its_app_sends_anything(
        agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory("[app_metrics]\nstale_seconds = 2\n").start()
    # The app that stops sends first, so its series are older than the other app's gauge.
    assert post(agent.otlp_http + "/v1/metrics", raw_metrics(("errors", "counter", 1), service="idle", delta=True))[0] \
        == 200
    t1 = time.time_ns()
    first = raw_metrics(("errors", "counter", 1), ("temperature", "gauge", 20), delta=True, now=t1)
    assert post(agent.otlp_http + "/v1/metrics", first)[0] == 200

    def stale_gauge_gone() -> set[str] | None:
        # the app keeps sending something else; its gauge, not updated, goes after stale_seconds
        assert post(agent.otlp_http + "/v1/metrics", raw_metrics(("heartbeat", "gauge", 1)))[0] == 200
        lines = scrape_clean(agent)
        return None if of(lines, "temperature") else lines

    lines = wait_until(stale_gauge_gone, 30, "the app's stale gauge expired", interval=0.3)
    # the delta counter of the app that still sends stays; that of the app that stopped went with its gauge
    labels = 'instance="",job="%s",otel_scope_name="",otel_scope_version=""'
    assert of(lines, "errors") == {f"errors_total{{{labels % 'worker'}}} 1.0"}
    # the next delta follows on: the total goes on from 1, where a new series would start at 1 (a reset to
    # Prometheus, and no increase at all when the old value is older than the range queried)
    assert post(agent.otlp_http + "/v1/metrics", raw_metrics(("errors", "counter", 1), delta=True, start=t1))[0] == 200
    assert of(scrape_clean(agent), "errors") == {f"errors_total{{{labels % 'worker'}}} 2.0"}
