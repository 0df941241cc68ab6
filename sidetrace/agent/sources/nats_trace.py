"""NATS server message tracing (ADR-41) as spans: the server hops between publisher and subscribers.

nats-server 2.11+ publishes a JSON trace event for each server a traced message crosses: for a
message with a ``Nats-Trace-Dest`` header, or with a sampled ``traceparent`` when the account sets
``msg_trace { dest: ..., sampling: N }``. This source subscribes to that subject and turns each
event into a ``nats-server {subject}`` SERVER span, parented by the publisher's span from the
message's ``traceparent``, with child spans for every delivery (``deliver {subject}``) and JetStream
store (``store {stream}``), and subject mapping, service import and stream export as span events.
The spans go through the agent's trace pipeline like any app's. A message traced without
``traceparent`` gets a trace of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from datetime import datetime
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sidetrace import __version__
from sidetrace.agent.components import Context
from sidetrace.config import NatsTraceSourceSection

log = logging.getLogger("sidetrace.nats_trace")

# The kinds of connection in trace events (nats-server's client kinds).
KINDS = {0: "client", 1: "router", 2: "gateway", 3: "system", 4: "leafnode", 5: "jetstream", 6: "account"}
RECONNECT_SECONDS = 2.0


def _ns(timestamp: str) -> int:
    """RFC 3339 with nanoseconds (as nats-server writes) to Unix nanoseconds."""
    head, _, rest = timestamp.rstrip("Z").partition(".")
    digits = "".join(ch for ch in rest if ch.isdigit())[:9].ljust(9, "0")
    whole = datetime.fromisoformat(head + "+00:00")
    return int(whole.timestamp()) * 1_000_000_000 + int(digits)


def _kv(key: str, value: Any) -> KeyValue:
    kv = KeyValue(key=key)
    if isinstance(value, bool):
        kv.value.bool_value = value
    elif isinstance(value, int):
        kv.value.int_value = value
    else:
        kv.value.string_value = str(value)
    return kv


def _traceparent(header: dict[str, Any]) -> tuple[bytes, bytes] | None:
    values = header.get("traceparent") or header.get("Traceparent") or []
    value = values[0] if isinstance(values, list) and values else values
    parts = str(value).split("-") if value else []
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16:
        return None
    try:
        return bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
    except ValueError:
        return None


def event_to_request(event: dict[str, Any]) -> ExportTraceServiceRequest:
    """One server's trace event as an OTLP request: the hop span and its delivery/store children.

    Raises KeyError, ValueError or TypeError for an event that is not a message trace.
    """
    server = event["server"]
    events = event["events"]
    ingress = next((e for e in events if e["type"] == "in"), None)
    if ingress is None:
        raise ValueError("a message trace event without its ingress ('in') event")
    context = _traceparent(event.get("request", {}).get("header") or {})
    trace_id, parent_id = context if context else (os.urandom(16), b"")
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.extend([
        _kv("service.name", "nats-server"), _kv("service.instance.id", server.get("id", "")),
        _kv("service.version", server.get("ver", "")), _kv("host.name", server.get("host", "")),
        _kv("nats.server.name", server.get("name", "")),
    ])
    scope = resource_spans.scope_spans.add()
    scope.scope.name, scope.scope.version = "sidetrace.nats_trace", __version__
    start = _ns(ingress["ts"])
    times = [_ns(e["ts"]) for e in events if e.get("ts")]
    hop = scope.spans.add(trace_id=trace_id, span_id=os.urandom(8), parent_span_id=parent_id,
                          name=f"nats-server {ingress.get('subj', '')}", kind=Span.SPAN_KIND_SERVER,
                          start_time_unix_nano=start, end_time_unix_nano=max(times + [start]))
    hop.attributes.extend([
        _kv("messaging.system", "nats"), _kv("messaging.destination.name", ingress.get("subj", "")),
        _kv("nats.account", ingress.get("acc", "")), _kv("nats.connection.kind", KINDS.get(ingress.get("kind"), "")),
        _kv("nats.connection.id", ingress.get("cid", 0)),
        _kv("messaging.message.envelope.size", event.get("request", {}).get("msgsize", 0)),
    ])
    if event.get("hops"):
        hop.attributes.append(_kv("nats.trace.hops", event["hops"]))
    errors = []
    for item in events:
        kind, when = item.get("type"), _ns(item["ts"]) if item.get("ts") else start
        if kind == "eg":
            child = scope.spans.add(trace_id=trace_id, span_id=os.urandom(8), parent_span_id=hop.span_id,
                                    name=f"deliver {item.get('sub') or ingress.get('subj', '')}",
                                    kind=Span.SPAN_KIND_PRODUCER, start_time_unix_nano=when, end_time_unix_nano=when)
            child.attributes.extend([_kv("nats.connection.kind", KINDS.get(item.get("kind"), "")),
                                     _kv("nats.connection.id", item.get("cid", 0))])
            if item.get("queue"):
                child.attributes.append(_kv("messaging.consumer.group.name", item["queue"]))
            if item.get("error"):
                child.status.code, child.status.message = Status.STATUS_CODE_ERROR, item["error"]
                errors.append(item["error"])
        elif kind == "js":
            child = scope.spans.add(trace_id=trace_id, span_id=os.urandom(8), parent_span_id=hop.span_id,
                                    name=f"store {item.get('stream', '')}", kind=Span.SPAN_KIND_INTERNAL,
                                    start_time_unix_nano=when, end_time_unix_nano=when)
            child.attributes.extend([_kv("nats.jetstream.stream", item.get("stream", "")),
                                     _kv("messaging.destination.name", item.get("subject", ""))])
            if item.get("nointerest"):
                child.attributes.append(_kv("nats.jetstream.no_interest", True))
            if item.get("error"):
                child.status.code, child.status.message = Status.STATUS_CODE_ERROR, item["error"]
                errors.append(item["error"])
        elif kind in ("sm", "se", "si"):
            name = {"sm": "subject mapping", "se": "stream export", "si": "service import"}[kind]
            hop.events.add(time_unix_nano=when, name=name,
                           attributes=[_kv(k, v) for k, v in item.items() if k not in ("type", "ts")])
    if ingress.get("error"):
        errors.insert(0, ingress["error"])
    if errors:
        hop.status.code, hop.status.message = Status.STATUS_CODE_ERROR, "; ".join(errors)
    return request


class NatsTraceSource:
    """Subscribes to the message-trace subject and feeds the spans to the trace pipeline."""

    def __init__(self, section: NatsTraceSourceSection, context: Context) -> None:
        self.section = section
        self._context = context
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None
        self._state = "created"
        self._last_error: str | None = None
        self.events = 0
        self.spans = 0
        self.malformed = 0
        self.undelivered = 0

    async def start(self) -> None:
        if self.section.credentials:
            # Unreadable credentials would only show as a connection retried forever; refuse them at start.
            try:
                with open(self.section.credentials, "rb"):
                    pass
            except OSError as exc:
                raise RuntimeError(f'sources.nats_trace.credentials: cannot read "{self.section.credentials}": '
                                   f"{exc.strerror or exc}") from None
        self._task = asyncio.create_task(self._run(), name="nats-trace")
        self._state = "connecting"

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
        self._state = "stopped"

    async def _run(self) -> None:
        import nats  # only when the source is enabled

        options: dict[str, Any] = {"servers": list(self.section.servers), "name": f"sidetrace@{socket.gethostname()}",
                                   "connect_timeout": 2, "max_reconnect_attempts": -1,
                                   "reconnect_time_wait": RECONNECT_SECONDS}
        if self.section.credentials:
            options["user_credentials"] = self.section.credentials
        while True:
            try:
                self._client = await nats.connect(**options, error_cb=self._error, disconnected_cb=self._down,
                                                  reconnected_cb=self._up)
                await self._client.subscribe(self.section.subject, cb=self._on_event)
                self._state = "running"
                self._last_error = None
                log.info("receiving NATS message-trace events on %s from %s", self.section.subject,
                         ", ".join(self.section.servers))
                return
            except Exception as exc:  # the servers may come later: keep trying, say why
                message = f"cannot connect to {', '.join(self.section.servers)}: {exc or type(exc).__name__}"
                if message != self._last_error:
                    log.warning("%s; retrying every %.0f s", message, RECONNECT_SECONDS)
                self._last_error = message
                self._state = "connecting"
                await asyncio.sleep(RECONNECT_SECONDS)

    async def _error(self, exc: Exception) -> None:
        # nats-py keeps retrying the first connection itself and reports each failure here.
        where = "NATS" if self._state == "running" else f"cannot connect to {', '.join(self.section.servers)}"
        message = f"{where}: {type(exc).__name__}: {exc}"
        if message != self._last_error:
            log.warning("%s", message)
        self._last_error = message

    async def _down(self) -> None:
        self._state = "reconnecting"

    async def _up(self) -> None:
        self._state = "running"

    async def _on_event(self, msg: Any) -> None:
        self.events += 1
        try:
            request = event_to_request(json.loads(msg.data))
        except (ValueError, KeyError, TypeError) as exc:
            self.malformed += 1
            self._last_error = f"malformed trace event: {type(exc).__name__}: {exc}"
            return
        sink = self._context.links.traces.get()
        spans = len(request.resource_spans[0].scope_spans[0].spans)
        try:
            if sink is None:
                raise RuntimeError("the trace pipeline is not running")
            await sink.accept_traces(request)
        except Exception as exc:  # the spool is full or busy: count, the event is not retried
            self.undelivered += spans
            self._last_error = f"could not queue spans: {exc}"
            return
        self.spans += spans

    def status(self) -> dict[str, Any]:
        return {"state": self._state, "last_error": self._last_error,
                "detail": f"{self.section.subject} on {', '.join(self.section.servers)}: {self.events} events"}

    def collect(self) -> list[Metric]:
        families: list[Metric] = []
        for name, doc, value in (
            ("sidetrace_nats_trace_events_total", "NATS message-trace events received.", self.events),
            ("sidetrace_nats_trace_spans_total", "Spans made from them and queued.", self.spans),
            ("sidetrace_nats_trace_malformed_events_total", "Events that were not a message trace.", self.malformed),
            ("sidetrace_nats_trace_undelivered_spans_total", "Spans the pipeline refused (spool busy).",
             self.undelivered),
        ):
            families.append(CounterMetricFamily(name, doc, value=value))
        families.append(GaugeMetricFamily("sidetrace_nats_trace_connected", "1 while subscribed to a server.",
                                          value=1 if self._state == "running" else 0))
        return families
