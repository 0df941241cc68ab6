"""In-memory OpenTelemetry SDK providers for instrumentor tests: every finished span and metric
point, with lookups by name."""

from __future__ import annotations

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.conftest import wait_until


class Telemetry:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.metrics = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.metrics])
        self.tracer = self.tracer_provider.get_tracer("test")

    def finished(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if name is None or s.name == name]

    def one(self, name: str, kind: SpanKind | None = None) -> ReadableSpan:
        found = [s for s in self.finished(name) if kind is None or s.kind is kind]
        assert len(found) == 1, (name, kind, [(s.name, s.kind) for s in self.finished()])
        return found[0]

    def wait_for(self, name: str, kind: SpanKind | None = None) -> ReadableSpan:
        wait_until(lambda: [s for s in self.finished(name) if kind is None or s.kind is kind], 10, name)
        return self.one(name, kind)

    def metric_points(self, name: str) -> list:
        data = self.metrics.get_metrics_data()
        return [point for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
                if m.name == name for point in m.data.data_points]
