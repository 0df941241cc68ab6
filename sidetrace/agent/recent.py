"""Recent traces: the last requests' spans, for /debug/traces and `sidetrace traces`.

The hot path only keeps each accepted request's encoded bytes (the same object the spool wrote)
in a ring bounded by ``max_bytes`` and ``max_spans``; the oldest requests go first and their spans
are counted. The index (traces, their spans, summaries) is built from the ring when someone asks,
so a span costs its encoded size (about 250 bytes with 10 attributes) and no CPU until then. Each
span is shown once per trace id and span id however often it was received (SDK retries, re-sends
after a crash); ``max_traces`` and ``max_spans_per_trace`` bound what a query returns.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sidetrace.agent.processors.span_metrics import spans_by_service
from sidetrace.config import RecentTracesSection

# (span_id, parent_span_id, name, service, kind, start_ns, end_ns, status_code, status_message)
SpanRow = tuple[bytes, bytes, str, str, int, int, int, int, str]


class _Trace:
    __slots__ = ("spans", "dropped")

    def __init__(self) -> None:
        self.spans: dict[bytes, SpanRow] = {}
        self.dropped = 0


def _summary(trace_id: bytes, trace: _Trace) -> dict[str, Any]:
    spans = list(trace.spans.values())
    ids = trace.spans.keys()
    roots = [row for row in spans if not row[1] or row[1] not in ids]
    root = min(roots or spans, key=lambda row: row[5])
    start = min(row[5] for row in spans)
    end = max(row[6] for row in spans)
    return {
        "trace_id": trace_id.hex(),
        "root_service": root[3],
        "root_name": root[2],
        "services": sorted({row[3] for row in spans}),
        "span_count": len(spans),
        "spans_dropped": trace.dropped,
        "start_unix_nano": start,
        "duration_ms": round((end - start) / 1e6, 3),
        "error": any(row[7] == Status.STATUS_CODE_ERROR for row in spans),
    }


class RecentTraces:
    """A ring of recently accepted trace requests, indexed on demand (see module doc)."""

    def __init__(self, section: RecentTracesSection) -> None:
        self._ring: deque[tuple[bytes, int]] = deque()
        self._bytes = 0
        self._spans = 0
        self.dropped_spans = 0
        self._lock = threading.Lock()
        self.configure(section)

    def configure(self, section: RecentTracesSection) -> None:
        """Apply new bounds (at a reload), letting go of the oldest requests past them."""
        with self._lock:
            self.max_traces = section.max_traces
            self.max_spans_per_trace = section.max_spans_per_trace
            self.max_spans = section.max_spans
            self.max_bytes = section.max_bytes
            self._trim()

    def add(self, body: bytes, spans: int) -> None:
        """Keep an accepted request (its protobuf encoding and span count)."""
        with self._lock:
            self._ring.append((body, spans))
            self._bytes += len(body)
            self._spans += spans
            self._trim()

    def _trim(self) -> None:
        while self._ring and (self._bytes > self.max_bytes or self._spans > self.max_spans):
            body, spans = self._ring.popleft()
            self._bytes -= len(body)
            self._spans -= spans
            self.dropped_spans += spans

    @property
    def span_count(self) -> int:
        return self._spans

    def _index(self, only: bytes | None = None) -> OrderedDict[bytes, _Trace]:
        """Traces in the ring, least recently updated first (only trace ``only``, when given)."""
        with self._lock:
            ring = list(self._ring)
        traces: OrderedDict[bytes, _Trace] = OrderedDict()
        per_trace = self.max_spans_per_trace
        for body, _ in ring:
            if only is not None and only not in body:
                continue  # a byte search is far cheaper than decoding a request that cannot hold it
            for service, span in spans_by_service(ExportTraceServiceRequest.FromString(body)):
                trace_id = span.trace_id
                if only is not None and trace_id != only:
                    continue
                trace = traces.get(trace_id)
                if trace is None:
                    trace = traces[trace_id] = _Trace()
                else:
                    traces.move_to_end(trace_id)
                if span.span_id in trace.spans:
                    continue
                if len(trace.spans) >= per_trace:
                    trace.dropped += 1
                    continue
                trace.spans[span.span_id] = (span.span_id, span.parent_span_id, span.name, service, span.kind,
                                             span.start_time_unix_nano, span.end_time_unix_nano, span.status.code,
                                             span.status.message)
        while len(traces) > self.max_traces:
            traces.popitem(last=False)
        return traces

    def list(self, service: str | None = None, min_duration_ms: float = 0.0, limit: int = 20) -> list[dict[str, Any]]:
        """Summaries of the most recent traces first, filtered by service and minimum duration."""
        found = []
        traces = self._index()
        for trace_id in reversed(traces):
            summary = _summary(trace_id, traces[trace_id])
            if service and service not in summary["services"]:
                continue
            if summary["duration_ms"] < min_duration_ms:
                continue
            found.append(summary)
            if len(found) >= limit:
                break
        return found

    def get(self, trace_id_hex: str) -> dict[str, Any] | None:
        try:
            trace_id = bytes.fromhex(trace_id_hex)
        except ValueError:
            return None
        trace = self._index(only=trace_id).get(trace_id)
        if trace is None or not trace.spans:
            return None
        result = _summary(trace_id, trace)
        result["spans"] = [
            {
                "span_id": row[0].hex(), "parent_span_id": row[1].hex(), "name": row[2], "service": row[3],
                "kind": Span.SpanKind.Name(row[4]) if row[4] in Span.SpanKind.values() else str(row[4]),
                "start_unix_nano": row[5], "end_unix_nano": row[6], "duration_ms": round((row[6] - row[5]) / 1e6, 3),
                "status_code": Status.StatusCode.Name(row[7]) if row[7] in Status.StatusCode.values() else str(row[7]),
                "status_message": row[8],
            }
            for row in sorted(trace.spans.values(), key=lambda row: row[5])
        ]
        return result

    def families(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("sidetrace_recent_traces_spans", "Spans held for /debug/traces.", value=self._spans)
        yield GaugeMetricFamily("sidetrace_recent_traces_bytes", "Bytes of encoded spans held for /debug/traces "
                                "([recent_traces] max_bytes).", value=self._bytes, unit="bytes")
        yield CounterMetricFamily("sidetrace_recent_traces_dropped_spans_total",
                                  "Spans let go from /debug/traces to stay within [recent_traces] max_spans and "
                                  "max_bytes (oldest first).",
                                  value=self.dropped_spans)
