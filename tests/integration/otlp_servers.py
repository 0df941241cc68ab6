"""Real OTLP servers for the trace tests: rotel (a Rust collector standing in for Jaeger's OTLP
ingest, which cannot be installed here) forwarding to an in-process gRPC sink the test reads."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import rotel
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from oteltest.sink.handler import RequestHandler

from tests.conftest import free_port, port_open, stop_process, wait_until

ROTEL_AGENT = Path(rotel.__file__).parent / "rotel-agent"


class Collected(RequestHandler):
    """oteltest's RequestHandler interface, keeping every trace request's spans by span id."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.spans: dict[bytes, list] = {}  # span_id -> [(service, span), ...] (more than one = duplicate)

    def handle_trace(self, request: trace_service_pb2.ExportTraceServiceRequest, headers: object) -> None:
        with self.lock:
            self.requests += 1
            for resource_spans in request.resource_spans:
                service = next((kv.value.string_value for kv in resource_spans.resource.attributes
                                if kv.key == "service.name"), "")
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        self.spans.setdefault(span.span_id, []).append((service, span, resource_spans.resource))

    def handle_metrics(self, request: object, headers: object) -> None:
        pass

    def handle_logs(self, request: object, headers: object) -> None:
        pass

    def unique(self) -> int:
        with self.lock:
            return len(self.spans)

    def duplicates(self) -> int:
        with self.lock:
            return sum(len(copies) - 1 for copies in self.spans.values())


class _TraceServicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, handler: RequestHandler, delay_seconds: float) -> None:
        self.handler = handler
        self.delay_seconds = delay_seconds
        self.arrivals = 0

    def Export(self, request, context):  # noqa: N802 - the gRPC method name
        self.arrivals += 1
        time.sleep(self.delay_seconds)  # a slow backend: the request is in flight meanwhile
        self.handler.handle_trace(request, context.invocation_metadata())
        return trace_service_pb2.ExportTraceServiceResponse()


class Sink:
    """An OTLP/gRPC sink on a free loopback port (oteltest's GrpcSink binds 0.0.0.0, so not used as is), taking
    ``delay_seconds`` over each request."""

    def __init__(self, delay_seconds: float = 0.0) -> None:
        self.port = free_port()
        self.collected = Collected()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                                  options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        self.servicer = _TraceServicer(self.collected, delay_seconds)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self.servicer, self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None)


class Rotel:
    """A rotel-agent receiving OTLP on loopback and exporting over OTLP/gRPC to ``sink_port``."""

    def __init__(self, tmp: Path, sink_port: int, grpc_port: int | None = None, host: str = "127.0.0.1") -> None:
        self.tmp = tmp
        self.host = host
        self.sink_port = sink_port
        self.grpc_port = grpc_port or free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Rotel:
        assert ROTEL_AGENT.exists(), f"{ROTEL_AGENT} is missing: `make test` installs PyPI rotel"
        name = f"rotel-{self.host}-{self.grpc_port}"
        with open(self.tmp / f"{name}.out", "ab") as log:
            self.proc = subprocess.Popen(
                [str(ROTEL_AGENT), "start",
                 "--otlp-grpc-endpoint", f"{self.host}:{self.grpc_port}",
                 "--otlp-http-endpoint", f"{self.host}:{self.http_port}",
                 "--otlp-grpc-max-recv-msg-size-mib", "64",
                 "--exporter", "otlp", "--otlp-exporter-protocol", "grpc",
                 "--otlp-exporter-endpoint", f"http://127.0.0.1:{self.sink_port}",
                 "--batch-timeout", "20ms",
                 "--pid-file", str(self.tmp / f"{name}.pid"),
                 "--log-file", str(self.tmp / f"{name}.log")],
                stdout=log, stderr=subprocess.STDOUT,
            )
        wait_until(lambda: self.proc.poll() is None and port_open(self.grpc_port, self.host), 20, "rotel listening")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def span_request(spans: int, service: str = "load") -> bytes:
    """An encoded ExportTraceServiceRequest of ``spans`` spans with random ids (one trace each)."""
    request = trace_service_pb2.ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    kv = resource_spans.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", service
    scope = resource_spans.scope_spans.add()
    now = time.time_ns()
    for _ in range(spans):
        span = scope.spans.add()
        span.trace_id, span.span_id, span.name = os.urandom(16), os.urandom(8), "load"
        span.start_time_unix_nano, span.end_time_unix_nano = now, now + 1000
    return request.SerializeToString()


def send_load(agent: object, stop: threading.Event, spans_per_request: int = 20, max_requests: int = 20_000,
              max_seconds: float = 120.0) -> int:
    """Send requests to ``agent``'s OTLP/gRPC receiver until ``stop`` (bounded in count and time), retrying refused
    ones as an SDK would; return the spans acknowledged."""
    acknowledged = 0
    deadline = time.monotonic() + max_seconds
    with grpc.insecure_channel(f"127.0.0.1:{agent.grpc_port}") as channel:
        export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                     request_serializer=None, response_deserializer=None)
        for _ in range(max_requests):
            if stop.is_set() or time.monotonic() > deadline:
                break
            body = span_request(spans_per_request)
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    export(body, timeout=10)
                except grpc.RpcError:
                    time.sleep(0.05)
                    continue
                acknowledged += spans_per_request
                break
    return acknowledged
