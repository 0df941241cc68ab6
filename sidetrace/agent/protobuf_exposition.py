"""The protobuf exposition of /metrics: length-delimited ``io.prometheus.client.MetricFamily`` messages.

Prometheus asks for it (``Accept: application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;
encoding=delimited``) when native histograms are enabled, and it is the only exposition Prometheus 2.x reads
native histograms from. Every family of the registry is encoded with the meaning the text format 0.0.4 gives it
(prometheus_client's ``generate_latest``): counters named with ``_total``, info families as ``<name>_info`` gauges,
state sets as gauges, and ``_gsum``/``_gcount`` samples as gauge families of their own, so a scrape stores the same
series either way. A ``_created`` sample of a counter, histogram or summary is the one exception: it becomes the
``created_timestamp`` of its series (as client_golang writes it; Prometheus 2.50+ reads it from protobuf scrapes with
``--enable-feature=created-timestamp-zero-ingestion``), not a series of its own, which is what the text format's
``<name>_created`` gauges would store. The agent's collectors yield
``_created`` samples only for this exposition (``NATIVE_HISTOGRAMS`` set), so the series stay the same either way.
Native histogram samples (``Sample.native_histogram``) become native histograms; the text encoders never see them,
as collectors yield them only while ``NATIVE_HISTOGRAMS`` is set.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

CONTENT_TYPE = "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited"

# prometheus_client's collector interface has no argument for what the scraper accepts: a collector that has
# native histograms yields them only while this is True (set for the rendering of a protobuf exposition).
NATIVE_HISTOGRAMS: ContextVar[bool] = ContextVar("native_histograms", default=False)

COUNTER, GAUGE, SUMMARY, UNTYPED, HISTOGRAM, GAUGE_HISTOGRAM = range(6)
TIMESTAMP = ".google.protobuf.Timestamp"


def _metric_family() -> type:
    """MetricFamily of prometheus/client_model's metrics.proto (proto2), built from its descriptor: the PyPI packages
    that ship it (prometheus-client-model, prometheus-metrics-proto) predate native histograms."""
    Field = descriptor_pb2.FieldDescriptorProto  # noqa: N806 - the protobuf class, named as protobuf names it
    proto = descriptor_pb2.FileDescriptorProto(name="sidetrace/io_prometheus_client_metrics.proto",
                                               package="io.prometheus.client", syntax="proto2",
                                               dependency=["google/protobuf/timestamp.proto"])

    def message(name: str, *fields: tuple[str, int, int, str | None, bool]) -> None:
        described = proto.message_type.add(name=name)
        for field_name, number, kind, type_name, repeated in fields:
            added = described.field.add(name=field_name, number=number, type=kind,
                                        label=Field.LABEL_REPEATED if repeated else Field.LABEL_OPTIONAL)
            if type_name:
                added.type_name = type_name if type_name.startswith(".") else f".io.prometheus.client.{type_name}"

    string, double, uint64, int64, sint32, sint64, uint32, nested, enum = (
        Field.TYPE_STRING, Field.TYPE_DOUBLE, Field.TYPE_UINT64, Field.TYPE_INT64, Field.TYPE_SINT32,
        Field.TYPE_SINT64, Field.TYPE_UINT32, Field.TYPE_MESSAGE, Field.TYPE_ENUM)
    metric_type = proto.enum_type.add(name="MetricType")
    for number, name in enumerate(("COUNTER", "GAUGE", "SUMMARY", "UNTYPED", "HISTOGRAM", "GAUGE_HISTOGRAM")):
        metric_type.value.add(name=name, number=number)
    message("LabelPair", ("name", 1, string, None, False), ("value", 2, string, None, False))
    message("Gauge", ("value", 1, double, None, False))
    message("Counter", ("value", 1, double, None, False), ("created_timestamp", 3, nested, TIMESTAMP, False))
    message("Quantile", ("quantile", 1, double, None, False), ("value", 2, double, None, False))
    message("Summary", ("sample_count", 1, uint64, None, False), ("sample_sum", 2, double, None, False),
            ("quantile", 3, nested, "Quantile", True), ("created_timestamp", 4, nested, TIMESTAMP, False))
    message("Untyped", ("value", 1, double, None, False))
    message("Bucket", ("cumulative_count", 1, uint64, None, False), ("upper_bound", 2, double, None, False),
            ("cumulative_count_float", 4, double, None, False))
    message("BucketSpan", ("offset", 1, sint32, None, False), ("length", 2, uint32, None, False))
    message("Histogram", ("sample_count", 1, uint64, None, False), ("sample_sum", 2, double, None, False),
            ("bucket", 3, nested, "Bucket", True), ("sample_count_float", 4, double, None, False),
            ("schema", 5, sint32, None, False), ("zero_threshold", 6, double, None, False),
            ("zero_count", 7, uint64, None, False), ("negative_span", 9, nested, "BucketSpan", True),
            ("negative_delta", 10, sint64, None, True), ("positive_span", 12, nested, "BucketSpan", True),
            ("positive_delta", 13, sint64, None, True), ("created_timestamp", 15, nested, TIMESTAMP, False))
    message("Metric", ("label", 1, nested, "LabelPair", True), ("gauge", 2, nested, "Gauge", False),
            ("counter", 3, nested, "Counter", False), ("summary", 4, nested, "Summary", False),
            ("untyped", 5, nested, "Untyped", False), ("timestamp_ms", 6, int64, None, False),
            ("histogram", 7, nested, "Histogram", False))
    message("MetricFamily", ("name", 1, string, None, False), ("help", 2, string, None, False),
            ("type", 3, enum, "MetricType", False), ("metric", 4, nested, "Metric", True))
    pool = descriptor_pool.DescriptorPool()
    timestamp = descriptor_pb2.FileDescriptorProto()
    timestamp_pb2.DESCRIPTOR.CopyToProto(timestamp)
    pool.Add(timestamp)
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("io.prometheus.client.MetricFamily"))


MetricFamily = _metric_family()


def accepts_protobuf(accept: str) -> bool:
    """Whether an Accept header asks for the delimited MetricFamily protobuf before any text format it names."""
    best_text, protobuf = 0.0, 0.0
    for media_range in accept.split(","):
        kind, *parameters = (part.strip() for part in media_range.split(";"))
        params = dict(parameter.partition("=")[::2] for parameter in parameters)
        try:
            quality = float(params.get("q", "1"))
        except ValueError:
            quality = 0.0
        if kind == "application/vnd.google.protobuf":
            if params.get("proto") == "io.prometheus.client.MetricFamily" and params.get("encoding") == "delimited":
                protobuf = max(protobuf, quality)
        elif kind in ("text/plain", "application/openmetrics-text", "text/*", "*/*"):
            best_text = max(best_text, quality)
    return protobuf > 0 and protobuf >= best_text


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode(registry: Collector) -> bytes:
    """Every family ``registry`` collects (native histograms included), as delimited MetricFamily messages."""
    token = NATIVE_HISTOGRAMS.set(True)
    try:
        families = list(registry.collect())
    finally:
        NATIVE_HISTOGRAMS.reset(token)
    chunks = []
    for family in _families(families):
        if not family.metric:  # a family without samples has no series (the text format's lone TYPE line)
            continue
        body = family.SerializeToString()
        chunks.append(_varint(len(body)) + body)
    return b"".join(chunks)


def _families(families: Iterable[Any]) -> Iterator[Any]:
    for family in families:
        name, kind, help_text = family.name, family.type, family.documentation
        side: dict[str, list[Sample]] = {}
        main: list[Sample] = []
        suffixes = {name + suffix: suffix for suffix in ("_created", "_gsum", "_gcount")}
        for sample in family.samples:
            suffix = suffixes.get(sample.name)
            (side.setdefault(suffix, []) if suffix else main).append(sample)
        if kind in ("histogram", "gaugehistogram", "summary"):
            message, metrics = _grouped(name, help_text, kind, main)
        else:
            proto_name, proto_type, field = {
                "counter": (name + "_total", COUNTER, "counter"), "gauge": (name, GAUGE, "gauge"),
                "info": (name + "_info", GAUGE, "gauge"), "stateset": (name, GAUGE, "gauge"),
            }.get(kind, (name, UNTYPED, "untyped"))
            message, metrics = MetricFamily(name=proto_name, help=help_text, type=proto_type), {}
            keyed = "_created" in side  # only then are the Metrics looked up by label set
            for sample in main:
                metric = _metric(message, sample.labels, sample.timestamp)
                getattr(metric, field).value = float(sample.value)
                if keyed:
                    metrics[tuple(sorted(sample.labels.items()))] = metric
        created = {"counter": "counter", "histogram": "histogram", "summary": "summary"}.get(kind)
        for sample in side.pop("_created", []) if created else ():
            metric = metrics.get(tuple(sorted(sample.labels.items())))
            if metric is None:  # no series to carry it: kept as the text format would
                side.setdefault("_created", []).append(sample)
                continue
            seconds, nanos = divmod(round(float(sample.value) * 1e6), 10**6)  # microseconds: what a double holds
            stamp = getattr(metric, created).created_timestamp
            stamp.seconds, stamp.nanos = seconds, nanos * 1000
        yield message
        for suffix, samples in sorted(side.items()):
            message = MetricFamily(name=name + suffix, help=help_text, type=GAUGE)
            for sample in samples:
                _metric(message, sample.labels, sample.timestamp).gauge.value = float(sample.value)
            yield message


def _metric(family: Any, labels: dict[str, str], timestamp: Any) -> Any:
    metric = family.metric.add()
    for label, value in sorted(labels.items()):
        # Written even when empty, as the text formats write it: Prometheus stores no label for an empty value, but
        # with honor_labels an empty instance or job (an app without service.instance.id) still keeps the target's
        # out, as it does in a text scrape.
        metric.label.add(name=label, value=value)
    if timestamp is not None:
        metric.timestamp_ms = int(float(timestamp) * 1000)
    return metric


def _grouped(name: str, help_text: str, kind: str, samples: list[Sample]) -> tuple[Any, dict[Any, Any]]:
    """A histogram or summary family: its samples gathered into one Metric per label set (less ``le``/``quantile``),
    and those Metrics by label set."""
    histogram = kind != "summary"
    message = MetricFamily(name=name, help=help_text,
                           type={"histogram": HISTOGRAM, "gaugehistogram": GAUGE_HISTOGRAM}.get(kind, SUMMARY))
    metrics: dict[tuple[tuple[str, str], ...], Any] = {}
    for sample in samples:
        labels = {k: v for k, v in sample.labels.items() if k not in ("le", "quantile")}
        key = tuple(sorted(labels.items()))
        metric = metrics.get(key)
        if metric is None:
            metric = metrics[key] = _metric(message, labels, sample.timestamp)
        data = metric.histogram if histogram else metric.summary
        if sample.native_histogram is not None:
            _native(metric.histogram, sample.native_histogram)
        elif sample.name == name + "_bucket" or (not histogram and sample.name == name):
            if histogram:
                bucket = data.bucket.add(upper_bound=float(sample.labels["le"]))
                _count(bucket, "cumulative_count", sample.value)
            else:
                data.quantile.add(quantile=float(sample.labels["quantile"]), value=float(sample.value))
        elif sample.name == name + "_sum":
            data.sample_sum = float(sample.value)
        elif sample.name == name + "_count" and histogram:
            _count(data, "sample_count", sample.value)
        elif sample.name == name + "_count":
            data.sample_count = int(sample.value)
    return message, metrics


def _count(message: Any, field: str, value: float) -> None:
    if float(value).is_integer() and value >= 0:
        setattr(message, field, int(value))
    else:
        setattr(message, field + "_float", float(value))


def _native(histogram: Any, native: Any) -> None:
    _count(histogram, "sample_count", native.count_value)
    histogram.sample_sum = float(native.sum_value)
    histogram.schema = native.schema
    histogram.zero_threshold = float(native.zero_threshold)
    histogram.zero_count = int(native.zero_count)
    for spans, deltas, span_field, delta_field in (
            (native.pos_spans, native.pos_deltas, histogram.positive_span, histogram.positive_delta),
            (native.neg_spans, native.neg_deltas, histogram.negative_span, histogram.negative_delta)):
        for span in spans or ():
            span_field.add(offset=span.offset, length=span.length)
        delta_field.extend(deltas or ())
