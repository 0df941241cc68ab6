"""Exponential histogram points: bucket mapping, merging, native-histogram conversion, and their two expositions."""

from __future__ import annotations

from pathlib import Path

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.samples import BucketSpan, NativeHistogram

from sidetrace.agent import protobuf_exposition
from sidetrace.agent.app_metrics import AppMetrics
from sidetrace.agent.exponential import Buckets, ExponentialPoint, bucket_index, upper_bound
from sidetrace.config import AppMetricsSection, RemoteWriteExporterSection
from sidetrace.exporters.delivery import DeliveryStats
from sidetrace.exporters.remote_write import RemoteWriteExporter, WriteRequest
from sidetrace.exporters.spool import Spool

DELTA = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE


def test_bucket_index_follows_the_data_model_including_exact_powers_of_two() -> None:
    assert bucket_index(1.0, 0) == -1  # (0.5, 1]: a boundary belongs to the bucket below it
    assert bucket_index(3.0, 1) == 3  # (2**1.5, 4]
    assert bucket_index(4.0, 1) == 3
    assert bucket_index(4.5, 1) == 4
    assert bucket_index(5.0, -1) == 1  # (4, 16]
    assert bucket_index(4.0, -1) == 0  # (1, 4]
    assert bucket_index(0.3, 0) == -2  # (0.25, 0.5]
    assert upper_bound(-2, 0) == 0.5 and upper_bound(3, 1) == 4.0


def test_scales_above_8_are_lowered_to_schema_8_with_buckets_merged_and_renumbered_by_upper_bound() -> None:
    point = ExponentialPoint(scale=10, count=15, sum=20.0, positive=Buckets(1020, [1, 2, 3, 4, 5]))
    # 1020..1023 >> 2 = 255 and 1024 >> 2 = 256; native indices are one more (upper bound numbering)
    assert point.native() == NativeHistogram(15, 20.0, 8, 0.0, 0, [BucketSpan(256, 2)], [], [10, -5], [])


def test_negative_buckets_zero_bucket_and_gaps_become_spans_and_deltas() -> None:
    point = ExponentialPoint(scale=9, count=10, sum=-1.5, zero_threshold=1e-9, zero_count=3,
                             positive=Buckets(0, [1, 0, 0, 3]), negative=Buckets(-3, [1, 0, 2]))
    assert point.native() == NativeHistogram(
        10, -1.5, 8, 1e-9, 3,
        [BucketSpan(1, 2)], [BucketSpan(-1, 2)],  # positive 0,3 >> 1 = 0,1; negative -3,-1 >> 1 = -2,-1
        [1, 2], [1, 1])
    gaps = ExponentialPoint(scale=3, count=4, sum=9.0, positive=Buckets(0, [1, 0, 0, 3]))
    assert gaps.native() == NativeHistogram(4, 9.0, 3, 0.0, 0, [BucketSpan(1, 1), BucketSpan(2, 1)], [], [1, 2], [])


def test_a_point_without_buckets_carries_a_no_op_span_and_a_zero_threshold_so_it_stays_native() -> None:
    assert ExponentialPoint(scale=2, count=0, sum=0.0).native() == NativeHistogram(
        0, 0.0, 2, 2.0**-128, 0, [BucketSpan(0, 0)], [], [], [])
    assert ExponentialPoint(scale=2, count=1, sum=0.0, zero_count=1).native() == NativeHistogram(
        1, 0.0, 2, 0.0, 1, [BucketSpan(0, 0)], [], [], [])


def test_merging_points_of_different_scales_downscales_to_the_lower_one() -> None:
    cumulative = ExponentialPoint(scale=2, count=2, sum=3.0, positive=Buckets(4, [1, 1]),
                                  negative=Buckets(-1, [5]))
    delta = ExponentialPoint(scale=1, count=4, sum=6.0, positive=Buckets(1, [3]), negative=Buckets(0, [1]))
    assert cumulative.merged(delta) == ExponentialPoint(
        scale=1, count=6, sum=9.0, positive=Buckets(1, [3, 2]), negative=Buckets(-1, [5, 1]))
    assert delta.merged(cumulative) == cumulative.merged(delta)


def test_merging_widens_the_narrower_zero_bucket_to_a_bucket_boundary() -> None:
    narrow = ExponentialPoint(scale=0, count=3, sum=1.75, positive=Buckets(-2, [1, 1, 1]))
    wide = ExponentialPoint(scale=0, count=2, sum=0.1, zero_threshold=0.3, zero_count=2)
    # 0.3 falls in bucket -2, (0.25, 0.5]: it joins the zero bucket, whose threshold becomes 0.5
    assert narrow.merged(wide) == ExponentialPoint(scale=0, count=5, sum=1.85, zero_threshold=0.5, zero_count=3,
                                                   positive=Buckets(-1, [1, 1]))


def test_merging_lowers_the_scale_while_one_sign_would_span_more_than_160_buckets() -> None:
    merged = ExponentialPoint(scale=3, count=1, sum=1.0, positive=Buckets(0, [1])).merged(
        ExponentialPoint(scale=3, count=1, sum=1.0, positive=Buckets(200, [1])))
    assert (merged.scale, merged.positive.offset, len(merged.positive.counts)) == (2, 0, 101)
    assert (merged.positive.counts[0], merged.positive.counts[100], sum(merged.positive.counts)) == (1, 1, 2)


def exponential_request(scale: int, offset: int, counts: list[int], temporality: int = CUMULATIVE,
                        zero_count: int = 0, start: int = 0, end: int = 0) -> ExportMetricsServiceRequest:
    request = ExportMetricsServiceRequest()
    resource_metrics = request.resource_metrics.add()
    kv = resource_metrics.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", "worker"
    scope = resource_metrics.scope_metrics.add()
    scope.scope.name, scope.scope.version = "shop", "1.0"
    metric = scope.metrics.add()
    metric.name, metric.unit = "latency", "ms"
    metric.exponential_histogram.aggregation_temporality = temporality
    point = metric.exponential_histogram.data_points.add()
    point.scale, point.count, point.sum, point.zero_count = scale, sum(counts) + zero_count, 10.0, zero_count
    point.positive.offset = offset
    point.positive.bucket_counts.extend(counts)
    point.start_time_unix_nano, point.time_unix_nano = start, end
    return request


def native_sample(store: AppMetrics) -> NativeHistogram:
    token = protobuf_exposition.NATIVE_HISTOGRAMS.set(True)
    try:
        (family,) = [family for family in store.families() if family.name == "latency_milliseconds"]
    finally:
        protobuf_exposition.NATIVE_HISTOGRAMS.reset(token)
    (sample,) = family.samples
    assert sample.labels == {"job": "worker", "instance": "", "otel_scope_name": "shop", "otel_scope_version": "1.0"}
    return sample.native_histogram


def test_the_store_merges_delta_points_and_takes_cumulative_ones_as_sent() -> None:
    store = AppMetrics(AppMetricsSection())
    assert store.apply(exponential_request(3, 8, [1, 2], DELTA, start=10, end=20)) == 1
    assert store.apply(exponential_request(2, 4, [4], DELTA, zero_count=1, start=20, end=30)) == 1
    assert native_sample(store) == NativeHistogram(8, 20.0, 2, 0.0, 1, [BucketSpan(5, 1)], [], [7], [])
    # sent again, or overlapping what was added: dropped and counted, as every delta kind is
    assert store.apply(exponential_request(2, 4, [4], DELTA, zero_count=1, start=20, end=30)) == 0
    assert store.apply(exponential_request(2, 4, [4], DELTA, start=25, end=40)) == 0
    assert store.dropped == {"delta_overlap": 2}
    assert native_sample(store) == NativeHistogram(8, 20.0, 2, 0.0, 1, [BucketSpan(5, 1)], [], [7], [])
    cumulative = AppMetrics(AppMetricsSection())
    cumulative.apply(exponential_request(3, 8, [1, 2]))
    cumulative.apply(exponential_request(3, 8, [2, 2]))
    assert native_sample(cumulative) == NativeHistogram(4, 10.0, 3, 0.0, 0, [BucketSpan(9, 2)], [], [2, 0], [])


def test_a_cumulative_point_older_than_its_series_or_as_old_with_other_buckets_is_dropped() -> None:
    store = AppMetrics(AppMetricsSection())
    assert store.apply(exponential_request(3, 8, [2, 2], start=10, end=30)) == 1
    assert store.apply(exponential_request(3, 8, [1, 2], start=10, end=20)) == 0  # older: would go back in time
    assert store.apply(exponential_request(3, 8, [2, 3], start=10, end=30)) == 0  # as old, other buckets
    assert store.apply(exponential_request(3, 8, [2, 2], start=10, end=30)) == 1  # the same point again: no change
    assert store.dropped == {"out_of_order": 2}
    assert native_sample(store) == NativeHistogram(4, 10.0, 3, 0.0, 0, [BucketSpan(9, 2)], [], [2, 0], [])


def test_text_and_remote_write_leave_exponential_series_out_and_count_them_per_series_each_time() -> None:
    store = AppMetrics(AppMetricsSection())
    store.apply(exponential_request(3, 8, [1, 2]))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(store)
    for scrape in (1, 2):
        text = generate_latest(registry).decode()
        assert "latency" not in text
        assert f'sidetrace_app_metrics_dropped_points_total{{reason="exponential_histogram"}} {scrape}.0' in text
    protobuf_exposition.encode(registry)  # carried there: not counted
    assert store.dropped == {"exponential_histogram": 2}
    unopened = Spool(Path("/nonexistent/spool.db"), max_bytes=1)  # collect() writes nothing
    exporter = RemoteWriteExporter(RemoteWriteExporterSection(name="rw"), unopened, lambda _: DeliveryStats(),
                                   metrics=registry.collect)
    body, _ = exporter.collect(1_700_000_000.0)
    names = {label.value for series in WriteRequest.FromString(body).timeseries for label in series.labels
             if label.name == "__name__"}
    assert "sidetrace_app_metrics_dropped_points_total" in names and not any("latency" in name for name in names)
    assert store.dropped == {"exponential_histogram": 3}


def test_exponential_series_count_against_max_series_and_expire_like_the_others() -> None:
    store = AppMetrics(AppMetricsSection(max_series=2, stale_seconds=60))
    store.apply(exponential_request(3, 8, [1, 2]))  # a series, and target_info beside it (not counted)
    request = exponential_request(3, 8, [1, 2])
    point = request.resource_metrics[0].scope_metrics[0].metrics[0].exponential_histogram.data_points[0]
    for route in ("/a", "/b"):
        kv = point.attributes.add()
        kv.key, kv.value.string_value = "route", route
        store.apply(request)
        del point.attributes[:]
    assert store.series_count == 2 and store.dropped == {"max_series": 1}
    store.expire(now=10**12)
    assert store.series_count == 0
    store.apply(exponential_request(3, 8, [1]))  # the name is free again, with its claims
    assert store.series_count == 1


def test_a_classic_and_an_exponential_histogram_of_one_name_conflict_as_types_do() -> None:
    store = AppMetrics(AppMetricsSection())
    store.apply(exponential_request(3, 8, [1, 2]))
    classic = exponential_request(3, 8, [1])
    metric = classic.resource_metrics[0].scope_metrics[0].metrics[0]
    metric.histogram.data_points.add(count=1, sum=1.0, bucket_counts=[1, 0], explicit_bounds=[2.0])
    assert store.apply(classic) == 0 and store.dropped == {"type_conflict": 1}


def test_points_of_a_scale_below_minus_4_are_refused_and_counted() -> None:
    store = AppMetrics(AppMetricsSection())
    assert store.apply(exponential_request(-5, 0, [1])) == 0
    assert store.series_count == 0 and store.dropped == {"exponential_histogram_scale": 1}


def decode(body: bytes) -> list:
    families, position = [], 0
    while position < len(body):
        length = shift = 0
        while True:
            byte = body[position]
            position += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        families.append(protobuf_exposition.MetricFamily.FromString(body[position:position + length]))
        position += length
    return families


class Fixed:
    def __init__(self, *families: object) -> None:
        self.families = families

    def collect(self):  # noqa: ANN201
        return iter(self.families)


def test_protobuf_families_carry_the_text_formats_names_types_and_values() -> None:
    counter = CounterMetricFamily("jobs", "Jobs.", labels=["queue"], created=1700000000.5)
    counter.add_metric(["a"], 3, created=1700000000.5)
    counter.add_sample("jobs_created", {"queue": "lone"}, 1700000001.0)  # no series carries it: a gauge, as in text
    gauge = GaugeMetricFamily("depth", "Depth.", labels=["queue", "empty"])
    gauge.add_metric(["a", ""], 2.5)
    histogram = HistogramMetricFamily("lat", "Latency.", labels=["route"])
    histogram.add_metric(["/"], [("1.0", 1), ("+Inf", 3)], 4.5)
    histogram.add_sample("lat_created", {"route": "/"}, 1700000002.25)
    info = InfoMetricFamily("build", "Build.", value={"version": "1"})
    summary = SummaryMetricFamily("wait", "Wait.", labels=["queue"])
    summary.add_sample("wait", {"queue": "a", "quantile": "0.5"}, 1.5)
    summary.add_sample("wait", {"queue": "a", "quantile": "0.99"}, 9.0)
    summary.add_sample("wait_sum", {"queue": "a"}, 30.0)
    summary.add_sample("wait_count", {"queue": "a"}, 12)
    summary.add_sample("wait_created", {"queue": "a"}, 1700000003.0)
    body = protobuf_exposition.encode(Fixed(counter, gauge, histogram, info, summary))
    families = {family.name: family for family in decode(body)}
    assert sorted(families) == ["build_info", "depth", "jobs_created", "jobs_total", "lat", "wait"]
    (jobs,) = families["jobs_total"].metric
    assert (families["jobs_total"].type, [(p.name, p.value) for p in jobs.label], jobs.counter.value) == (
        protobuf_exposition.COUNTER, [("queue", "a")], 3.0)
    # a counter's, histogram's or summary's _created is its created_timestamp (as client_golang writes it), not a series
    assert (jobs.counter.created_timestamp.seconds, jobs.counter.created_timestamp.nanos) == (1700000000, 500_000_000)
    (lone,) = families["jobs_created"].metric
    assert [(p.name, p.value) for p in lone.label] == [("queue", "lone")] and lone.gauge.value == 1700000001.0
    (depth,) = families["depth"].metric
    # an empty label is written, as the text format writes it (with honor_labels, instance="" keeps the target's out)
    assert [(p.name, p.value) for p in depth.label] == [("empty", ""), ("queue", "a")] and depth.gauge.value == 2.5
    (lat,) = families["lat"].metric
    assert (lat.histogram.sample_count, lat.histogram.sample_sum) == (3, 4.5)
    assert [(b.upper_bound, b.cumulative_count) for b in lat.histogram.bucket] == [(1.0, 1), (float("inf"), 3)]
    assert not lat.histogram.HasField("schema")  # a classic histogram stays classic
    assert (lat.histogram.created_timestamp.seconds, lat.histogram.created_timestamp.nanos) == (1700000002, 250_000_000)
    (wait,) = families["wait"].metric
    assert families["wait"].type == protobuf_exposition.SUMMARY and [(p.name, p.value) for p in wait.label] == [
        ("queue", "a")]
    assert [(q.quantile, q.value) for q in wait.summary.quantile] == [(0.5, 1.5), (0.99, 9.0)]
    assert (wait.summary.sample_count, wait.summary.sample_sum) == (12, 30.0)
    assert wait.summary.created_timestamp.seconds == 1700000003
    (build,) = families["build_info"].metric
    assert [(p.name, p.value) for p in build.label] == [("version", "1")] and build.gauge.value == 1.0


def test_accept_headers_choose_protobuf_only_when_asked_first() -> None:
    prometheus_native = ("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;"
                         "q=0.8,application/openmetrics-text;version=1.0.0;q=0.6,text/plain;version=0.0.4;q=0.4,"
                         "*/*;q=0.1")
    assert protobuf_exposition.accepts_protobuf(prometheus_native)
    assert not protobuf_exposition.accepts_protobuf("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")
    assert not protobuf_exposition.accepts_protobuf("application/vnd.google.protobuf;proto=io.prometheus.client."
                                                    "MetricFamily;encoding=text")
    assert not protobuf_exposition.accepts_protobuf("")
