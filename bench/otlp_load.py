"""OTLP load generator: pre-encoded trace requests replayed over concurrent gRPC calls.

Usage: python bench/otlp_load.py TARGET TOTAL_SPANS RATE CONCURRENCY
RATE is spans per second (0: as fast as the target takes them). Prints "sent seconds refused".
Requests hold 512 spans in traces of 8 (a server span and 7 client children, 8 attributes each, the
last one an error); 100 distinct bodies so trace ids vary.
"""

from __future__ import annotations

import random
import sys
import threading
import time

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

SPANS_PER_REQUEST = 512
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
ATTRIBUTES = (("http.request.method", "GET"), ("http.route", "/api/v1/items/{id}"),
              ("http.response.status_code", 200), ("server.address", "example.internal"),
              ("server.port", 443), ("user_agent.original", "bench/1.0"), ("component", "http"),
              ("thread.name", "worker-3"))


def build_bodies(count: int = 100, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    bodies = []
    for index in range(count):
        request = ExportTraceServiceRequest()
        resource_spans = request.resource_spans.add()
        for key, value in (("service.name", f"svc-{index % 5}"), ("telemetry.sdk.language", "python")):
            kv = resource_spans.resource.attributes.add()
            kv.key, kv.value.string_value = key, value
        scope_spans = resource_spans.scope_spans.add()
        scope_spans.scope.name = "bench"
        for _ in range(SPANS_PER_REQUEST // 8):
            trace_id, root_id, start = rng.randbytes(16), b"", time.time_ns()
            for position in range(8):
                span = scope_spans.spans.add()
                span.trace_id, span.span_id = trace_id, rng.randbytes(8)
                if position == 0:
                    root_id = span.span_id
                else:
                    span.parent_span_id = root_id
                span.name = f"GET /api/v1/items/{{id}} op{position}"
                span.kind = 2 if position == 0 else 3
                span.start_time_unix_nano = start + position * 1000
                span.end_time_unix_nano = span.start_time_unix_nano + rng.randint(10**5, 10**8)
                for key, value in ATTRIBUTES:
                    kv = span.attributes.add()
                    kv.key = key
                    if isinstance(value, int):
                        kv.value.int_value = value
                    else:
                        kv.value.string_value = value
                if position == 7:
                    span.status.code = 2
        bodies.append(request.SerializeToString())
    return bodies


def main(argv: list[str]) -> None:
    target, total, rate, concurrency = argv[0], int(argv[1]), float(argv[2]), int(argv[3])
    bodies = build_bodies()
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)])
    export = channel.unary_unary(EXPORT, request_serializer=None, response_deserializer=None)
    requests = total // SPANS_PER_REQUEST
    lock = threading.Lock()
    issued = [0]
    refused = [0]
    start = time.monotonic()

    def worker() -> None:
        while True:
            with lock:
                if issued[0] >= requests:
                    return
                number = issued[0]
                issued[0] += 1
            if rate:
                delay = start + number * SPANS_PER_REQUEST / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            while True:  # a refused request is retried, as an OTLP exporter would
                try:
                    export(bodies[number % len(bodies)], timeout=30)
                    break
                except grpc.RpcError:
                    with lock:
                        refused[0] += 1
                    time.sleep(0.05)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"{requests * SPANS_PER_REQUEST} {time.monotonic() - start:.3f} {refused[0]}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
