"""OTLP receiver: traces and metrics over gRPC (4317) and HTTP (4318, protobuf or JSON, gzip).

Accepts whatever a stock OpenTelemetry SDK exporter sends with its defaults. A trace request is
answered with success only after the pipeline has written it to the spool. When the spool cannot
keep up the receiver refuses with its protocol's retryable answer (gRPC UNAVAILABLE, HTTP 429
with Retry-After) instead of buffering; malformed input gets INVALID_ARGUMENT or a 4xx with a
message. Every refusal is counted in ``sidetrace_receiver_refused_spans_total``.
"""

from __future__ import annotations

import base64
import json
import logging
import sqlite3
import ssl
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

from sidetrace.agent.components import Context
from sidetrace.agent.pipeline import span_count
from sidetrace.config import OtlpReceiverSection, parse_host_port
from sidetrace.exporters.spool import SpoolBusy

log = logging.getLogger("sidetrace.otlp")

TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
METRICS_SERVICE = "opentelemetry.proto.collector.metrics.v1.MetricsService"
RETRY_AFTER_SECONDS = "1"
MAX_CONCURRENT_REQUESTS = 64
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
# OTLP/JSON writes these ids as hex, where protobuf's JSON mapping expects base64.
_HEX_ID_KEYS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


class BadRequest(Exception):
    """Input that will never be valid: the sender must not retry it."""


class Unavailable(Exception):
    """A passing condition (spool busy, pipeline restarting): the sender should retry."""


def _hex_ids_to_base64(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _HEX_ID_KEYS and isinstance(value, str):
                try:
                    node[key] = base64.b64encode(bytes.fromhex(value)).decode()
                except ValueError:
                    raise BadRequest(f"{key}: expected a hex string, got {value[:40]!r}") from None
            else:
                _hex_ids_to_base64(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids_to_base64(item)


def parse_json(body: bytes, message_type: type) -> Any:
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise BadRequest("invalid OTLP/JSON: expected an object at the top level")
    _hex_ids_to_base64(document)
    message = message_type()
    try:
        json_format.ParseDict(document, message, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        raise BadRequest(f"invalid OTLP/JSON: {exc}") from None
    return message


def parse_protobuf(body: bytes, message_type: type) -> Any:
    try:
        return message_type.FromString(body)
    except (DecodeError, RecursionError, ValueError) as exc:
        raise BadRequest(f"invalid protobuf {message_type.__name__}: {exc}") from None


def _server_ssl(section: OtlpReceiverSection) -> ssl.SSLContext | None:
    if not section.tls.cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(section.tls.cert_file, section.tls.key_file)
    return context


class OtlpReceiver:
    """The OTLP/gRPC and OTLP/HTTP listeners, handing requests to the pipeline."""

    def __init__(self, section: OtlpReceiverSection, context: Context) -> None:
        self.section = section
        self._lookup = context.lookup
        self._grpc: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self._inflight = 0
        self._state = "created"
        self._last_error: str | None = None
        self._expected_auth = f"Bearer {section.auth_token}" if section.auth_token else None

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
        handlers = [
            grpc.method_handlers_generic_handler(TRACE_SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(
                self._grpc_traces, request_deserializer=None,
                response_serializer=ExportTraceServiceResponse.SerializeToString)}),
            grpc.method_handlers_generic_handler(METRICS_SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(
                self._grpc_metrics, request_deserializer=None,
                response_serializer=ExportMetricsServiceResponse.SerializeToString)}),
        ]
        server = grpc.aio.server(
            handlers=handlers, maximum_concurrent_rpcs=MAX_CONCURRENT_REQUESTS,
            options=[("grpc.max_receive_message_length", self.section.max_request_bytes),
                     ("grpc.so_reuseport", 0)],
        )
        address = self.section.grpc_listen
        tls = self.section.tls
        if tls.cert_file:
            with open(tls.cert_file, "rb") as cert, open(tls.key_file, "rb") as key:
                credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
        if not port:
            raise RuntimeError(f"receivers.otlp.grpc_listen: cannot listen on {address}")
        await server.start()
        self._grpc = server
        log.info("OTLP/gRPC on %s", address)

    async def _start_http(self) -> None:
        # client_max_size bounds the body after decompression: larger ones get 413.
        app = web.Application(client_max_size=self.section.max_request_bytes)
        app.router.add_post("/v1/traces", self._http_traces)
        app.router.add_post("/v1/metrics", self._http_metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
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

    def _pipeline(self) -> Any:
        pipeline = self._lookup("pipeline")
        if pipeline is None:
            raise Unavailable("the trace pipeline is restarting")
        return pipeline

    async def _take_traces(self, request: ExportTraceServiceRequest, transport: str, raw: bytes | None) -> None:
        """Hand ``request`` to the pipeline; raise Unavailable (counted) when it cannot take it now."""
        try:
            pipeline = self._pipeline()
            try:
                await pipeline.accept_traces(request, transport, raw)
            except SpoolBusy as exc:
                raise Unavailable(f"the spool is busy ({exc}); retry later") from None
            except (OSError, sqlite3.Error) as exc:
                self._last_error = f"spool write failed: {exc}"
                raise Unavailable(self._last_error) from None
            except RuntimeError as exc:  # the pipeline closed its spool under us (a reload)
                raise Unavailable(f"the trace pipeline is restarting: {exc}") from None
        except Unavailable:
            self._refuse(transport, "unavailable", span_count(request))
            raise

    def _refuse(self, transport: str, reason: str, spans: int = 0) -> None:
        pipeline = self._lookup("pipeline")
        if pipeline is not None:
            pipeline.refuse(transport, reason, spans)

    # gRPC --------------------------------------------------------------------------------------------

    def _grpc_authorized(self, context: grpc.aio.ServicerContext) -> bool:
        if self._expected_auth is None:
            return True
        metadata = dict(context.invocation_metadata() or ())
        return metadata.get("authorization") == self._expected_auth

    async def _grpc_traces(self, body: bytes, context: grpc.aio.ServicerContext) -> ExportTraceServiceResponse:
        if not self._grpc_authorized(context):
            self._refuse("grpc", "unauthenticated")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        try:
            request = parse_protobuf(body, ExportTraceServiceRequest)
        except BadRequest as exc:
            self._refuse("grpc", "invalid")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            await self._take_traces(request, "grpc", body)
        except Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return ExportTraceServiceResponse()

    async def _grpc_metrics(self, body: bytes, context: grpc.aio.ServicerContext) -> ExportMetricsServiceResponse:
        if not self._grpc_authorized(context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        try:
            request = parse_protobuf(body, ExportMetricsServiceRequest)
        except BadRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            self._pipeline().accept_metrics(request)
        except Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return ExportMetricsServiceResponse()

    # HTTP --------------------------------------------------------------------------------------------

    async def _http_body(self, request: web.Request, message_type: type) -> tuple[Any, str, bytes | None]:
        """The decoded message, its content type, and its protobuf bytes (None for JSON)."""
        if self._expected_auth is not None and request.headers.get("Authorization") != self._expected_auth:
            raise web.HTTPUnauthorized(text="missing or wrong bearer token")
        content_type = request.content_type
        if content_type not in (PROTOBUF, JSON):
            raise web.HTTPUnsupportedMediaType(
                text=f"Content-Type must be {PROTOBUF} or {JSON}, got {content_type or 'none'}")
        encoding = request.headers.get("Content-Encoding", "").lower()
        if encoding not in ("", "identity", "gzip", "deflate"):
            raise web.HTTPUnsupportedMediaType(text=f"Content-Encoding must be gzip or identity, got {encoding}")
        # aiohttp inflates gzip itself, in bounded steps, and answers 413 past client_max_size.
        try:
            body = await request.read()
        except RequestPayloadError as exc:
            raise BadRequest(f"invalid {encoding or 'request'} body: {exc.__cause__ or exc}") from None
        if content_type == JSON:
            return parse_json(body, message_type), content_type, None
        return parse_protobuf(body, message_type), content_type, body

    def _http_answer(self, response: Any, content_type: str) -> web.Response:
        if content_type == JSON:
            return web.Response(body=json_format.MessageToJson(response).encode(), content_type=JSON)
        return web.Response(body=response.SerializeToString(), content_type=PROTOBUF)

    def _http_error(self, status: int, message: str, content_type: str, **headers: str) -> web.Response:
        error = status_pb2.Status(code=3 if status == 400 else 14, message=message)
        body = json_format.MessageToJson(error).encode() if content_type == JSON else error.SerializeToString()
        return web.Response(status=status, body=body, content_type=content_type, headers=headers)

    async def _http_traces(self, request: web.Request) -> web.Response:
        content_type = request.content_type if request.content_type == JSON else PROTOBUF
        if self._inflight >= MAX_CONCURRENT_REQUESTS:
            self._refuse("http", "too_many_requests")
            return self._http_error(429, "too many requests in flight", content_type,
                                    **{"Retry-After": RETRY_AFTER_SECONDS})
        self._inflight += 1
        try:
            message, content_type, raw = await self._http_body(request, ExportTraceServiceRequest)
            await self._take_traces(message, "http", raw)
        except BadRequest as exc:
            self._refuse("http", "invalid")
            return self._http_error(400, str(exc), content_type)
        except Unavailable as exc:
            return self._http_error(429, str(exc), content_type, **{"Retry-After": RETRY_AFTER_SECONDS})
        except web.HTTPException as exc:
            self._refuse("http", exc.reason.lower().replace(" ", "_"))
            raise
        finally:
            self._inflight -= 1
        return self._http_answer(ExportTraceServiceResponse(), content_type)

    async def _http_metrics(self, request: web.Request) -> web.Response:
        content_type = request.content_type if request.content_type == JSON else PROTOBUF
        try:
            message, content_type, _ = await self._http_body(request, ExportMetricsServiceRequest)
            self._pipeline().accept_metrics(message)
        except BadRequest as exc:
            return self._http_error(400, str(exc), content_type)
        except Unavailable as exc:
            return self._http_error(503, str(exc), content_type, **{"Retry-After": RETRY_AFTER_SECONDS})
        return self._http_answer(ExportMetricsServiceResponse(), content_type)


