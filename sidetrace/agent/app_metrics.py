"""OTLP metrics from apps, served on the agent's /metrics with the standard OTLP-to-Prometheus translation.

- Names: invalid characters become ``_``; the unit becomes a suffix unless the name already holds it
  (``ms`` -> ``_milliseconds``, ``By`` -> ``_bytes``, so ``bytes.sent`` stays ``bytes_sent``;
  ``By/s`` -> ``_bytes_per_second``, ``{request}`` annotations are dropped, unit ``1`` adds nothing but on an
  OTLP Gauge, where it gives ``_ratio`` (not on sums, up-down counters included), ``1/s`` -> ``_per_second``,
  as the translator does); monotonic sums get ``_total`` once (``jobs.total`` -> ``jobs_total``). A name with
  no valid character (``日本``), which the translator refuses too, is dropped and counted (``invalid_name``).
- A metric whose family would produce a sample name another family already produces (a counter
  ``foo`` and a gauge ``foo_total``, a histogram ``lat`` and a gauge ``lat_count``) is dropped whole
  and counted (``name_clash``): two TYPE lines for one name would fail the whole scrape. Metrics of one type
  whose names become one family (app A's counter ``jobs`` and app B's ``jobs.total``, both ``jobs_total``)
  share it, as Prometheus would see them from two exporters: their series differ by ``job``, ``instance``,
  scope or attributes. A point that would make a series another metric name already makes (``req_count``
  after ``req.count``, same app, scope and attributes) is dropped and counted (``name_clash``): the first name
  keeps the series until it expires, where the other would overwrite it.
- Point attributes become labels; those named ``job``, ``instance``, ``le`` or ``quantile`` are left
  out (the agent's own labels win), and keys that sanitise alike have their values joined with ``;``
  in the order of the original keys. Label names are the translator's (``NormalizeLabel``): ``key_``
  before a leading digit, ``key`` before a leading ``_``; and, as the specification says and the translator
  does not, runs of ``_`` become one (``a__b`` and ``a..b`` are ``a_b``, joined with ``a_b``'s value), so no
  label can start with ``__``, which Prometheus reserves (``__name__`` -> ``key_name_``; a second ``__name__``
  fails the whole scrape). An attribute with an empty key (point, scope or resource) is left out.
- ``service.namespace``/``service.name`` become ``job`` and ``service.instance.id`` ``instance``; the
  other resource attributes go to one ``target_info`` series per job and instance, their labels made as a
  point's are (so a resource attribute ``job`` or ``le`` is left out and ``k8s.pod-name``/``k8s.pod.name`` are
  joined with ``;``).
- Every series carries its instrumentation scope: ``otel_scope_name``, ``otel_scope_version``,
  ``otel_scope_schema_url`` (when the scope has one) and each scope attribute as ``otel_scope_<key>``
  (one named ``name``, ``version`` or ``schema_url`` is left out), so two libraries recording the
  same instrument make two series. These labels win over point attributes of the same name.
- Delta sums and histograms (exponential ones included) are accumulated into cumulative series, aligned on
  start times: a series' first point starts it; a later point is added only when it starts at or after the time
  the series was last accumulated to and ends after it. As in the Collector's deltatocumulative
  processor, a gap before a point is accepted (the sender restarted or lost a point) and a point
  that ends no later than the series (a delta sent again, one arriving after a newer one) is
  dropped; unlike it, a point that starts before that time but ends after it is dropped too, since
  part of its interval was already counted. Each drop is counted (``delta_overlap``). A point
  without ``start_time_unix_nano`` is judged by its time alone, and points without
  ``time_unix_nano`` (which OTLP requires) are added as they come until a timed one arrives. A
  histogram whose bounds change starts over from the point, as the Collector's does.
- Cumulative points (and gauges) replace what their series holds, but only with newer data: a point whose
  ``time_unix_nano`` is older than the series' (a retry or a batch arriving after a newer one), or equal to it
  with another value, is dropped and counted (``out_of_order``), as Prometheus refuses an out-of-order or
  duplicate-timestamp sample; the same point sent again changes nothing and is not counted. Time alone orders
  them: a reset (a newer ``start_time_unix_nano``, a lower value) is taken since its point is newer. Points
  without ``time_unix_nano`` are taken as they come until a timed one arrives.
- Series not updated for ``stale_seconds`` are removed, so an app that stopped sending does not live forever;
  but a delta series stays while its app (job and instance, through its ``target_info``) sends anything, so
  that a sparse delta counter goes on from its total instead of starting a new series (which ``increase()``
  would not count).
- Start times: a counter's, histogram's or summary's ``start_time_unix_nano`` (an accumulated delta series': its
  first point's) is the ``created_timestamp`` of its series in the protobuf exposition, as the Collector's
  Prometheus exporter gives it (client_golang's ``NewConstMetricWithCreatedTimestamp``); gauges (up-down counters
  included) and exponential histograms have none, as the specification says. The text formats carry no
  ``_created`` samples: Prometheus stores each such line as a series of its own (twice the series of every counter,
  histogram and summary), which is why client_golang leaves them out of OpenMetrics unless asked, and the text
  format 0.0.4 has no place for them (prometheus_client's ``_created`` gauges there are its own convention).
- Each dropped point is counted, and each reason logged (naming the metric) at most once a minute.
- Exponential histograms are kept too (delta points merged into cumulative ones, ``sidetrace.agent.exponential``)
  and served as native histograms where the exposition can carry them: the protobuf one
  (``sidetrace.agent.protobuf_exposition``). An exposition that cannot (a text or OpenMetrics scrape, a remote-write
  collection) leaves them out and counts each series it left out (``exponential_histogram``); a point of a scale
  below -4 (which no native histogram schema can hold without splitting buckets) is refused and counted
  (``exponential_histogram_scale``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sidetrace._aio import finish
from sidetrace.agent.exponential import MIN_SCHEMA, ExponentialPoint
from sidetrace.agent.protobuf_exposition import NATIVE_HISTOGRAMS
from sidetrace.config import AppMetricsSection

if TYPE_CHECKING:
    from sidetrace.agent.components import Context

log = logging.getLogger("sidetrace.app_metrics")
DELTA = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
LOG_EVERY_SECONDS = 60.0
UNITS = {"1": "",
    "d": "days", "h": "hours", "min": "minutes", "s": "seconds", "ms": "milliseconds", "us": "microseconds",
    "ns": "nanoseconds", "By": "bytes", "KiBy": "kibibytes", "MiBy": "mebibytes", "GiBy": "gibibytes",
    "KBy": "kilobytes", "MBy": "megabytes", "GBy": "gigabytes", "m": "meters", "V": "volts", "A": "amperes",
    "J": "joules", "W": "watts", "g": "grams", "Cel": "celsius", "Hz": "hertz", "%": "percent",
}
PER_UNITS = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week", "mo": "month", "y": "year"}
# Names the agent itself emits: an app's metric under them would break the exposition.
RESERVED_PREFIXES = ("sidetrace_", "process_", "system_", "traces_span_metrics_", "target_info")
_INVALID = re.compile(r"[^a-zA-Z0-9_:]+")
_INVALID_LABEL = re.compile(r"[^a-zA-Z0-9_]+")
_UNDERSCORES = re.compile(r"__+")


def unit_suffix(unit: str, gauge: bool) -> str:
    """The suffix ``unit`` gives a name; ``gauge``: the metric is an OTLP Gauge, the only kind unit ``1`` makes
    ``_ratio`` (as the Collector's and Prometheus' translator do: not on sums, up-down counters included)."""
    unit = unit.strip()
    if unit == "1":
        return "ratio" if gauge else ""
    main, _, per = re.sub(r"\{[^}]*\}", "", unit).partition("/")
    main, per = main.strip(), per.strip()
    words = [UNITS.get(main, _INVALID.sub("_", main).strip("_"))] if main else []  # "1/s": main "1" adds nothing
    if per:
        words.append("per_" + PER_UNITS.get(per, _INVALID.sub("_", per).strip("_")))
    return _UNDERSCORES.sub("_", "_".join(word for word in words if word))


def metric_name(name: str, unit: str, gauge: bool, counter: bool = False) -> str:
    """The Prometheus family name (without ``_total``) for an OTLP metric name and unit; ``""`` when the name has
    no valid character at all (refused and counted as ``invalid_name``)."""
    base = _UNDERSCORES.sub("_", _INVALID.sub("_", name)).strip("_")
    if not base:
        return ""
    if counter and base.endswith("_total"):  # the exposition adds it back, once
        base = base[: -len("_total")]
    if base[0].isdigit():
        base = "_" + base
    suffix = unit_suffix(unit, gauge)
    if suffix and f"_{suffix}_" not in f"_{base}_":
        base = f"{base}_{suffix}"
    return base


def sample_names(base: str, prom_type: str) -> tuple[str, ...]:
    """Every name a family's exposition uses: its TYPE line's and its samples'."""
    return {
        "counter": (base, base + "_total"),
        "histogram": (base, base + "_bucket", base + "_sum", base + "_count"),
        # a classic histogram's names: whether two metrics clash must not depend on the histograms' kind
        "exponential": (base, base + "_bucket", base + "_sum", base + "_count"),
        "summary": (base, base + "_sum", base + "_count"),
    }.get(prom_type, (base,))


# The agent sets these itself (job, instance, the scope's) or the exposition does (le, quantile): a point attribute
# under the same name would make a second label of that name.
SCOPE_LABELS = ("otel_scope_name", "otel_scope_version", "otel_scope_schema_url")
RESERVED_LABELS = frozenset({"job", "instance", "le", "quantile", *SCOPE_LABELS})
SERVICE_KEYS = frozenset({"service.name", "service.namespace", "service.instance.id"})  # job and instance
# Why a point is not served, each exported from the start so that an alert sees the first one.
DROP_REASONS = ("max_series", "max_series_target_info", "reserved_name", "invalid_name", "type_conflict",
                "name_clash", "exponential_histogram", "exponential_histogram_scale", "delta_overlap",
                "out_of_order")

_WHY = {
    "max_series": "[app_metrics] max_series reached",
    "max_series_target_info": "[app_metrics] max_series target_info series reached",
    "reserved_name": "its name is under a prefix the agent's own metrics use",
    "invalid_name": "its name has no character valid in a Prometheus name",
    "type_conflict": "another metric of another type has its name",
    "name_clash": "its exposition would reuse a name another family uses, or a series another metric name makes",
    "exponential_histogram": "exponential histograms need the protobuf exposition (native histograms)",
    "exponential_histogram_scale": "its scale is below -4, which no native histogram schema holds",
    "delta_overlap": "a delta point that ends no later than, or overlaps, what its series already counted",
    "out_of_order": "a cumulative or gauge point older than its series' newest, or as old with another value",
}


def scope_labels(scope_metrics: Any) -> tuple[tuple[str, str], ...]:
    """The labels a scope puts on each of its series: name, version, schema URL if set, ``otel_scope_<key>``."""
    scope = scope_metrics.scope
    labels = {"otel_scope_name": scope.name, "otel_scope_version": scope.version}
    if scope_metrics.schema_url:
        labels["otel_scope_schema_url"] = scope_metrics.schema_url
    attributes: dict[str, str] = {}
    for kv in sorted(scope.attributes, key=lambda kv: kv.key):
        label = label_name("otel_scope_" + kv.key)
        if not kv.key or label in SCOPE_LABELS:
            continue
        value = any_value(kv.value)
        attributes[label] = f"{attributes[label]};{value}" if label in attributes else value
    return tuple(sorted({**attributes, **labels}.items()))


def point_labels(attributes: Any, reserved: frozenset[str] = RESERVED_LABELS) -> tuple[tuple[str, str], ...]:
    """Attributes as labels: ``reserved`` names and empty keys left out, keys that sanitise alike joined with ``;``."""
    labels: dict[str, str] = {}
    for kv in sorted(attributes, key=lambda kv: kv.key):
        label = label_name(kv.key)
        if not label or label in reserved:
            continue
        value = any_value(kv.value)
        labels[label] = f"{labels[label]};{value}" if label in labels else value
    return tuple(sorted(labels.items()))


def label_name(key: str) -> str:
    # Apps repeat a few keys on every point: short ones are sanitised once (at most 4096 of 256 characters kept).
    return _cached_label_name(key) if len(key) <= 256 else _label_name(key)


def _label_name(key: str) -> str:
    """As the translator's ``NormalizeLabel``: invalid characters become ``_``, ``key_`` goes before a leading digit
    and ``key`` before a leading ``_``; unlike it, and as the specification says ("Multiple consecutive ``_``
    characters MUST be replaced with a single ``_`` character"), runs of ``_`` become one, so no attribute can make
    a name Prometheus reserves (``__name__`` would fail the whole scrape)."""
    label = _UNDERSCORES.sub("_", _INVALID_LABEL.sub("_", key))
    if label[:1].isdigit():
        return f"key_{label}"
    return f"key{label}" if label[:1] == "_" else label


_cached_label_name = functools.lru_cache(maxsize=4096)(_label_name)


def any_value(value: AnyValue) -> str:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind is None:
        return ""
    if kind == "array_value":
        return "[" + ",".join(any_value(v) for v in value.array_value.values) + "]"
    if kind == "kvlist_value":
        return "{" + ",".join(f"{kv.key}:{any_value(kv.value)}" for kv in value.kvlist_value.values) + "}"
    if kind == "bytes_value":
        return value.bytes_value.hex()
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    return str(getattr(value, kind))


class _Series:
    __slots__ = ("value", "sum", "count", "buckets", "bounds", "updated", "last", "start", "exponential", "target",
                 "origin")

    def __init__(self) -> None:
        self.value = 0.0
        self.sum = 0.0
        self.count = 0
        self.buckets: list[int] = []
        self.bounds: tuple[float, ...] = ()
        self.updated = 0.0
        self.last = 0  # time_unix_nano of the last point taken; 0 before the first timed one
        self.start = 0  # start_time_unix_nano of what the series holds (its first point's, for accumulated deltas)
        self.exponential: ExponentialPoint | None = None
        self.target: tuple[str, str] | None = None  # a delta series' (job, instance): kept while that app sends
        self.origin = ""  # the OTLP metric name that made the series


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _holds(kind: str, series: _Series, point: Any) -> bool:
    """Whether ``series`` already holds what the cumulative or gauge ``point`` would set (the same point again)."""
    if kind in ("gauge", "sum"):
        return _same(series.value, point.as_double if point.WhichOneof("value") == "as_double" else float(point.as_int))
    if kind == "histogram":
        return (series.bounds == tuple(point.explicit_bounds) and series.count == point.count
                and _same(series.sum, point.sum)
                and series.buckets == (list(point.bucket_counts) or [0] * (len(point.explicit_bounds) + 1)))
    if kind == "exponential_histogram":
        return series.exponential == ExponentialPoint.from_otlp(point)
    return (series.count == point.count and _same(series.sum, point.sum)
            and series.bounds == tuple(q.quantile for q in point.quantile_values)
            and series.buckets == [q.value for q in point.quantile_values])


class AppMetrics:
    """The ``app_metrics`` component: cumulative series built from OTLP metrics requests, bounded and expiring.

    Everything it keeps for a series (family, type, help text, ``target_info``) exists only once a
    series is accepted within ``max_series``: a refused one leaves nothing behind. Series not updated
    for ``stale_seconds`` are removed by a timer, whether or not anyone scrapes.
    """

    def __init__(self, section: AppMetricsSection, context: Context | None = None) -> None:
        self._links = context.links if context is not None else None
        self.max_series = section.max_series
        self.stale_seconds = section.stale_seconds
        # (family name, type) -> {label tuple -> series}; type and help text per family name
        self._families: dict[tuple[str, str], dict[tuple[tuple[str, str], ...], _Series]] = {}
        self._help: dict[str, str] = {}
        self._types: dict[str, str] = {}
        self._claims: dict[str, str] = {}  # sample name -> the family name whose exposition uses it
        self._logged_at: dict[str, float] = {}  # drop reason -> when it was last logged (monotonic)
        self._targets: dict[tuple[str, str], tuple[tuple[tuple[str, str], ...], float]] = {}
        self._count = 0
        self.dropped: dict[str, int] = {}
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        self._state = "created"

    # component -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._expire_periodically(), name="app-metrics-expiry")
        if self._links is not None:
            self._links.metrics.bind(self)
        self._state = "running"

    async def stop(self) -> None:
        if self._links is not None:
            self._links.metrics.unbind(self)
        if self._task is not None:
            await finish(self._task, 5.0)
        self._state = "stopped"

    async def reconfigure(self, section: AppMetricsSection, context: Context) -> None:
        """Apply new bounds in place: series already kept stay (a lower max_series refuses new ones)."""
        self.max_series = section.max_series
        self.stale_seconds = section.stale_seconds
        self.expire()

    async def _expire_periodically(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.stale_seconds / 4))
            await asyncio.to_thread(self.expire)

    def status(self) -> dict[str, Any]:
        return {"state": self._state, "detail": f"{self._count} series from apps", "last_error": None}

    def collect(self) -> Iterator[Metric]:
        return self.families()

    # store -----------------------------------------------------------------------------------

    def _drop(self, reason: str, metric: str, points: int = 1) -> None:
        """Count ``points`` of ``metric`` not served for ``reason``, and log it at most once a minute per reason."""
        self.dropped[reason] = self.dropped.get(reason, 0) + points
        now = time.monotonic()
        if now - self._logged_at.get(reason, -LOG_EVERY_SECONDS) >= LOG_EVERY_SECONDS:
            self._logged_at[reason] = now
            log.warning("dropped %d point(s) of app metric %r (%s): %s (logged at most once a minute per reason; "
                        "counted in sidetrace_app_metrics_dropped_points_total)", points, metric, reason,
                        _WHY[reason])

    def _series(self, family: tuple[str, str], labels: tuple[tuple[str, str], ...], now: float,
                help_text: str, origin: str) -> _Series | None:
        by_labels = self._families.get(family)
        series = by_labels.get(labels) if by_labels is not None else None
        if series is None:
            if self._count >= self.max_series:
                self._drop("max_series", origin)
                return None
            if by_labels is None:
                by_labels = self._families[family] = {}
                self._types[family[0]] = family[1]
                self._help[family[0]] = help_text
                self._claims.update(dict.fromkeys(sample_names(*family), family[0]))
            series = by_labels[labels] = _Series()
            series.origin = origin
            series.updated = now
            self._count += 1
        return series

    def accept_metrics(self, request: ExportMetricsServiceRequest) -> int:
        """The MetricSink interface: fold ``request`` into the store; return the data points taken."""
        return self.apply(request)

    def apply(self, request: ExportMetricsServiceRequest) -> int:
        """Fold ``request`` into the store; return the number of data points taken."""
        now = time.time()
        taken = 0
        with self._lock:
            for resource_metrics in request.resource_metrics:
                service = {kv.key: any_value(kv.value) for kv in resource_metrics.resource.attributes
                           if kv.key in SERVICE_KEYS}
                name = service.get("service.name", "unknown_service")
                namespace = service.get("service.namespace", "")
                job = f"{namespace}/{name}" if namespace else name
                instance = service.get("service.instance.id", "")
                target = (("job", job), ("instance", instance))
                self._target((job, instance), resource_metrics.resource.attributes, now)
                for scope_metrics in resource_metrics.scope_metrics:
                    labels = scope_labels(scope_metrics)
                    reserved = RESERVED_LABELS.union(label for label, _ in labels)
                    for metric in scope_metrics.metrics:
                        taken += self._metric(metric, target + labels, reserved, now)
        return taken

    def _target(self, key: tuple[str, str], attributes: Any, now: float) -> None:
        """Keep ``target_info`` for (job, instance): the resource attributes but the service's, as point labels are
        made (reserved names and empty keys left out, keys that sanitise alike joined with ``;``)."""
        if key not in self._targets and len(self._targets) >= self.max_series:
            self._drop("max_series_target_info", f"target_info of {key[0]!r}")
            return
        self._targets[key] = (point_labels([kv for kv in attributes if kv.key not in SERVICE_KEYS]), now)

    def _metric(self, metric: Any, prefix: tuple[tuple[str, str], ...], reserved: frozenset[str], now: float) -> int:
        kind = metric.WhichOneof("data")
        if kind is None:
            return 0
        data = getattr(metric, kind)
        gauge = kind == "gauge" or (kind == "sum" and not data.is_monotonic)
        base = metric_name(metric.name, metric.unit, kind == "gauge", counter=kind == "sum" and not gauge)
        points = len(data.data_points)
        if not base:
            self._drop("invalid_name", metric.name, points)
            return 0
        if base.startswith(RESERVED_PREFIXES):
            self._drop("reserved_name", metric.name, points)
            return 0
        prom_type = {"gauge": "gauge", "sum": "gauge" if gauge else "counter", "histogram": "histogram",
                     "summary": "summary", "exponential_histogram": "exponential"}[kind]
        if self._types.get(base, prom_type) != prom_type:
            self._drop("type_conflict", metric.name, points)
            return 0
        if any(self._claims.get(name, base) != base for name in sample_names(base, prom_type)):
            self._drop("name_clash", metric.name, points)
            return 0
        family = (base, prom_type)
        help_text = metric.description or metric.name
        origin = sys.intern(metric.name)  # one string for every series of the metric
        delta = getattr(data, "aggregation_temporality", 0) == DELTA
        taken = 0
        for point in data.data_points:
            if kind == "exponential_histogram" and point.scale < MIN_SCHEMA:
                self._drop("exponential_histogram_scale", metric.name)
                continue
            labels = prefix + point_labels(point.attributes, reserved)
            series = self._series(family, labels, now, help_text, origin)
            if series is None:
                continue
            if series.origin != origin:  # another metric name makes this series: it would overwrite it
                self._drop("name_clash", metric.name)
                continue
            if delta:
                start, end = point.start_time_unix_nano, point.time_unix_nano
                if series.last and (end <= series.last or start and start < series.last):
                    self._drop("delta_overlap", metric.name)
                    continue
                if not series.last:  # the first point starts the cumulative series
                    series.start = start
                series.last = end
                series.target = (prefix[0][1], prefix[1][1])
            else:
                end = point.time_unix_nano
                if end < series.last or (end == series.last and end and not _holds(kind, series, point)):
                    self._drop("out_of_order", metric.name)
                    continue
                series.last, series.start = end, point.start_time_unix_nano
            series.updated = now
            taken += 1
            if kind in ("gauge", "sum"):
                value = point.as_double if point.WhichOneof("value") == "as_double" else float(point.as_int)
                series.value = series.value + value if delta else value
            elif kind == "histogram":
                bounds = tuple(point.explicit_bounds)
                counts = list(point.bucket_counts) or [0] * (len(bounds) + 1)
                if delta and series.bounds == bounds and series.buckets:
                    series.buckets = [a + b for a, b in zip(series.buckets, counts, strict=False)]
                    series.sum += point.sum
                    series.count += point.count
                else:
                    series.bounds, series.buckets, series.sum, series.count = bounds, counts, point.sum, point.count
                    series.start = point.start_time_unix_nano  # a delta one starts over from this point
            elif kind == "exponential_histogram":
                incoming = ExponentialPoint.from_otlp(point)
                series.exponential = (series.exponential.merged(incoming) if delta and series.exponential
                                      else incoming)
            else:  # summary: quantiles are always cumulative in OTLP
                series.sum, series.count = point.sum, point.count
                series.buckets = [q.value for q in point.quantile_values]
                series.bounds = tuple(q.quantile for q in point.quantile_values)
        return taken

    def expire(self, now: float | None = None) -> None:
        """Remove series not updated for ``stale_seconds``, but a delta series whose app (job and instance) sent
        anything within that time: a sparse delta counter then keeps counting from where it was."""
        cutoff = (now or time.time()) - self.stale_seconds
        with self._lock:
            for family, by_labels in list(self._families.items()):
                for labels, series in list(by_labels.items()):
                    if series.updated < cutoff and not (
                            series.target is not None and series.target in self._targets
                            and self._targets[series.target][1] >= cutoff):
                        del by_labels[labels]
                        self._count -= 1
                if not by_labels:
                    del self._families[family]
                    for name in sample_names(*family):
                        del self._claims[name]
                    del self._types[family[0]]
                    del self._help[family[0]]
            for key, (_, updated) in list(self._targets.items()):
                if updated < cutoff:
                    del self._targets[key]

    @property
    def series_count(self) -> int:
        return self._count

    def families(self) -> Iterator[Metric]:
        native = NATIVE_HISTOGRAMS.get()
        with self._lock:
            snapshot = [(family, [(labels, series.value, series.sum, series.count, list(series.buckets),
                                   series.bounds, series.start) for labels, series in by_labels.items()])
                        for family, by_labels in self._families.items() if family[1] != "exponential"]
            # Points are replaced, never changed in place, by a merge: they can be read after the lock.
            exponential = [(family, [(labels, series.exponential) for labels, series in by_labels.items()])
                           for family, by_labels in self._families.items() if family[1] == "exponential"]
            if exponential and not native:
                self._drop("exponential_histogram", ", ".join(family[0] for family, _ in exponential),
                           sum(len(rows) for _, rows in exponential))
            targets = list(self._targets.items())
            dropped = dict(self.dropped)
            helps = dict(self._help)
        for (name, prom_type), rows in snapshot:
            # Series of one family may carry different label keys, so samples are added one by one.
            family = Metric(name, helps[name], prom_type)
            for labels, value, total, count, buckets, bounds, start in rows:
                base = dict(labels)
                if native and start and prom_type != "gauge":  # the protobuf exposition's created_timestamp
                    family.add_sample(name + "_created", base, start / 1e9)
                if prom_type in ("gauge", "counter"):
                    family.add_sample(name + ("_total" if prom_type == "counter" else ""), base, value)
                    continue
                if prom_type == "histogram":
                    running = 0
                    for bound, bucket in zip(bounds, buckets, strict=False):
                        running += bucket
                        family.add_sample(name + "_bucket", {**base, "le": repr(float(bound))}, running)
                    family.add_sample(name + "_bucket", {**base, "le": "+Inf"}, count)
                else:
                    for quantile, quantile_value in zip(bounds, buckets, strict=False):
                        family.add_sample(name, {**base, "quantile": repr(float(quantile))}, quantile_value)
                family.add_sample(name + "_sum", base, total)
                family.add_sample(name + "_count", base, count)
            yield family
        for (name, _), rows in exponential if native else ():
            family = Metric(name, helps[name], "histogram")
            for labels, point in rows:
                if point is not None:
                    family.add_sample(name, dict(labels), point.count, native_histogram=point.native())
            yield family
        info = Metric("target_info", "Resource attributes of each app sending OTLP metrics.", "gauge")
        for (job, instance), (attributes, _) in targets:
            info.add_sample("target_info", {**dict(attributes), "job": job, "instance": instance}, 1)
        yield info
        points = CounterMetricFamily("sidetrace_app_metrics_dropped_points_total",
                                     "OTLP metric points not served, by reason (max_series, reserved_name, "
                                     "invalid_name, type_conflict, name_clash, delta_overlap, out_of_order, "
                                     "exponential_histogram_scale; "
                                     "exponential_histogram counts the exponential-histogram series each text scrape "
                                     "or remote-write collection left out, as only the protobuf exposition carries "
                                     "them; max_series_target_info counts requests whose resource was refused a "
                                     "target_info series, also capped at max_series).", labels=["reason"])
        for reason in DROP_REASONS:
            points.add_metric([reason], dropped.get(reason, 0))
        yield points
        yield GaugeMetricFamily("sidetrace_app_metrics_series", "Series received from apps and served.",
                                value=self._count)

