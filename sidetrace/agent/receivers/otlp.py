"""OTLP receiver: traces and metrics over gRPC (4317) and HTTP (4318, protobuf or JSON, gzip or deflate).

Accepts whatever a stock OpenTelemetry SDK exporter sends with its defaults. A trace request is
answered with success only after the trace pipeline has written it to the spool. When the pipeline
cannot take it now the receiver refuses with its protocol's retryable answer (gRPC UNAVAILABLE, HTTP
429 with Retry-After) instead of buffering; malformed input gets INVALID_ARGUMENT or a 4xx. Every
HTTP refusal carries a ``google.rpc.Status`` body in the request's own encoding.

Slow and stalled clients cannot starve the receivers: a request whose body (HTTP) or message (gRPC)
has not arrived within ``read_timeout_seconds`` is refused, a connection that sends no complete
request for ``idle_timeout_seconds`` is closed, and a processing slot (``MAX_CONCURRENT_REQUESTS``)
is taken only once a request has arrived whole. Every refusal is counted, by transport and reason,
in ``sidetrace_receiver_refused_requests_total`` (and its spans, when they could be counted, in
``sidetrace_receiver_refused_spans_total``); each reason is logged at most once a minute.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import socket
import ssl
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from prometheus_client.core import CounterMetricFamily, Metric

from sidetrace._aio import within
from sidetrace.agent.components import Context
from sidetrace.agent.pipeline import SinkBusy, span_count
from sidetrace.config import OtlpReceiverSection, parse_host_port

log = logging.getLogger("sidetrace.otlp")

TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
METRICS_SERVICE = "opentelemetry.proto.collector.metrics.v1.MetricsService"
RETRY_AFTER_SECONDS = "1"
MAX_CONCURRENT_REQUESTS = 64  # requests being processed at once, per transport
MAX_READING_REQUESTS = 256  # HTTP requests whose bodies are being read at once
MAX_JSON_DEPTH = 128
MAX_GRPC_STREAMS_PER_CONNECTION = 100
LOG_EVERY_SECONDS = 60.0
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
ENCODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 15}  # zlib wbits
# OTLP/JSON writes these ids as hex, where protobuf's JSON mapping expects base64.
_HEX_ID_KEYS = frozenset(("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"))
# gRPC status code numbers, for google.rpc.Status bodies
_CODES = {400: 3, 401: 16, 404: 5, 405: 12, 408: 4, 413: 8, 415: 3, 429: 8, 503: 14}  # google.rpc.Code


# Every reason a request can be refused for, by transport: each is exported at 0 from the start, so that an alert
# on `increase()` or `rate()` fires on the first refusal rather than on the second.
REFUSAL_REASONS = {
    "grpc": ("unauthenticated", "invalid", "too_large", "read_timeout", "too_many_requests", "busy", "disk_full",
             "spool_error", "unavailable"),
    "http": ("unauthenticated", "not_found", "method_not_allowed", "invalid", "json_too_deep", "bad_encoding",
             "unsupported_encoding", "unsupported_media_type", "too_large", "read_timeout", "too_many_requests",
             "busy", "disk_full", "spool_error", "unavailable"),
}


class Refusal(Exception):
    """A request turned away: its HTTP status, gRPC code, metric reason and the message the sender reads."""

    def __init__(self, status: int, code: grpc.StatusCode, reason: str, message: str, spans: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.reason = reason
        self.spans = spans


def _bad(reason: str, message: str) -> Refusal:
    return Refusal(400, grpc.StatusCode.INVALID_ARGUMENT, reason, message)


def _hex_ids_to_base64(document: Any) -> None:
    """Rewrite OTLP/JSON's hex ids in place, iteratively, refusing documents nested past MAX_JSON_DEPTH."""
    stack = [(document, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _bad("json_too_deep", f"invalid OTLP/JSON: nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _HEX_ID_KEYS and isinstance(value, str):
                    try:
                        node[key] = base64.b64encode(bytes.fromhex(value)).decode()
                    except ValueError:
                        raise _bad("invalid", f"{key}: expected a hex string, got {value[:40]!r}") from None
                elif isinstance(value, (dict, list)):
                    stack.append((value, depth + 1))
        elif isinstance(node, list):
            stack.extend((item, depth + 1) for item in node if isinstance(item, (dict, list)))


def parse_json(body: bytes, message_type: type) -> Any:
    try:
        document = json.loads(body)
    except RecursionError:
        raise _bad("json_too_deep", f"invalid OTLP/JSON: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad("invalid", f"invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise _bad("invalid", "invalid OTLP/JSON: expected an object at the top level")
    _hex_ids_to_base64(document)
    message = message_type()
    try:
        json_format.ParseDict(document, message, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        raise _bad("invalid", f"invalid OTLP/JSON: {exc}") from None
    return message


def parse_protobuf(body: bytes, message_type: type) -> Any:
    try:
        return message_type.FromString(body)
    except (DecodeError, RecursionError, ValueError) as exc:
        raise _bad("invalid", f"invalid protobuf {message_type.__name__}: {exc}") from None


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """Decompress a request body, refusing one that inflates past ``limit`` bytes (without inflating further)."""
    decompressor = zlib.decompressobj(ENCODINGS[encoding])
    try:
        data = decompressor.decompress(body, limit + 1)
    except zlib.error as exc:
        if encoding != "deflate":
            raise _bad("bad_encoding", f"invalid {encoding} body: {exc}") from None
        try:  # some clients send raw deflate without the zlib wrapper
            decompressor = zlib.decompressobj(-15)
            data = decompressor.decompress(body, limit + 1)
        except zlib.error:
            raise _bad("bad_encoding", f"invalid deflate body: {exc}") from None
    if len(data) > limit or decompressor.unconsumed_tail:
        raise Refusal(413, grpc.StatusCode.RESOURCE_EXHAUSTED, "too_large",
                      f"request body inflates to more than {limit} bytes ([receivers.otlp] max_request_bytes)")
    if not decompressor.eof:
        raise _bad("bad_encoding", f"truncated {encoding} body")
    return data


def _server_ssl(section: OtlpReceiverSection) -> ssl.SSLContext | None:
    if not section.tls.cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(section.tls.cert_file, section.tls.key_file)
    return context


def _check_bindable(key: str, address: str) -> None:
    """Fail with the config key when ``address`` cannot be bound (grpc would only log a C-core line)."""
    host, port = parse_host_port(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise RuntimeError(f"receivers.otlp.{key}: cannot listen on {address}: {exc.strerror or exc}") from None


class OtlpReceiver:
    """The OTLP/gRPC and OTLP/HTTP listeners, handing requests to the trace pipeline and the app-metrics store."""

    def __init__(self, section: OtlpReceiverSection, context: Context) -> None:
        self.section = section
        self._links = context.links
        self._grpc: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self._inflight = {"grpc": 0, "http": 0}
        self._reading = 0
        self._state = "created"
        self._last_error: str | None = None
        self._expected_auth = f"Bearer {section.auth_token}".encode() if section.auth_token else None
        self.accepted: dict[str, int] = {}
        self.accepted_points: dict[str, int] = {}
        self.refused_spans: dict[tuple[str, str], int] = {}
        self.refused_requests: dict[tuple[str, str], int] = {}
        self._logged_at: dict[str, float] = {}

    # lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self._state = "starting"
        try:
            if self.section.grpc_listen:
                await self._start_grpc()
            if self.section.http_listen:
                await self._start_http()
        except Exception:
            await self.stop()
            self._state = "failed"
            raise
        self._state = "running"

    async def _start_grpc(self) -> None:
        # Stream handlers, though OTLP's Export is unary: the handler runs when the call opens, so a call
        # whose message never comes is cut after read_timeout_seconds instead of holding a slot.
        handlers = [
            grpc.method_handlers_generic_handler(TRACE_SERVICE, {"Export": grpc.stream_unary_rpc_method_handler(
                self._grpc_traces, request_deserializer=None,
                response_serializer=ExportTraceServiceResponse.SerializeToString)}),
            grpc.method_handlers_generic_handler(METRICS_SERVICE, {"Export": grpc.stream_unary_rpc_method_handler(
                self._grpc_metrics, request_deserializer=None,
                response_serializer=ExportMetricsServiceResponse.SerializeToString)}),
        ]
        address = self.section.grpc_listen
        _check_bindable("grpc_listen", address)
        server = grpc.aio.server(
            handlers=handlers,
            options=[("grpc.max_receive_message_length", self.section.max_request_bytes),
                     ("grpc.so_reuseport", 0),
                     ("grpc.max_concurrent_streams", MAX_GRPC_STREAMS_PER_CONNECTION),
                     ("grpc.max_connection_idle_ms", int(self.section.idle_timeout_seconds * 1000))],
        )
        tls = self.section.tls
        try:
            if tls.cert_file:
                with open(tls.cert_file, "rb") as cert, open(tls.key_file, "rb") as key:
                    credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
                port = server.add_secure_port(address, credentials)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:
            port = 0
            self._last_error = str(exc)
        if not port:
            raise RuntimeError(f"receivers.otlp.grpc_listen: cannot listen on {address}")
        await server.start()
        self._grpc = server
        log.info("OTLP/gRPC on %s", address)

    async def _start_http(self) -> None:
        # client_max_size bounds the body as sent; inflate() bounds it decompressed.
        app = web.Application(client_max_size=self.section.max_request_bytes, middlewares=[self._unrouted])
        app.router.add_post("/v1/traces", self._http_traces)
        app.router.add_post("/v1/metrics", self._http_metrics)
        # keepalive_timeout also closes a connection that never completes its first request.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, auto_decompress=False,
                               keepalive_timeout=self.section.idle_timeout_seconds)
        await runner.setup()
        host, port = parse_host_port(self.section.http_listen)
        try:
            await web.TCPSite(runner, host, port, ssl_context=_server_ssl(self.section), reuse_address=True).start()
        except OSError as exc:
            await runner.cleanup()
            raise RuntimeError(f"receivers.otlp.http_listen: cannot listen on {self.section.http_listen}: "
                               f"{exc.strerror or exc}") from None
        self._http = runner
        log.info("OTLP/HTTP on %s", self.section.http_listen)

    async def stop(self) -> None:
        self._state = "stopping"
        if self._grpc is not None:
            await self._grpc.stop(grace=2)
            self._grpc = None
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        self._state = "stopped"

    def status(self) -> dict[str, Any]:
        listening = ", ".join(f"{name} {addr}" for name, addr in (("grpc", self.section.grpc_listen),
                                                                   ("http", self.section.http_listen)) if addr)
        return {"state": self._state, "detail": f"OTLP on {listening}", "last_error": self._last_error}

    # shared ----------------------------------------------------------------------------------------

    def _refused(self, transport: str, refusal: Refusal) -> None:
        key = (transport, refusal.reason)
        self.refused_requests[key] = self.refused_requests.get(key, 0) + 1
        if refusal.spans:
            self.refused_spans[key] = self.refused_spans.get(key, 0) + refusal.spans
        now = time.monotonic()
        if now - self._logged_at.get(refusal.reason, -LOG_EVERY_SECONDS) >= LOG_EVERY_SECONDS:
            self._logged_at[refusal.reason] = now
            log.warning("refused an OTLP/%s request (%s): %s (logged at most once a minute per reason; counted in "
                        "sidetrace_receiver_refused_requests_total)", transport, refusal.reason, refusal)

    def _authorized(self, value: str | None) -> bool:
        if self._expected_auth is None:
            return True
        return value is not None and hmac.compare_digest(value.encode(errors="replace"), self._expected_auth)

    async def _take_traces(self, request: ExportTraceServiceRequest, transport: str, raw: bytes | None) -> None:
        """Hand ``request`` to the trace pipeline; raise a retryable Refusal when it cannot take it now."""
        spans = span_count(request)
        if self._inflight[transport] >= MAX_CONCURRENT_REQUESTS:
            raise Refusal(429, grpc.StatusCode.UNAVAILABLE, "too_many_requests",
                          f"{MAX_CONCURRENT_REQUESTS} requests in flight; retry later", spans)
        sink = self._links.traces.get()
        if sink is None:
            raise Refusal(429, grpc.StatusCode.UNAVAILABLE, "unavailable", "the trace pipeline is restarting", spans)
        self._inflight[transport] += 1
        try:
            taken = await sink.accept_traces(request, raw)
        except SinkBusy as exc:
            self._last_error = str(exc)
            raise Refusal(429, grpc.StatusCode.UNAVAILABLE, exc.reason, f"{exc}; retry later", spans) from None
        finally:
            self._inflight[transport] -= 1
        self.accepted[transport] = self.accepted.get(transport, 0) + taken

    def _take_metrics(self, request: ExportMetricsServiceRequest, transport: str) -> None:
        sink = self._links.metrics.get()
        if sink is None:
            raise Refusal(503, grpc.StatusCode.UNAVAILABLE, "unavailable", "the app-metrics store is not running")
        self.accepted_points[transport] = self.accepted_points.get(transport, 0) + sink.accept_metrics(request)

    # gRPC --------------------------------------------------------------------------------------------

    async def _grpc_message(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        metadata = dict(context.invocation_metadata() or ())
        if not self._authorized(metadata.get("authorization")):
            raise Refusal(401, grpc.StatusCode.UNAUTHENTICATED, "unauthenticated", "missing or wrong bearer token")
        try:
            return await within(anext(requests), self.section.read_timeout_seconds)
        except TimeoutError:
            raise Refusal(408, grpc.StatusCode.DEADLINE_EXCEEDED, "read_timeout",
                          f"no request message within {self.section.read_timeout_seconds:g} s") from None
        except StopAsyncIteration:
            raise _bad("invalid", "the call carried no request message") from None

    async def _grpc_traces(self, requests: AsyncIterator[bytes],
                           context: grpc.aio.ServicerContext) -> ExportTraceServiceResponse:
        try:
            body = await self._grpc_message(requests, context)
            await self._take_traces(parse_protobuf(body, ExportTraceServiceRequest), "grpc", body)
        except Refusal as refusal:
            self._refused("grpc", refusal)
            await context.abort(refusal.code, str(refusal))
        return ExportTraceServiceResponse()

    async def _grpc_metrics(self, requests: AsyncIterator[bytes],
                            context: grpc.aio.ServicerContext) -> ExportMetricsServiceResponse:
        try:
            body = await self._grpc_message(requests, context)
            self._take_metrics(parse_protobuf(body, ExportMetricsServiceRequest), "grpc")
        except Refusal as refusal:
            self._refused("grpc", refusal)
            await context.abort(refusal.code, str(refusal))
        return ExportMetricsServiceResponse()

    # HTTP --------------------------------------------------------------------------------------------

    async def _http_body(self, request: web.Request, message_type: type) -> tuple[Any, bytes | None]:
        """The decoded message and its protobuf bytes (None for JSON); raises Refusal."""
        if not self._authorized(request.headers.get("Authorization")):
            raise Refusal(401, grpc.StatusCode.UNAUTHENTICATED, "unauthenticated", "missing or wrong bearer token")
        content_type = request.content_type
        if content_type not in (PROTOBUF, JSON):
            raise Refusal(415, grpc.StatusCode.INVALID_ARGUMENT, "unsupported_media_type",
                          f"Content-Type must be {PROTOBUF} or {JSON}, got {content_type or 'none'}")
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower() or "identity"
        if encoding not in ENCODINGS and encoding != "identity":
            raise Refusal(415, grpc.StatusCode.INVALID_ARGUMENT, "unsupported_encoding",
                          f"Content-Encoding must be gzip, deflate or identity, got {encoding[:40]}")
        if self._reading >= MAX_READING_REQUESTS:
            raise Refusal(429, grpc.StatusCode.UNAVAILABLE, "too_many_requests",
                          f"{MAX_READING_REQUESTS} request bodies being read; retry later")
        self._reading += 1
        try:
            body = await within(request.read(), self.section.read_timeout_seconds)
        except TimeoutError:
            raise Refusal(408, grpc.StatusCode.DEADLINE_EXCEEDED, "read_timeout",
                          f"the body did not arrive within {self.section.read_timeout_seconds:g} s") from None
        except web.HTTPRequestEntityTooLarge:
            raise Refusal(413, grpc.StatusCode.RESOURCE_EXHAUSTED, "too_large",
                          f"request body larger than {self.section.max_request_bytes} bytes "
                          "([receivers.otlp] max_request_bytes)") from None
        except RequestPayloadError as exc:
            raise _bad("invalid", f"invalid request body: {exc}") from None
        finally:
            self._reading -= 1
        if encoding != "identity":
            body = inflate(body, encoding, self.section.max_request_bytes)
        if content_type == JSON:
            return parse_json(body, message_type), None
        return parse_protobuf(body, message_type), body

    @web.middleware
    async def _unrouted(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """aiohttp's own 404 and 405 answered like every other refusal: a google.rpc.Status, counted."""
        try:
            return await handler(request)
        except web.HTTPNotFound:
            refusal = Refusal(404, grpc.StatusCode.UNIMPLEMENTED, "not_found",
                              f"no OTLP endpoint at {request.path[:100]}: the agent takes /v1/traces and /v1/metrics")
        except web.HTTPMethodNotAllowed:
            refusal = Refusal(405, grpc.StatusCode.UNIMPLEMENTED, "method_not_allowed",
                              f"{request.method[:16]} {request.path[:100]}: OTLP/HTTP takes POST")
        return self._http_refusal(refusal, JSON if request.content_type == JSON else PROTOBUF)

    def _http_answer(self, response: Any, content_type: str) -> web.Response:
        if content_type == JSON:
            return web.Response(body=json_format.MessageToJson(response).encode(), content_type=JSON)
        return web.Response(body=response.SerializeToString(), content_type=PROTOBUF)

    def _http_refusal(self, refusal: Refusal, content_type: str) -> web.Response:
        self._refused("http", refusal)
        error = status_pb2.Status(code=_CODES.get(refusal.status, 2), message=str(refusal))
        body = json_format.MessageToJson(error).encode() if content_type == JSON else error.SerializeToString()
        headers = {"Retry-After": RETRY_AFTER_SECONDS} if refusal.status in (429, 503) else {}
        return web.Response(status=refusal.status, body=body, content_type=content_type, headers=headers)

    async def _http_traces(self, request: web.Request) -> web.Response:
        content_type = JSON if request.content_type == JSON else PROTOBUF
        try:
            message, raw = await self._http_body(request, ExportTraceServiceRequest)
            await self._take_traces(message, "http", raw)
        except Refusal as refusal:
            return self._http_refusal(refusal, content_type)
        return self._http_answer(ExportTraceServiceResponse(), content_type)

    async def _http_metrics(self, request: web.Request) -> web.Response:
        content_type = JSON if request.content_type == JSON else PROTOBUF
        try:
            message, _ = await self._http_body(request, ExportMetricsServiceRequest)
            self._take_metrics(message, "http")
        except Refusal as refusal:
            return self._http_refusal(refusal, content_type)
        return self._http_answer(ExportMetricsServiceResponse(), content_type)

    # metrics ---------------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        accepted = CounterMetricFamily("sidetrace_receiver_accepted_spans_total",
                                       "Spans accepted: durably queued, or counted as dropped with reason no_exporter "
                                       "when no exporter takes traces.", labels=["transport"])
        points = CounterMetricFamily("sidetrace_receiver_accepted_metric_points_total", "OTLP metric points taken.",
                                     labels=["transport"])
        for transport in ("grpc", "http"):
            accepted.add_metric([transport], self.accepted.get(transport, 0))
            points.add_metric([transport], self.accepted_points.get(transport, 0))
        yield accepted
        yield points
        spans = CounterMetricFamily("sidetrace_receiver_refused_spans_total",
                                    "Spans in refused requests, by reason, where they could be counted.",
                                    labels=["transport", "reason"])
        known = {(transport, reason): 0 for transport, reasons in REFUSAL_REASONS.items() for reason in reasons}
        for (transport, reason), count in sorted({**known, **self.refused_spans}.items()):
            spans.add_metric([transport, reason], count)
        yield spans
        requests = CounterMetricFamily("sidetrace_receiver_refused_requests_total",
                                       "Requests refused, by transport and reason (unauthenticated, not_found, "
                                       "method_not_allowed, invalid, json_too_deep, bad_encoding, "
                                       "unsupported_encoding, unsupported_media_type, "
                                       "too_large, read_timeout, too_many_requests, busy, disk_full, spool_error, "
                                       "unavailable).", labels=["transport", "reason"])
        for (transport, reason), count in sorted({**known, **self.refused_requests}.items()):
            requests.add_metric([transport, reason], count)
        yield requests
