"""Recent traces: a bounded in-memory index of the last traces, for /debug/traces and `sidetrace traces`.

Bounded three ways: traces kept, spans per trace, and spans overall; the least recently
updated trace goes first. Spans past a bound are counted, never silently lost.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from sidetrace.agent.processors.span_metrics import spans_by_service
from sidetrace.config import RecentTracesSection

# (span_id, parent_span_id, name, service, kind, start_ns, end_ns, status_code, status_message)
SpanRow = tuple[bytes, bytes, str, str, int, int, int, int, str]


class _Trace:
    __slots__ = ("spans", "dropped")

    def __init__(self) -> None:
        self.spans: list[SpanRow] = []
        self.dropped = 0


def _summary(trace_id: bytes, trace: _Trace) -> dict[str, Any]:
    spans = trace.spans
    ids = {row[0] for row in spans}
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
    """The last traces seen, most recently updated last."""

    def __init__(self, section: RecentTracesSection) -> None:
        self.max_traces = section.max_traces
        self.max_spans_per_trace = section.max_spans_per_trace
        self.max_spans = section.max_spans
        self._traces: OrderedDict[bytes, _Trace] = OrderedDict()
        self._spans = 0
        self.dropped_spans = 0
        self._lock = threading.Lock()

    def apply(self, request: ExportTraceServiceRequest) -> None:
        traces = self._traces
        per_trace = self.max_spans_per_trace
        with self._lock:
            for service, span in spans_by_service(request):
                trace_id = span.trace_id
                trace = traces.get(trace_id)
                if trace is None:
                    trace = traces[trace_id] = _Trace()
                else:
                    traces.move_to_end(trace_id)
                if len(trace.spans) >= per_trace:
                    trace.dropped += 1
                    self.dropped_spans += 1
                    continue
                trace.spans.append((span.span_id, span.parent_span_id, span.name, service, span.kind,
                                    span.start_time_unix_nano, span.end_time_unix_nano, span.status.code,
                                    span.status.message))
                self._spans += 1
            while len(traces) > self.max_traces or self._spans > self.max_spans:
                _, evicted = traces.popitem(last=False)
                self._spans -= len(evicted.spans)

    @property
    def span_count(self) -> int:
        return self._spans

    def list(self, service: str | None = None, min_duration_ms: float = 0.0, limit: int = 20) -> list[dict[str, Any]]:
        """Summaries of the most recent traces first, filtered by service and minimum duration."""
        found = []
        with self._lock:  # summaries are computed under the lock: /debug requests are rare and small
            for trace_id in reversed(self._traces):
                trace = self._traces[trace_id]
                if not trace.spans:
                    continue
                summary = _summary(trace_id, trace)
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
        with self._lock:
            trace = self._traces.get(trace_id)
            if trace is None or not trace.spans:
                return None
            result = _summary(trace_id, trace)
            spans = list(trace.spans)
        result["spans"] = [
            {
                "span_id": row[0].hex(), "parent_span_id": row[1].hex(), "name": row[2], "service": row[3],
                "kind": Span.SpanKind.Name(row[4]) if row[4] in Span.SpanKind.values() else str(row[4]),
                "start_unix_nano": row[5], "end_unix_nano": row[6], "duration_ms": round((row[6] - row[5]) / 1e6, 3),
                "status_code": Status.StatusCode.Name(row[7]) if row[7] in Status.StatusCode.values() else str(row[7]),
                "status_message": row[8],
            }
            for row in sorted(spans, key=lambda row: row[5])
        ]
        return result
