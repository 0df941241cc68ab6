"""The NATS span builder and instruments: names, attributes and metrics per the messaging conventions."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.metrics import Meter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer

from sidetrace.instrumentors._messaging import GETTER, SETTER, BoundedValues, Guard, header_bytes

SYSTEM = "nats"
JS_ACK_PREFIX = "$JS.ACK."
WILDCARDS = ("*", ">")
# Attributes of our own, where the conventions have none for NATS.
STREAM = "messaging.nats.jetstream.stream"
SEQUENCE = "messaging.nats.jetstream.sequence"
DUPLICATE = "messaging.nats.jetstream.duplicate"
DELIVERED = "messaging.nats.jetstream.delivered_count"
MSG_ID_HEADER = "Nats-Msg-Id"


class Telemetry:
    """Everything the wrappers need: tracer, instruments, options, the guard."""

    def __init__(self, tracer: Tracer, meter: Meter, guard: Guard, use_links: bool, settle_spans: bool) -> None:
        self.tracer = tracer
        self.guard = guard
        self.use_links = use_links
        self.settle_spans = settle_spans
        self.destinations = BoundedValues()
        self.injection_misses = 0
        self.operation_duration = meter.create_histogram(
            "messaging.client.operation.duration", unit="s",
            description="Duration of publish, request, receive and settle operations.")
        self.process_duration = meter.create_histogram(
            "messaging.process.duration", unit="s", description="Duration of processing one message.")
        self.sent = meter.create_counter(
            "messaging.client.sent.messages", unit="{message}", description="Messages sent.")
        self.consumed = meter.create_counter(
            "messaging.client.consumed.messages", unit="{message}", description="Messages received or delivered.")
        self.misses = meter.create_counter(
            "sidetrace.nats.context_injection.misses", unit="{message}",
            description="Messages sent without trace headers (server without headers, or over max_payload).")

    # names -------------------------------------------------------------------------------------

    @staticmethod
    def template(subject: str, client: Any) -> tuple[str, str | None, bool]:
        """(name part, destination template, temporary) for a subject: no random token in a name."""
        prefix = _inbox_prefix(client)
        if subject.startswith(prefix + "."):
            return f"{prefix}.*", f"{prefix}.*", True
        if subject.startswith(JS_ACK_PREFIX):
            return "$JS.ACK.*", "$JS.ACK.*", True
        if any(token in WILDCARDS for token in subject.split(".")):
            return subject, subject, False
        return subject, None, False

    def base_attributes(self, operation: str, kind: str, subject: str, client: Any,
                        template: str | None = None) -> dict[str, Any]:
        name_part, inferred, temporary = self.template(subject, client)
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM,
            "messaging.operation.name": operation,
            "messaging.operation.type": kind,
            "messaging.destination.name": subject,
        }
        template = template or inferred
        if template:
            attributes["messaging.destination.template"] = template
        if temporary:
            attributes["messaging.destination.temporary"] = True
        url = getattr(client, "connected_url", None)
        if url is not None:
            attributes["server.address"] = url.hostname or ""
            if url.port:
                attributes["server.port"] = url.port
        client_id = getattr(client, "_client_id", None)
        if client_id is not None:
            attributes["messaging.client.id"] = str(client_id)
        return attributes

    def span_name(self, operation: str, subject: str, client: Any, template: str | None = None) -> str:
        return f"{operation} {template or self.template(subject, client)[0]}"

    # context -----------------------------------------------------------------------------------

    @staticmethod
    def extract(headers: Mapping[str, str] | None) -> otel_context.Context | None:
        if not headers:
            return None
        ctx = propagate.extract(headers, getter=GETTER)
        return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None

    def inject(self, headers: Mapping[str, str] | None, payload_size: int, client: Any,
               ctx: otel_context.Context | None = None) -> dict[str, str] | None:
        """A copy of ``headers`` with trace context, or the headers unchanged when it cannot travel."""
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=ctx, setter=SETTER)
        if not carrier:
            return dict(headers) if headers is not None else None
        server_info = getattr(client, "_server_info", None) or {}
        merged = {**(headers or {}), **carrier}
        max_payload = getattr(client, "_max_payload", None) or 1024 * 1024
        if not server_info.get("headers", True) or payload_size + header_bytes(merged.items()) > max_payload:
            self.injection_misses += 1
            self.misses.add(1, {"messaging.system": SYSTEM})
            return dict(headers) if headers is not None else None
        return merged

    def consumer_context(self, headers: Mapping[str, str] | None) -> tuple[otel_context.Context | None, list[Link]]:
        """Parent context and links for a consumer span: the producer as parent, or as a link if asked."""
        producer = self.extract(headers)
        if producer is None:
            return None, []
        link = Link(trace.get_current_span(producer).get_span_context())
        if self.use_links:
            return None, [link]
        return producer, []

    # metrics -------------------------------------------------------------------------------------

    def metric_attributes(self, attributes: Mapping[str, Any], error: str | None) -> dict[str, Any]:
        destination = attributes.get("messaging.destination.template") or attributes["messaging.destination.name"]
        result = {
            "messaging.system": SYSTEM,
            "messaging.operation.name": attributes["messaging.operation.name"],
            "messaging.destination.name": self.destinations(destination),
        }
        if "messaging.consumer.group.name" in attributes:
            result["messaging.consumer.group.name"] = attributes["messaging.consumer.group.name"]
        if error:
            result["error.type"] = error
        return result


def _inbox_prefix(client: Any) -> str:
    prefix = getattr(client, "_inbox_prefix", None)
    if isinstance(prefix, (bytes, bytearray)):
        return prefix.decode()
    return "_INBOX"


def record_error(span: Span, exc: BaseException) -> str:
    error_type = type(exc).__qualname__
    if span.is_recording():
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, str(exc) or error_type))
        span.set_attribute("error.type", error_type)
    return error_type


class Timer:
    __slots__ = ("started",)

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.started


__all__ = ["DELIVERED", "DUPLICATE", "MSG_ID_HEADER", "SEQUENCE", "STREAM", "SpanKind", "Telemetry", "Timer",
           "record_error"]
