"""The trace pipeline: processors, the durable spool, exporters, span metrics and recent traces.

Receivers hand every decoded request to ``accept_traces`` / ``accept_metrics``. A trace request is
enriched and redacted, written to the spool (when an exporter is configured) and only then
acknowledged; span metrics and the recent-traces index see it after the write, so a request the
spool refused (and the app will retry) is not counted twice.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sidetrace.agent.app_metrics import AppMetrics
from sidetrace.agent.components import Context
from sidetrace.agent.processors.redaction import RedactionProcessor
from sidetrace.agent.processors.resource import ResourceProcessor
from sidetrace.agent.processors.span_metrics import SpanMetricsProcessor
from sidetrace.agent.recent import RecentTraces
from sidetrace.exporters.otlp import OtlpExporter, exporter_families
from sidetrace.exporters.spool import Spool

log = logging.getLogger("sidetrace.pipeline")

SPOOL_FILE = "spool.db"


def span_count(request: ExportTraceServiceRequest) -> int:
    return sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)


class TracePipeline:
    """Everything between the receivers and the backends (see module doc)."""

    def __init__(self, section: Any, context: Context) -> None:
        config = context.config
        self._registry = context.registry
        processors = config.processors
        self.resource = ResourceProcessor(processors.resource) if processors.resource.enabled else None
        self.redaction = RedactionProcessor(processors.redaction)
        self.span_metrics = SpanMetricsProcessor(processors.span_metrics) if processors.span_metrics.enabled else None
        self.recent = RecentTraces(config.recent_traces)
        self.app_metrics = AppMetrics(config.app_metrics)
        exporters = config.exporters.otlp
        self.spool = Spool(config.data_path / SPOOL_FILE, [e.name for e in exporters], config.spool.max_bytes,
                           config.spool.sync, config.spool.max_pending_bytes) if exporters else None
        self.exporters = [OtlpExporter(e, self.spool) for e in exporters] if self.spool else []
        self.accepted: dict[str, int] = {}
        self.refused: dict[tuple[str, str], int] = {}
        self.accepted_points = 0
        self._state = "created"

    async def start(self) -> None:
        self._state = "starting"
        if self.spool is not None:
            await self.spool.open()
            for exporter in self.exporters:
                await exporter.start()
            log.info("spool %s holds %d bytes; exporting to %s", self.spool.path, self.spool.size_bytes,
                     ", ".join(f"{e.name} ({e.section.endpoint})" for e in self.exporters))
        else:
            log.info("no [[exporters.otlp]] configured: traces are kept in memory only (/debug/traces, "
                     "`sidetrace traces`), nothing is sent to Jaeger")
        self._registry.register(self)
        self._state = "running"

    async def stop(self) -> None:
        self._state = "stopping"
        for exporter in self.exporters:
            await exporter.stop()
        if self.spool is not None:
            await self.spool.close()
        with contextlib.suppress(KeyError):
            self._registry.unregister(self)
        self._state = "stopped"

    async def accept_traces(self, request: ExportTraceServiceRequest, transport: str, raw: bytes | None = None) -> int:
        """Process and durably queue ``request``; return its span count.

        ``raw`` is the request's protobuf encoding when the receiver has it (a fast path for redaction).
        Raises SpoolBusy when too much waits for the disk, OSError when the disk fails; the receiver
        refuses the request then (and counts it), so the app retries.
        """
        spans = span_count(request)
        if not spans:
            return 0
        if self.resource is not None:
            self.resource.apply(request)
        self.redaction.apply(request, raw)
        if self.spool is not None:
            await self.spool.append(request.SerializeToString(), spans)
        self.accepted[transport] = self.accepted.get(transport, 0) + spans
        if self.span_metrics is not None:
            self.span_metrics.apply(request)
        self.recent.apply(request)
        return spans

    def accept_metrics(self, request: ExportMetricsServiceRequest) -> int:
        points = self.app_metrics.apply(request)
        self.accepted_points += points
        return points

    def refuse(self, transport: str, reason: str, spans: int) -> None:
        """Count spans a receiver turned away before they reached the pipeline."""
        self.refused[(transport, reason)] = self.refused.get((transport, reason), 0) + spans

    def status(self) -> dict[str, Any]:
        exporters = {e.name: e.status() for e in self.exporters}
        detail = f"{len(self.exporters)} exporter(s), spool {self.spool.size_bytes} bytes" if self.spool \
            else "no exporter: recent traces only"
        errors = [f"{name}: {e['last_error']}" for name, e in exporters.items() if e["last_error"]]
        return {"state": self._state, "detail": detail, "last_error": "; ".join(errors) or None,
                "exporters": exporters, "recent_traces": self.recent.span_count}

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's Collector interface."""
        accepted = CounterMetricFamily("sidetrace_receiver_accepted_spans", "Spans accepted (durably queued).",
                                       labels=["transport"])
        for transport, count in sorted(self.accepted.items()):
            accepted.add_metric([transport], count)
        yield accepted
        refused = CounterMetricFamily("sidetrace_receiver_refused_spans",
                                      "Spans refused with an error the sender sees, by reason.",
                                      labels=["transport", "reason"])
        for (transport, reason), count in sorted(self.refused.items()):
            refused.add_metric([transport, reason], count)
        yield refused
        yield CounterMetricFamily("sidetrace_receiver_accepted_metric_points", "OTLP metric points taken.",
                                  value=self.accepted_points)
        yield CounterMetricFamily("sidetrace_redacted_attributes", "Attribute values replaced by redaction.",
                                  value=self.redaction.redacted)
        yield GaugeMetricFamily("sidetrace_recent_traces_spans", "Spans held for /debug/traces.",
                                value=self.recent.span_count)
        yield CounterMetricFamily("sidetrace_recent_traces_dropped_spans",
                                  "Spans not kept for /debug/traces because a trace was at max_spans_per_trace.",
                                  value=self.recent.dropped_spans)
        if self.span_metrics is not None:
            yield from self.span_metrics.families()
        if self.spool is not None:
            yield from self.spool.families()
            yield from exporter_families(self.exporters)
        yield from self.app_metrics.families()
