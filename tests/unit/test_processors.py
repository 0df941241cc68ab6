from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from prometheus_client import CollectorRegistry, generate_latest

from sidetrace._protowire import varint
from sidetrace.agent.app_metrics import AppMetrics, label_name, metric_name
from sidetrace.agent.pipeline import span_count
from sidetrace.agent.processors import redaction
from sidetrace.agent.processors.redaction import BytePrefilter, HyperscanPrefilter, RedactionProcessor, _needles
from sidetrace.agent.processors.resource import ResourceProcessor, container_id
from sidetrace.agent.processors.span_metrics import SpanMetricsProcessor
from sidetrace.agent.recent import RecentTraces
from sidetrace.config import (
    AppMetricsSection,
    RecentTracesSection,
    RedactionProcessorSection,
    ResourceProcessorSection,
    SpanMetricsProcessorSection,
)
from tests.conftest import assert_promtool_clean


def traces(*spans: tuple[str, str, bytes, int], attributes: dict[str, str] | None = None) -> ExportTraceServiceRequest:
    """A request with one resource per distinct service; spans are (service, name, trace_id, duration_ms)."""
    request = ExportTraceServiceRequest()
    by_service = {}
    for service, name, trace_id, duration_ms in spans:
        if service not in by_service:
            resource_spans = request.resource_spans.add()
            kv = resource_spans.resource.attributes.add()
            kv.key, kv.value.string_value = "service.name", service
            by_service[service] = resource_spans.scope_spans.add()
        span = by_service[service].spans.add()
        span.name, span.trace_id = name, trace_id
        span.span_id = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans).to_bytes(8, "big")
        span.start_time_unix_nano, span.end_time_unix_nano = 10**9, 10**9 + duration_ms * 10**6
        for key, value in (attributes or {}).items():
            kv = span.attributes.add()
            kv.key, kv.value.string_value = key, value
    return request


def exposition(collector: object) -> set[str]:
    """The sample lines ``collector`` exposes, after ``promtool check metrics`` found the exposition clean."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert_promtool_clean(text)
    return {line for line in text.splitlines() if not line.startswith("#")}


class Families:
    def __init__(self, source: object) -> None:
        self.source = source

    def collect(self):  # noqa: ANN201
        return self.source.families()


def test_span_metrics_histogram_and_calls() -> None:
    processor = SpanMetricsProcessor(SpanMetricsProcessorSection())
    processor.apply(traces(("cart", "GET /", b"t" * 16, 3), ("cart", "GET /", b"t" * 16, 120)))
    lines = exposition(Families(processor))
    labels = 'service_name="cart",span_kind="SPAN_KIND_UNSPECIFIED",span_name="GET /",status_code="STATUS_CODE_UNSET"'
    assert f"traces_span_metrics_calls_total{{{labels}}} 2.0" in lines
    assert f'traces_span_metrics_duration_milliseconds_bucket{{le="2",{labels}}} 0.0' in lines
    assert f'traces_span_metrics_duration_milliseconds_bucket{{le="4",{labels}}} 1.0' in lines
    assert f'traces_span_metrics_duration_milliseconds_bucket{{le="200",{labels}}} 2.0' in lines
    assert f"traces_span_metrics_duration_milliseconds_sum{{{labels}}} 123.0" in lines


def test_span_metrics_bucket_bounds_are_inclusive_and_a_span_ending_before_it_starts_counts_as_zero() -> None:
    processor = SpanMetricsProcessor(SpanMetricsProcessorSection())
    request = traces(("cart", "GET /", b"t" * 16, 2), ("cart", "GET /", b"t" * 16, 0))
    skewed = request.resource_spans[0].scope_spans[0].spans[1]
    skewed.end_time_unix_nano = skewed.start_time_unix_nano - 5 * 10**6
    processor.apply(request)
    lines = exposition(Families(processor))
    labels = 'service_name="cart",span_kind="SPAN_KIND_UNSPECIFIED",span_name="GET /",status_code="STATUS_CODE_UNSET"'
    assert f'traces_span_metrics_duration_milliseconds_bucket{{le="2",{labels}}} 2.0' in lines
    assert f"traces_span_metrics_duration_milliseconds_sum{{{labels}}} 2.0" in lines


def test_span_metrics_overflow_is_capped_and_counted() -> None:
    processor = SpanMetricsProcessor(SpanMetricsProcessorSection(max_series=3))
    processor.apply(traces(*(("cart", f"GET /item/{i}", b"t" * 16, 1) for i in range(10))))
    lines = exposition(Families(processor))
    calls = sorted(line for line in lines if line.startswith("traces_span_metrics_calls_total"))
    assert len(calls) == 4
    assert any('span_name="__overflow__"' in line and line.endswith(" 7.0") for line in calls)
    assert "sidetrace_span_metrics_overflow_spans_total 7.0" in lines


def test_redaction_by_key_and_pattern_keeps_other_values() -> None:
    processor = RedactionProcessor(RedactionProcessorSection())
    request = traces(("cart", "op", b"t" * 16, 1), attributes={
        "Authorization": "Bearer x", "db.password": "p", "user.api_key": "k", "gen_ai.usage.input_tokens": "12",
        "http.route": "/cart"})
    processor.apply(request)
    attributes = {kv.key: kv.value.string_value for kv in request.resource_spans[0].scope_spans[0].spans[0].attributes}
    assert attributes == {"Authorization": "[REDACTED]", "db.password": "[REDACTED]", "user.api_key": "[REDACTED]",
                          "gen_ai.usage.input_tokens": "12", "http.route": "/cart"}
    assert processor.redacted == 3


def test_resource_processor_never_overrides_the_app() -> None:
    processor = ResourceProcessor(ResourceProcessorSection(attributes={"deployment.environment": "prod"}))
    request = traces(("cart", "op", b"t" * 16, 1))
    kv = request.resource_spans[0].resource.attributes.add()
    kv.key, kv.value.string_value = "host.name", "set-by-app"
    processor.apply(request)
    attributes = {kv.key: kv.value.string_value for kv in request.resource_spans[0].resource.attributes}
    assert attributes["host.name"] == "set-by-app"
    assert attributes["os.type"] == "linux" and attributes["deployment.environment"] == "prod"
    assert attributes["sidetrace.agent.version"] == "0.1.0"


_ATTRIBUTE_VALUES = st.one_of(st.text(max_size=12), st.integers(-2**63, 2**63 - 1), st.booleans())


@settings(max_examples=300, deadline=None, derandomize=True)
@given(resources=st.lists(st.tuples(
    st.dictionaries(st.sampled_from(["service.name", "host.name", "os.type", "k8s.pod.name", "x"]), st.text(max_size=8),
                    max_size=4),
    st.booleans(),  # the resource sent in two parts (the same field twice), as protobuf allows
    st.lists(st.tuples(st.text(max_size=10), st.dictionaries(st.text(max_size=6), _ATTRIBUTE_VALUES, max_size=3)),
             max_size=4)), max_size=4))
def test_enriching_the_encoded_request_equals_enriching_the_decoded_one(resources: list) -> None:
    processor = ResourceProcessor(ResourceProcessorSection(attributes={"deployment.environment": "prod"}))
    parts = []
    for number, (attributes, split, spans) in enumerate(resources):
        resource_spans = ExportTraceServiceRequest().resource_spans.add()
        for key, value in attributes.items():
            kv = resource_spans.resource.attributes.add()
            kv.key, kv.value.string_value = key, value
        scope = resource_spans.scope_spans.add()
        for position, (name, span_attributes) in enumerate(spans):
            span = scope.spans.add()
            span.trace_id, span.span_id, span.name = bytes([number + 1]) * 16, bytes([position + 1]) * 8, name
            for key, value in span_attributes.items():
                kv = span.attributes.add()
                kv.key = key
                if isinstance(value, bool):
                    kv.value.bool_value = value
                elif isinstance(value, int):
                    kv.value.int_value = value
                else:
                    kv.value.string_value = value
        encoded = resource_spans.SerializeToString()
        if split:  # the resource once more, as a second resource field: protobuf merges the two
            resource = resource_spans.resource.SerializeToString()
            encoded += b"\x0a" + varint(len(resource)) + resource
        parts.append(b"\x0a" + varint(len(encoded)) + encoded)
    raw = b"".join(parts)
    decoded = ExportTraceServiceRequest.FromString(raw)
    processor.apply(decoded)
    enriched = processor.enrich_encoded(raw)
    assert enriched is not None
    assert ExportTraceServiceRequest.FromString(enriched) == decoded


def test_enriching_an_encoding_it_cannot_read_falls_back_to_decoding() -> None:
    processor = ResourceProcessor(ResourceProcessorSection())
    assert processor.enrich_encoded(b"\x0a\x05ab") is None  # a field longer than the message
    assert processor.enrich_encoded(b"\x0b") is None  # a group (wire type 3)


def test_container_id_from_cgroup_v1_and_v2_mountinfo() -> None:
    cid = "a" * 64
    assert container_id(f"12:pids:/docker/{cid}\n", "") == cid
    assert container_id("0::/\n", f"1 2 0:3 /var/lib/docker/containers/{cid}/hostname /etc/hostname rw\n") == cid
    assert container_id("0::/user.slice\n", "1 2 0:3 / / rw\n") == ""


def keep(recent: RecentTraces, request: ExportTraceServiceRequest) -> None:
    recent.add(request.SerializeToString(), span_count(request))


def test_recent_traces_bounds_and_summaries() -> None:
    recent = RecentTraces(RecentTracesSection(max_traces=2, max_spans_per_trace=2, max_spans=100))
    keep(recent, traces(("a", "one", b"1" * 16, 5)))
    keep(recent, traces(("a", "two", b"2" * 16, 50), ("b", "two-b", b"2" * 16, 7), ("b", "extra", b"2" * 16, 1)))
    keep(recent, traces(("c", "three", b"3" * 16, 1)))
    listed = recent.list()
    assert [t["root_name"] for t in listed] == ["three", "two"]  # max_traces: "one" is not listed
    assert listed[1]["span_count"] == 2 and listed[1]["spans_dropped"] == 1  # max_spans_per_trace
    assert [t["trace_id"] for t in recent.list(service="b")] == [(b"2" * 16).hex()]
    assert [t["root_name"] for t in recent.list(min_duration_ms=10)] == ["two"]
    assert recent.get((b"1" * 16).hex())["root_name"] == "one"  # still held, just past max_traces in a listing
    assert recent.get("not hex") is None and recent.get((b"9" * 16).hex()) is None
    assert recent.span_count == 5 and recent.dropped_spans == 0


def test_recent_traces_let_the_oldest_requests_go_at_max_spans_and_max_bytes() -> None:
    recent = RecentTraces(RecentTracesSection(max_spans=3))
    keep(recent, traces(("a", "one", b"1" * 16, 5)))
    keep(recent, traces(("a", "two", b"2" * 16, 5), ("a", "two", b"2" * 16, 5), ("a", "two", b"2" * 16, 5)))
    assert recent.span_count == 3 and recent.dropped_spans == 1
    keep(recent, traces(("a", "three", b"3" * 16, 5)))
    assert recent.span_count == 1 and recent.dropped_spans == 4
    assert [t["root_name"] for t in recent.list()] == ["three"]
    request = traces(("a", "big", b"4" * 16, 5), attributes={"payload": "x" * 1000})
    size = len(request.SerializeToString())
    sized = RecentTraces(RecentTracesSection(max_bytes=2 * size))
    for _ in range(5):
        keep(sized, request)
    assert sized.span_count == 2 and sized.dropped_spans == 3


def test_recent_traces_show_a_span_received_twice_once() -> None:
    recent = RecentTraces(RecentTracesSection())
    request = traces(("a", "root", b"1" * 16, 5), ("a", "child", b"1" * 16, 2))
    for _ in range(3):  # an SDK retrying, or the agent re-sending after a crash
        keep(recent, request)
    (summary,) = recent.list()
    assert summary["span_count"] == 2
    assert [span["name"] for span in recent.get((b"1" * 16).hex())["spans"]] == ["root", "child"]


def metrics_request(kind: str, value: float, temporality: int = 0, name: str = "jobs.done", unit: str = "{job}",
                    service: str = "worker") -> ExportMetricsServiceRequest:
    request = ExportMetricsServiceRequest()
    resource_metrics = request.resource_metrics.add()
    kv = resource_metrics.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", service
    scope_metrics = resource_metrics.scope_metrics.add()
    scope_metrics.scope.name, scope_metrics.scope.version = "jobs", "1.0"
    metric = scope_metrics.metrics.add()
    metric.name, metric.unit = name, unit
    if kind == "sum":
        metric.sum.is_monotonic = True
        metric.sum.aggregation_temporality = temporality
        metric.sum.data_points.add().as_double = value
    elif kind == "gauge":
        metric.gauge.data_points.add().as_int = int(value)
    else:
        point = metric.histogram.data_points.add()
        metric.histogram.aggregation_temporality = temporality
        point.explicit_bounds.extend([1.0, 10.0])
        point.bucket_counts.extend([1, 1, 0])
        point.count, point.sum = 2, value
    return request


def test_delta_sums_and_histograms_accumulate_cumulative_taken_as_sent() -> None:
    store = AppMetrics(AppMetricsSection())
    delta = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
    store.apply(metrics_request("sum", 2, delta))
    store.apply(metrics_request("sum", 3, delta))
    store.apply(metrics_request("histogram", 5.5, delta, name="latency", unit="s"))
    store.apply(metrics_request("histogram", 4.5, delta, name="latency", unit="s"))
    store.apply(metrics_request("gauge", 9, name="queue.size", unit="1"))
    lines = exposition(Families(store))
    labels = 'instance="",job="worker",otel_scope_name="jobs",otel_scope_version="1.0"'
    assert f'jobs_done_total{{{labels}}} 5.0' in lines
    bucket = 'latency_seconds_bucket{instance="",job="worker",le="%s",otel_scope_name="jobs",otel_scope_version="1.0"}'
    assert bucket % "1.0" + " 2.0" in lines
    assert bucket % "+Inf" + " 4.0" in lines
    assert f'latency_seconds_sum{{{labels}}} 10.0' in lines
    assert f'queue_size_ratio{{{labels}}} 9.0' in lines


def test_stale_series_expire_and_bounds_are_counted() -> None:
    store = AppMetrics(AppMetricsSection(max_series=1, stale_seconds=60))
    store.apply(metrics_request("gauge", 1, name="a"))
    store.apply(metrics_request("gauge", 1, name="b"))  # over max_series
    store.apply(metrics_request("gauge", 1, name="process.cpu.time", unit="s"))  # reserved
    store.apply(metrics_request("gauge", 1, name="target.info"))  # the agent's own target_info
    assert store.series_count == 1 and store.dropped == {"max_series": 1, "reserved_name": 2}
    store.expire(now=10**12)
    assert store.series_count == 0
    assert not any(line.startswith("a{") for line in exposition(Families(store)))


def test_metric_names_follow_the_prometheus_translation() -> None:
    assert metric_name("http.server.request.duration", "s", gauge=False) == "http_server_request_duration_seconds"
    assert metric_name("net.io", "By/s", gauge=True) == "net_io_bytes_per_second"
    assert metric_name("requests", "{request}", gauge=False) == "requests"
    assert metric_name("cpu.utilization", "1", gauge=True) == "cpu_utilization_ratio"
    assert metric_name("size_bytes", "By", gauge=True) == "size_bytes"
    assert metric_name("2xx.count", "", gauge=False) == "_2xx_count"


def test_unit_one_adds_ratio_to_gauges_only_and_nothing_before_a_per_unit() -> None:
    # as the translator (BuildCompliantName, otlptranslator): "_ratio" on Gauges only; "1/s" is "per_second"
    assert metric_name("queue.fill", "1", gauge=False) == "queue_fill"  # an up-down counter, a non-monotonic sum
    assert metric_name("events", "1/s", gauge=False, counter=True) == "events_per_second"
    assert metric_name("load", "1/s", gauge=True) == "load_per_second"
    assert metric_name("日本", "s", gauge=True) == ""  # no valid character: refused (invalid_name)


def test_label_names_follow_the_translator_and_never_start_with_two_underscores() -> None:
    assert [label_name(key) for key in ("http.method", "2xx", "_tenant", "__name__", "__", "", "a__b..c", "2__x")] \
        == ["http_method", "key_2xx", "key_tenant", "key_name_", "key_", "", "a_b_c", "key_2_x"]


def test_a_family_claimed_by_one_metric_name_is_given_to_another_once_its_series_expire() -> None:
    store = AppMetrics(AppMetricsSection(stale_seconds=60))
    store.apply(metrics_request("gauge", 1, name="q.len"))
    store.apply(metrics_request("gauge", 2, name="q_len"))
    assert store.dropped == {"name_clash": 1}
    store.expire(now=10**12)
    store.apply(metrics_request("gauge", 3, name="q_len"))
    assert store.dropped == {"name_clash": 1}
    assert 'q_len{instance="",job="worker",otel_scope_name="jobs",otel_scope_version="1.0"} 3.0' in \
        exposition(Families(store))


def test_suffixes_are_added_only_when_the_name_lacks_them() -> None:
    assert metric_name("jobs.total", "", gauge=False, counter=True) == "jobs"  # exposed as jobs_total
    assert metric_name("bytes.sent", "By", gauge=False, counter=True) == "bytes_sent"  # exposed as bytes_sent_total
    assert metric_name("net.bytes_per_second.in", "By/s", gauge=True) == "net_bytes_per_second_in"
    assert metric_name("jobs.total", "", gauge=True) == "jobs_total"  # a gauge has no _total to double


def test_clashing_names_reserved_labels_and_colliding_keys_keep_the_exposition_valid() -> None:
    store = AppMetrics(AppMetricsSection())
    request = ExportMetricsServiceRequest()
    resource_metrics = request.resource_metrics.add()
    kv = resource_metrics.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", "worker"
    scope = resource_metrics.scope_metrics.add()

    def add(name: str, kind: str, unit: str = "", **attributes: str):  # noqa: ANN202
        metric = scope.metrics.add()
        metric.name, metric.unit = name, unit
        data = getattr(metric, kind)
        if kind == "sum":
            data.is_monotonic = True
            data.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
        point = data.data_points.add()
        if kind == "histogram":
            point.explicit_bounds.append(1.0)
            point.bucket_counts.extend([1, 0])
            point.count, point.sum = 1, 0.5
        else:
            point.as_int = 6
        for key, value in attributes.items():
            attribute = point.attributes.add()
            attribute.key, attribute.value.string_value = key.replace("__", "."), value
        return metric

    add("foo", "sum")
    add("foo_total", "gauge")  # clashes with the counter's foo_total sample
    add("lat", "histogram")
    add("lat_count", "gauge")  # clashes with the histogram's lat_count sample
    add("jobs.total", "sum")
    add("bytes.sent", "sum", unit="By")
    add("queue", "gauge", job="intruder", instance="x", le="0.5", a__b="dot")
    scope.metrics[-1].gauge.data_points[0].attributes.add(key="a-b").value.string_value = "dash"
    add("lat.attr", "histogram", le="7")
    taken = store.apply(request)
    assert (taken, store.dropped) == (6, {"name_clash": 2})

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families(store))
    text = generate_latest(registry).decode()
    assert_promtool_clean(text)
    lines = {line for line in text.splitlines() if not line.startswith("#")}
    labels = 'instance="",job="worker",otel_scope_name="",otel_scope_version=""'
    assert f'foo_total{{{labels}}} 6.0' in lines
    assert f'jobs_total{{{labels}}} 6.0' in lines
    assert f'bytes_sent_total{{{labels}}} 6.0' in lines
    assert f'queue{{a_b="dash;dot",{labels}}} 6.0' in lines
    assert 'lat_attr_bucket{instance="",job="worker",le="1.0",otel_scope_name="",otel_scope_version=""} 1.0' in lines
    assert f'lat_count{{{labels}}} 1.0' in lines
    assert not any(line.startswith(("foo_total_total", "jobs_total_total", "bytes_sent_bytes")) for line in lines)
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)) and "# TYPE foo_total counter" in text.splitlines()
    assert 'sidetrace_app_metrics_dropped_points_total{reason="name_clash"} 2.0' in lines

    store.expire(now=10**12)  # the families expire, and with them their claim on the names
    again = ExportMetricsServiceRequest()
    again.CopyFrom(request)
    del again.resource_metrics[0].scope_metrics[0].metrics[0]  # now foo_total the gauge comes first
    assert store.apply(again) == 6 and store.dropped == {"name_clash": 3}


def test_redaction_prefilter_skips_clean_requests_and_never_misses_a_sensitive_key() -> None:
    processor = RedactionProcessor(RedactionProcessorSection())
    clean = traces(("cart", "op", b"t" * 16, 1), attributes={"http.route": "/api/items", "mon": "1"})
    processor.apply(clean, clean.SerializeToString())
    assert processor.skipped_requests == 1 and processor.redacted == 0
    for key in ("X-Api-Key", "Set-Cookie", "session_token", "client.credentials", "PRIVATE-KEY", "userPassword"):
        request = traces(("cart", "op", b"t" * 16, 1), attributes={key: "v"})
        processor.apply(request, request.SerializeToString())
        span = request.resource_spans[0].scope_spans[0].spans[0]
        assert span.attributes[0].value.string_value == "[REDACTED]", key
    assert processor.skipped_requests == 1


def test_redaction_with_patterns_that_need_no_literal_always_walks() -> None:
    processor = RedactionProcessor(RedactionProcessorSection(keys=(), key_patterns=("^pw$", "[0-9]+x")))
    request = traces(("cart", "op", b"t" * 16, 1), attributes={"pw": "v", "12x": "w", "ok": "z"})
    processor.apply(request, request.SerializeToString())
    values = [kv.value.string_value for kv in request.resource_spans[0].scope_spans[0].spans[0].attributes]
    assert values == ["[REDACTED]", "[REDACTED]", "z"] and processor.skipped_requests == 0


DEFAULT_REDACTION = RedactionProcessor(RedactionProcessorSection())


def test_redaction_reaches_map_values_arrays_of_maps_and_scope_attributes() -> None:
    processor = RedactionProcessor(RedactionProcessorSection())
    request = traces(("cart", "op", b"t" * 16, 1))
    span = request.resource_spans[0].scope_spans[0].spans[0]
    headers = span.attributes.add()
    headers.key = "http.request.headers"
    entry = headers.value.kvlist_value.values.add()
    entry.key, entry.value.string_value = "authorization", "Bearer s3cret"
    kept = headers.value.kvlist_value.values.add()
    kept.key, kept.value.string_value = "accept", "text/html"
    listed = span.attributes.add()
    listed.key = "sessions"
    inner = listed.value.array_value.values.add().kvlist_value.values.add()
    inner.key, inner.value.string_value = "session_token", "abc"
    scope = request.resource_spans[0].scope_spans[0].scope
    scoped = scope.attributes.add()
    scoped.key, scoped.value.string_value = "api-key", "k"
    processor.apply(request, request.SerializeToString())
    assert [(kv.key, kv.value.string_value) for kv in headers.value.kvlist_value.values] == [
        ("authorization", "[REDACTED]"), ("accept", "text/html")]
    assert listed.value.array_value.values[0].kvlist_value.values[0].value.string_value == "[REDACTED]"
    assert scoped.value.string_value == "[REDACTED]"
    assert processor.redacted == 3


@pytest.mark.parametrize("key", ["api_\u212aey", "\u017fecret", "PR\u0130VATE_KEY", "pr\u0131vate-key", "AUTHORIZATION",
                                 "db.pa\u017f\u017fword"])
def test_redaction_folds_case_the_same_on_the_protobuf_and_json_paths(key: str) -> None:
    processor = RedactionProcessor(RedactionProcessorSection())
    with_bytes = traces(("cart", "op", b"t" * 16, 1), attributes={key: "v"})
    processor.apply(with_bytes, with_bytes.SerializeToString())  # the protobuf path: prefilter first
    without = traces(("cart", "op", b"t" * 16, 1), attributes={key: "v"})
    processor.apply(without)  # the JSON path: no bytes, always walked
    for request in (with_bytes, without):
        assert request.resource_spans[0].scope_spans[0].spans[0].attributes[0].value.string_value == "[REDACTED]", key


_VARIANTS = {"i": "iI\u0130\u0131", "s": "sS\u017f", "k": "kK\u212a"}
_SENSITIVE = ("secret", "password", "passwd", "api_key", "apikey", "access-token", "private.key", "credential",
              "authorization", "cookie", "sessiontoken")


def _spelled(word: str, choices: list[int]) -> str:
    """``word`` with each letter in one of its case-insensitive spellings."""
    out = []
    for char, choice in zip(word, choices, strict=False):
        variants = _VARIANTS.get(char, char + char.upper())
        out.append(variants[choice % len(variants)])
    return "".join(out)


_KEYS = st.one_of(
    st.text(min_size=1, max_size=24),
    st.builds(lambda before, word, choices, after: before + _spelled(word, choices) + after,
              st.text(max_size=6), st.sampled_from(_SENSITIVE), st.lists(st.integers(0, 3), min_size=16, max_size=16),
              st.text(max_size=6)),
)


_DEFAULT_NEEDLES = _needles(RedactionProcessorSection().keys, RedactionProcessorSection().key_patterns)
# Hyperscan has wheels for x86-64 only; elsewhere the standard-library prefilter is the one in use.
PREFILTERS = (BytePrefilter(_DEFAULT_NEEDLES),
              *((HyperscanPrefilter(_DEFAULT_NEEDLES),) if redaction.hyperscan is not None else ()))


@settings(max_examples=3000, deadline=None, derandomize=True)
@given(key=_KEYS, filler=st.text(max_size=8))
def test_the_prefilter_never_skips_a_key_the_full_check_redacts(key: str, filler: str) -> None:
    request = traces(("cart", filler or "op", b"t" * 16, 1), attributes={key: "v", f"x{filler}": filler})
    raw = request.SerializeToString()
    answers = [prefilter.may_contain(raw) for prefilter in PREFILTERS]
    assert len(set(answers)) == 1, key  # the accelerated prefilter answers as the standard-library one
    if DEFAULT_REDACTION.sensitive(key):
        assert answers[0], key
