"""In-memory OpenTelemetry SDK providers for instrumentor tests: every finished span and metric
point, with lookups by name; and providers whose tracer fails, to prove our faults stay ours."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
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

    def errors(self) -> dict[str, int]:
        """``sidetrace.instrumentation.errors`` by the place that failed."""
        return {p.attributes["where"]: p.value for p in self.metric_points("sidetrace.instrumentation.errors")}

    def metric_points(self, name: str) -> list:
        data = self.metrics.get_metrics_data()
        if data is None:  # nothing was ever recorded
            return []
        return [point for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
                if m.name == name for point in m.data.data_points]


class FailingSpanProcessor(SpanProcessor):
    """A SpanProcessor that raises from the hooks it is given (``on_start``, ``on_end``): a broken
    tracer as an app's SDK can have one, reached only through the public OpenTelemetry interface."""

    def __init__(self, hooks: Collection[str]) -> None:
        self.hooks = frozenset(hooks)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if "on_start" in self.hooks:
            raise RuntimeError("span processor on_start failed")

    def on_end(self, span: ReadableSpan) -> None:
        if "on_end" in self.hooks:
            raise RuntimeError("span processor on_end failed")


class FailingExporter(SpanExporter):
    """A span exporter that raises on every export, and counts how many spans it was handed."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        raise RuntimeError("exporter failed")

    def shutdown(self) -> None:
        pass


class FailingTelemetry(Telemetry):
    """In-memory providers whose tracer fails: after the in-memory exporter (which still sees every
    span that ends), an exporter that raises and a SpanProcessor that raises from ``hooks``."""

    def __init__(self, hooks: Collection[str]) -> None:
        super().__init__()
        self.hooks = frozenset(hooks)
        self.exporter = FailingExporter()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer_provider.add_span_processor(FailingSpanProcessor(hooks))

