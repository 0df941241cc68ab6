"""Misbehaving OTLP backends for the delivery tests: a real grpc.aio server and a real aiohttp server
whose answer to each request follows a script the test sets.

A script answers ``status`` (an HTTP status or a gRPC code) to ``fail_requests`` requests after the
first ``fail_after`` (which succeed), or to every request until ``fail_until`` (monotonic time), then
succeeds; it answers ``poison_status`` to any request holding ``poison`` (a span name); it can add a
retry delay (Retry-After, or a gRPC RetryInfo) and a partial success. The servers' own size limits
are real: aiohttp's client_max_size answers 413, grpc's max_receive_message_length RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass

import grpc
from aiohttp import web
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.conftest import free_port

TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


@dataclass
class Script:
    status: int | grpc.StatusCode | None = None
    fail_requests: int = 0
    fail_after: int = 0
    fail_until: float = 0.0
    poison: str | None = None
    poison_status: int | grpc.StatusCode | None = None
    retry_delay: float | None = None
    partial_rejected: int = 0
    partial_message: str = ""
    answer_delay: float = 0.0  # seconds between taking a request (its spans count as received) and answering it


class Backend:
    """What both servers share: the script, and every span received, by span id."""

    def __init__(self, max_request_bytes: int = 64 * 1024 * 1024) -> None:
        self.port = free_port()
        self.max_request_bytes = max_request_bytes
        self.script = Script()
        self.requests = 0
        self.answers: Counter[str] = Counter()
        self.times: list[float] = []
        self.received: Counter[bytes] = Counter()
        self.sizes: list[int] = []

    def decide(self, body: bytes) -> int | grpc.StatusCode | None:
        """The failure to answer ``body`` with, or None to take it."""
        self.requests += 1
        self.times.append(time.monotonic())
        script = self.script
        try:
            request = ExportTraceServiceRequest.FromString(body)
        except DecodeError:
            return 400 if isinstance(self, HttpBackend) else grpc.StatusCode.INVALID_ARGUMENT
        if script.poison is not None and any(
                span.name == script.poison for r in request.resource_spans for s in r.scope_spans for span in s.spans):
            return script.poison_status
        failing = (script.fail_after < self.requests <= script.fail_after + script.fail_requests
                   or time.monotonic() < script.fail_until)
        if script.status is not None and failing:
            return script.status
        self.sizes.append(len(body))
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                for span in scope.spans:
                    self.received[span.span_id] += 1
        return None

    def unique(self) -> int:
        return len(self.received)

    def duplicates(self) -> int:
        return sum(count - 1 for count in self.received.values())


class HttpBackend(Backend):
    async def start(self) -> HttpBackend:
        app = web.Application(client_max_size=self.max_request_bytes)
        app.router.add_post("/v1/traces", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        failure = self.decide(body)
        self.answers[str(failure or 200)] += 1
        if self.script.answer_delay:
            await asyncio.sleep(self.script.answer_delay)
        if failure is None:
            response = ExportTraceServiceResponse()
            response.partial_success.rejected_spans = self.script.partial_rejected
            response.partial_success.error_message = self.script.partial_message
            return web.Response(body=response.SerializeToString(), content_type="application/x-protobuf")
        headers = {"Retry-After": f"{self.script.retry_delay:g}"} if self.script.retry_delay is not None else {}
        return web.Response(status=int(failure), text=f"scripted {failure}", headers=headers)

    async def stop(self) -> None:
        await self._runner.cleanup()


class GrpcBackend(Backend):
    async def start(self) -> GrpcBackend:
        handler = grpc.method_handlers_generic_handler(TRACE_SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(
            self._export, request_deserializer=None, response_serializer=ExportTraceServiceResponse.SerializeToString)})
        self._server = grpc.aio.server(handlers=[handler], options=[
            ("grpc.max_receive_message_length", self.max_request_bytes)])
        self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self._server.start()
        return self

    async def _export(self, body: bytes, context: grpc.aio.ServicerContext) -> ExportTraceServiceResponse:
        failure = self.decide(body)
        self.answers[failure.name if failure is not None else "OK"] += 1
        if self.script.answer_delay:
            await asyncio.sleep(self.script.answer_delay)
        if failure is not None:
            if self.script.retry_delay is not None:
                delay = duration_pb2.Duration()
                delay.FromNanoseconds(int(self.script.retry_delay * 1e9))
                status = status_pb2.Status(code=failure.value[0], message=f"scripted {failure.name}")
                status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
                context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
            await context.abort(failure, f"scripted {failure.name}")
        response = ExportTraceServiceResponse()
        response.partial_success.rejected_spans = self.script.partial_rejected
        response.partial_success.error_message = self.script.partial_message
        return response

    async def stop(self) -> None:
        await self._server.stop(None)
