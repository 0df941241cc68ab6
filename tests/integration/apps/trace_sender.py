"""An app process that sends traces with the stock OpenTelemetry SDK and nothing of sidetrace's.

Usage: python -m tests.integration.apps.trace_sender ENDPOINT SERVICE FIRST COUNT
Sends COUNT traces of 10 spans (a SERVER root and 9 children) numbered FIRST.. in the attribute
``trace.number``, flushes, and exits 0 once the agent acknowledged every span.
"""

from __future__ import annotations

import sys

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

SPANS_PER_TRACE = 10


def main(endpoint: str, service: str, first: int, count: int) -> int:
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=30),
                                                   max_queue_size=100_000, max_export_batch_size=500))
    tracer = provider.get_tracer("trace_sender")
    for number in range(first, first + count):
        with tracer.start_as_current_span("GET /order", kind=trace.SpanKind.SERVER,
                                          attributes={"trace.number": number}):
            for child in range(SPANS_PER_TRACE - 1):
                with tracer.start_as_current_span(f"step {child}", attributes={"trace.number": number}):
                    pass
    flushed = provider.force_flush(60_000)
    provider.shutdown()
    return 0 if flushed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
