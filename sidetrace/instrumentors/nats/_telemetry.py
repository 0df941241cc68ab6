"""The NATS span builder and instruments: names, attributes and metrics per the messaging conventions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.trace import Link, Span, Status, StatusCode, Tracer

from sidetrace.instrumentors._messaging import OTHER, BoundedValues, Guard
from sidetrace.instrumentors.nats._context import HeaderContext

SYSTEM = "nats"
JS_ACK_PREFIX = "$JS.ACK."
WILDCARDS = ("*", ">")
# Attributes of our own, where the conventions have none for NATS.
STREAM = "messaging.nats.jetstream.stream"
SEQUENCE = "messaging.nats.jetstream.sequence"
DUPLICATE = "messaging.nats.jetstream.duplicate"
DELIVERED = "messaging.nats.jetstream.delivered_count"
BODY_SIZE = "messaging.message.body.size"
MSG_ID_HEADER = "Nats-Msg-Id"
PEER_ATTR = "_sidetrace_peer"
DESTINATIONS_ATTR = "_sidetrace_destinations"
CACHE_LIMIT = 4096  # subjects whose names and metric attributes are remembered
DESTINATION_LIMIT = 1024  # destinations remembered per connection (each holds a few hundred bytes)
HEADER_LINES = len("NATS/1.0\r\n\r\n")  # the version line and the blank line of a header block


class Destination:
    """What every message of one operation on one subject shares: its span name, the span attributes
    that do not vary per message (each span gets a copy with its own added; this dict never reaches
    the SDK), and the metric attributes of a message that went without error."""

    __slots__ = ("attributes", "metrics", "name")

    def __init__(self, name: str, attributes: dict[str, Any], metrics: dict[str, Any]) -> None:
        self.name = name
        self.attributes = attributes
        self.metrics = metrics


class MessageCounts:
    """Cumulative message counts by metric attributes, observed by an ObservableCounter."""

    def __init__(self) -> None:
        # id of an attributes dict from Telemetry.metric_attributes (shared, never freed) -> [attributes, count]
        self._counts: dict[int, list] = {}

    def add(self, amount: int, attributes: dict[str, Any]) -> None:
        entry = self._counts.get(id(attributes))
        if entry is None:
            entry = self._counts[id(attributes)] = [attributes, 0]
        entry[1] += amount

    def observe(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(count, attributes) for attributes, count in list(self._counts.values())]


class Telemetry:
    """Everything the wrappers need: tracer, instruments, options, the guard."""

    def __init__(self, tracer: Tracer, meter: Meter, guard: Guard, use_links: bool, settle_spans: bool) -> None:
        self.tracer = tracer
        self.active = True  # until uninstrumented
        self.guard = guard
        self.use_links = use_links
        self.settle_spans = settle_spans
        self.headers = HeaderContext()
        # 200 destinations per operation: publishers of id-bearing subjects (orders.1, orders.2, ...) use
        # up their own operation's share, and a consumer's wildcard template keeps its name
        self.destinations: dict[str, BoundedValues] = {}
        self._templates: dict[tuple[str, str], tuple[str, str | None, bool]] = {}
        self._metric_attributes: dict[tuple, dict[str, Any]] = {}
        self.injection_misses = 0
        self.operation_duration = meter.create_histogram(
            "messaging.client.operation.duration", unit="s",
            description="Duration of publish, request, receive and settle operations.")
        self.process_duration = meter.create_histogram(
            "messaging.process.duration", unit="s", description="Duration of processing one message.")
        # Message counts are summed here and read by the SDK at collection time (observable counters):
        # a dict increment per message instead of an SDK measurement, on the hottest path there is.
        self.sent = MessageCounts()
        self.consumed = MessageCounts()
        meter.create_observable_counter("messaging.client.sent.messages", [self.sent.observe], unit="{message}",
                                        description="Messages sent.")
        meter.create_observable_counter("messaging.client.consumed.messages", [self.consumed.observe],
                                        unit="{message}", description="Messages received or delivered.")
        self.misses = meter.create_counter(
            "sidetrace.nats.context_injection.misses", unit="{message}",
            description="Messages sent without trace headers (server without headers, or over max_payload).")

    # names -------------------------------------------------------------------------------------

    def template(self, subject: str, client: Any) -> tuple[str, str | None, bool]:
        """(name part, destination template, temporary) for a subject: no random token in a name."""
        prefix = _inbox_prefix(client)
        key = (prefix, subject)
        found = self._templates.get(key)
        if found is None:
            found = _template(subject, prefix)
            if len(self._templates) < CACHE_LIMIT and not found[2]:  # temporary subjects are one-offs
                self._templates[key] = found
        return found

    def base_attributes(self, operation: str, kind: str, subject: str, client: Any,
                        template: str | None = None) -> dict[str, Any]:
        _, inferred, temporary = self.template(subject, client)
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
        attributes.update(_peer(client))
        return attributes

    def span_name(self, operation: str, subject: str, client: Any, template: str | None = None) -> str:
        return f"{operation} {template or self.template(subject, client)[0]}"

    def destination(self, operation: str, kind: str, subject: str, client: Any, template: str | None = None,
                    queue: str | None = None) -> Destination:
        """The shared part of a message's telemetry, remembered per connection (and rebuilt when it
        reconnects elsewhere, as its ``server.*`` attributes change) for up to DESTINATION_LIMIT
        operations and subjects; past that, built for each message."""
        url = getattr(client, "connected_url", None)
        client_id = getattr(client, "_client_id", None)
        cache = getattr(client, DESTINATIONS_ATTR, None)
        if cache is None or cache[0] is not self or cache[1] is not url or cache[2] != client_id:
            cache = (self, url, client_id, {})
            if client is not None:
                setattr(client, DESTINATIONS_ATTR, cache)
        key = (operation, subject, template, queue)
        found = cache[3].get(key)
        if found is None:
            name, _, temporary = self.template(subject, client)
            attributes = self.base_attributes(operation, kind, subject, client, template)
            if queue:
                attributes["messaging.consumer.group.name"] = queue
            found = Destination(f"{operation} {template or name}", attributes, self.metric_attributes(attributes, None))
            if not temporary and len(cache[3]) < DESTINATION_LIMIT:  # temporary subjects are one-offs
                cache[3][key] = found
        return found

    # context -----------------------------------------------------------------------------------

    def extract(self, headers: Mapping[str, str] | None) -> otel_context.Context | None:
        """The producer's context in ``headers``; None when they carry none, or when the propagator's
        extract raises (counted once as ``extract``: the span is made all the same, without it)."""
        try:
            return self.headers.extract(headers)
        except Exception as exc:
            self.guard.failed("extract", exc)
            return None

    def inject(self, headers: Mapping[str, str] | None, payload_size: int, client: Any, span: Span | None = None,
               owned: bool = False) -> dict[str, str] | None:
        """A copy of ``headers`` with ``span``'s trace context (the current one when None), or the
        headers unchanged when it cannot travel. ``owned`` headers are ours: updated, not copied."""
        carrier = self.headers.fields(span)
        if not carrier:
            return dict(headers) if headers is not None and not owned else headers
        if headers:
            if owned:
                headers.update(carrier)  # type: ignore[attr-defined]
                merged = headers
            else:
                merged = {**headers, **carrier}
        else:
            merged = carrier
        server_info = getattr(client, "_server_info", None) or {}
        max_payload = getattr(client, "_max_payload", None) or 1024 * 1024
        size = payload_size + HEADER_LINES
        try:
            for key, value in merged.items():
                size += len(key) + len(value) + 4
        except TypeError:  # a header that is not a str: the app's mistake, for nats-py to refuse
            return dict(headers) if headers is not None and not owned else headers
        if not server_info.get("headers", True) or size > max_payload:
            self.injection_misses += 1
            self.misses.add(1, {"messaging.system": SYSTEM})
            if owned and headers:
                for key in carrier:
                    del headers[key]  # type: ignore[attr-defined]
                return headers
            return dict(headers) if headers is not None else None
        return merged

    def consumer_context(self, headers: Mapping[str, str] | None) -> tuple[otel_context.Context | None, list[Link]]:
        """The context a consumer span starts in (the message's: its baggage, and the producer as
        parent, or none with the producer as a link if asked), or None when the message carries none."""
        try:  # inline, not through extract(): this runs for every message processed
            producer = self.headers.extract(headers)
        except Exception as exc:
            self.guard.failed("extract", exc)
            return None, []
        if producer is None:
            return None, []
        if self.use_links:
            return trace.set_span_in_context(trace.INVALID_SPAN, producer), [
                Link(trace.get_current_span(producer).get_span_context())]
        return producer, []

    # metrics -------------------------------------------------------------------------------------

    def metric_attributes(self, attributes: Mapping[str, Any], error: str | None) -> dict[str, Any]:
        """The low-cardinality attributes of a metric point, one shared dict per distinct set."""
        destination = attributes.get("messaging.destination.template") or attributes["messaging.destination.name"]
        key = (attributes["messaging.operation.name"], destination, attributes.get("messaging.consumer.group.name"),
               error)
        found = self._metric_attributes.get(key)
        if found is not None:
            return found
        if len(self._metric_attributes) >= CACHE_LIMIT:  # every set stays shared: MessageCounts keys on it
            key = (key[0], OTHER, None, error)
            destination = OTHER
            found = self._metric_attributes.get(key)
            if found is not None:
                return found
        found = {
            "messaging.system": SYSTEM,
            "messaging.operation.name": key[0],
            "messaging.destination.name": self.destinations.setdefault(key[0], BoundedValues())(destination),
        }
        if key[2]:
            found["messaging.consumer.group.name"] = key[2]
        if error:
            found["error.type"] = error
        self._metric_attributes[key] = found
        return found


def _template(subject: str, prefix: str) -> tuple[str, str | None, bool]:
    if subject.startswith(prefix + "."):
        return f"{prefix}.*", f"{prefix}.*", True
    if subject.startswith(JS_ACK_PREFIX):
        return "$JS.ACK.*", "$JS.ACK.*", True
    if any(token in WILDCARDS for token in subject.split(".")):
        return subject, subject, False
    return subject, None, False


def _peer(client: Any) -> dict[str, Any]:
    """server.address, server.port and messaging.client.id of a connection, computed once per connection."""
    url = getattr(client, "connected_url", None)
    client_id = getattr(client, "_client_id", None)
    cached = getattr(client, PEER_ATTR, None)
    if cached is not None and cached[0] is url and cached[1] == client_id:
        return cached[2]
    attributes: dict[str, Any] = {}
    if url is not None:
        attributes["server.address"] = url.hostname or ""
        if url.port:
            attributes["server.port"] = url.port
    if client_id is not None:
        attributes["messaging.client.id"] = str(client_id)
    if client is not None:
        setattr(client, PEER_ATTR, (url, client_id, attributes))
    return attributes


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
