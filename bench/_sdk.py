"""The OpenTelemetry SDK set-up the instrumentation benchmarks' workers share: a tracer provider
whose batch processor hands spans to an exporter that only counts them."""

from __future__ import annotations

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult


class Discard(SpanExporter):
    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans) -> SpanExportResult:  # noqa: ANN001
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


def discarding_provider() -> tuple[TracerProvider, Discard]:
    exporter = Discard()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=200_000, max_export_batch_size=2048))
    return provider, exporter
