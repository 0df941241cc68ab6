"""App metrics against the OpenTelemetry "Prometheus and OpenMetrics Compatibility" specification, point by point:
the stock SDK and raw OTLP requests sent to a real agent, and the exact lines of its /metrics, each scrape checked
by ``promtool check metrics``."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider, ObservableCounter
from opentelemetry.sdk.metrics.export import AggregationTemporality as SdkTemporality
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from tests.conftest import Agent, scrape_clean
from tests.integration.test_otlp_input import post

DELTA = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA


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
               "exponential_histogram", "exponential_histogram_scale", "delta_overlap")
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
