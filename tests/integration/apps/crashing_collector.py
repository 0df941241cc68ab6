"""A real OTLP/gRPC server (grpcio's) that writes down the span ids of every request it takes, then answers, or,
with ``crash``, exits at once without answering: a collector that crashed after taking the whole request.

Usage: python -m tests.integration.apps.crashing_collector PORT TAKEN_FILE serve|crash
"""

from __future__ import annotations

import os
import sys
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, taken: str, crash: bool) -> None:
        self.taken = taken
        self.crash = crash

    def Export(self, request, context):  # noqa: N802 - the gRPC method name
        ids = [span.span_id.hex() for r in request.resource_spans for s in r.scope_spans for span in s.spans]
        with open(self.taken, "a") as taken:
            taken.write("".join(f"{span_id}\n" for span_id in ids))
            taken.flush()
            os.fsync(taken.fileno())
        if self.crash:
            os._exit(3)
        return trace_service_pb2.ExportTraceServiceResponse()


def main() -> None:
    port, taken, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Collector(taken, mode == "crash"), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
