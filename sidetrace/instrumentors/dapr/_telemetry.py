"""Spans, metrics and context handling shared by the Dapr client and server hooks."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.metrics import Meter
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags, Tracer

from sidetrace._grpc_status import status_details
from sidetrace.instrumentors._messaging import GETTER, SETTER, BoundedValues, Guard
from sidetrace.instrumentors.dapr._operations import DAPR_SERVICE, Operation

# Bodies we read to find a Dapr error code or a CloudEvent's routing fields are at most this big;
# a larger one is left alone (the span keeps the HTTP status as its error type).
MAX_INSPECTED_BODY = 64 * 1024
CACHE_LIMIT = 4096  # distinct attribute sets kept per cache; past it they are built per call
CLOUDEVENT_TYPES = ("application/cloudevents+json", "application/cloudevents-batch+json")


class Telemetry:
    def __init__(self, tracer: Tracer, meter: Meter, guard: Guard) -> None:
        self.tracer = tracer
        self.guard = guard
        self.components = BoundedValues()
        self.duration = meter.create_histogram(
            "dapr.client.operation.duration", unit="s",
            description="Duration of calls to the Dapr sidecar, by building block, component and outcome.")
        self._metric_attributes: dict[tuple[str, str, str | None, str | None], dict[str, Any]] = {}
        self._client_attributes: dict[tuple[str, str, tuple[str, int] | None, bool], dict[str, Any]] = {}

    # client ---------------------------------------------------------------------------------------

    def start_client(self, op: Operation, server: tuple[str, int] | None, grpc: bool = False,
                     extra: Mapping[str, Any] | None = None) -> Span:
        """Starts the span of one call. The attributes an operation shares across calls are built once
        per (operation, sidecar) and reused: the SDK copies them into each span."""
        key = (op.name, op.api, server, grpc)
        attributes = self._client_attributes.get(key)
        if attributes is None:
            attributes = op.span_attributes()
            if server is not None:
                attributes["server.address"], attributes["server.port"] = server
            if grpc:
                attributes.update({"rpc.system": "grpc", "rpc.service": DAPR_SERVICE,
                                   "rpc.method": op.api.rpartition("/")[2]})
            if len(self._client_attributes) < CACHE_LIMIT:
                self._client_attributes[key] = attributes
        if op.per_call or extra:
            attributes = {**attributes, **(op.per_call or {}), **(extra or {})}
        return self.tracer.start_span(op.name, kind=SpanKind.PRODUCER if op.producer else SpanKind.CLIENT,
                                      attributes=attributes)

    def finish_client(self, span: Span, op: Operation, started: float, error_type: str | None,
                      message: str | None = None, exc: BaseException | None = None) -> None:
        if error_type is not None:
            mark_error(span, error_type, message, exc)
        try:
            span.end()
        finally:  # a SpanProcessor whose on_end raises costs the span, not the call's metric
            self.record(op, time.perf_counter() - started, error_type)

    def record(self, op: Operation, seconds: float, error_type: str | None) -> None:
        key = (op.block, op.operation, op.component, error_type)
        attributes = self._metric_attributes.get(key)
        if attributes is None:
            attributes = {"dapr.building_block": op.block, "dapr.operation": op.operation,
                          "dapr.outcome": "error" if error_type else "success"}
            if op.component is not None:
                attributes["dapr.component.name"] = self.components(op.component)
            if error_type:
                attributes["error.type"] = error_type
            if len(self._metric_attributes) < CACHE_LIMIT:
                self._metric_attributes[key] = attributes
        self.duration.record(seconds, attributes)


def mark_error(span: Span, error_type: str, message: str | None = None, exc: BaseException | None = None) -> None:
    if not span.is_recording():
        return
    if exc is not None:
        span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, message or error_type))
    span.set_attribute("error.type", error_type)
    if not error_type.isdigit():
        span.set_attribute("dapr.error_code", error_type)


def inject(carrier: dict[str, str], span: Span | None = None) -> dict[str, str]:
    """Puts the context of ``span`` (default: the current one) into ``carrier``."""
    propagate.inject(carrier, context=trace.set_span_in_context(span) if span is not None else None, setter=SETTER)
    return carrier


# errors ------------------------------------------------------------------------------------------

def http_error_code(body: bytes | None) -> tuple[str | None, str | None]:
    """(errorCode, message) from a Dapr HTTP error body ``{"errorCode": ..., "message": ...}``."""
    if not body or len(body) > MAX_INSPECTED_BODY:
        return None, None
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, None
    if not isinstance(parsed, dict):
        return None, None
    code, message = parsed.get("errorCode"), parsed.get("message")
    return (code if isinstance(code, str) and code else None), (message if isinstance(message, str) else None)


def grpc_error_type(error: Any) -> tuple[str, str | None]:
    """error.type of a failed gRPC call: the ``reason`` of the google.rpc.ErrorInfo in Dapr's rich
    status details (what the SDK's DaprGrpcError.error_code() returns), else the status code name."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    name = getattr(code, "name", None) or type(error).__qualname__
    message = error.details() if callable(getattr(error, "details", None)) else None
    trailers = error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else None
    reason = error_info_reason(trailers)
    return reason or name, message


def error_info_reason(trailers: Iterable[Any] | None) -> str | None:
    if not trailers:
        return None
    from google.rpc import error_details_pb2

    return next((info.reason for info in status_details(trailers, error_details_pb2.ErrorInfo) if info.reason), None)


# inbound context ---------------------------------------------------------------------------------

def grpc_trace_bin(value: bytes) -> SpanContext | None:
    """Decodes the OpenCensus binary trace context daprd sends as gRPC metadata ``grpc-trace-bin``:
    version 0, then field 0 (16-byte trace id), field 1 (8-byte span id), field 2 (1-byte options)."""
    if len(value) < 1 or value[0] != 0:
        return None
    trace_id = span_id = 0
    flags = 0
    position = 1
    sizes = {0: 16, 1: 8, 2: 1}
    while position < len(value):
        field, position = value[position], position + 1
        size = sizes.get(field)
        if size is None or position + size > len(value):
            break
        chunk, position = value[position:position + size], position + size
        if field == 0:
            trace_id = int.from_bytes(chunk, "big")
        elif field == 1:
            span_id = int.from_bytes(chunk, "big")
        else:
            flags = chunk[0] & 1
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))


def extract_parent(headers: Mapping[str, Any], cloudevent: Mapping[str, Any] | None = None) -> otel_context.Context:
    """The parent of an inbound span: the W3C ``traceparent`` header (via the configured propagator),
    else daprd's gRPC ``grpc-trace-bin``, else the CloudEvent's ``traceparent`` field."""
    found = propagate.extract(headers, getter=GETTER)
    if trace.get_current_span(found).get_span_context().is_valid:
        return found
    binary = headers.get("grpc-trace-bin")
    if isinstance(binary, bytes):
        context = grpc_trace_bin(binary)
        if context is not None:
            return trace.set_span_in_context(NonRecordingSpan(context))
    if cloudevent:
        fields = {k: cloudevent[k] for k in ("traceparent", "tracestate") if isinstance(cloudevent.get(k), str)}
        if fields:
            return propagate.extract(fields, getter=GETTER)
    return found


def cloudevent_from(body: bytes | None) -> dict[str, Any] | None:
    if not body or len(body) > MAX_INSPECTED_BODY:
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return parsed if isinstance(parsed, dict) else None


def subscription_operation(cloudevent: Mapping[str, Any] | None, topic: str | None = None,
                           pubsub: str | None = None) -> tuple[str, dict[str, Any]]:
    """Span name and attributes of one pub/sub delivery to the app."""
    event = cloudevent or {}
    topic = topic or str(event.get("topic") or "unknown")
    pubsub = pubsub or str(event.get("pubsubname") or "unknown")
    attributes: dict[str, Any] = {
        "messaging.system": "dapr", "messaging.operation.type": "process", "messaging.operation.name": "process",
        "messaging.destination.name": topic, "dapr.component.name": pubsub, "dapr.component.type": "pubsub"}
    if event.get("id"):
        attributes["messaging.message.id"] = str(event["id"])
    return f"process {pubsub}/{topic}", attributes


def headers_dict(pairs: Iterable[tuple[Any, Any]]) -> dict[str, Any]:
    """Lower-cased header/metadata dict; str values decoded from bytes except binary (-bin) keys."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        key = key.decode("latin-1") if isinstance(key, bytes) else str(key)
        key = key.lower()
        if isinstance(value, bytes) and not key.endswith("-bin"):
            value = value.decode("latin-1")
        result[key] = value
    return result
