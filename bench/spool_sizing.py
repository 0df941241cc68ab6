"""Spool sizing: bytes stored per span, and spool.db's size on disk against [spool] max_bytes.

Spans are made by the OpenTelemetry SDK (a server span and its client and database children, 9
attributes each, whose values vary as a real service's do: ids in URLs, SQL with literals, user ids,
peer addresses, durations) and encoded as the SDK's OTLP exporter encodes them, 512 to a request (the
BatchSpanProcessor's batch). They are sent over OTLP/gRPC to an agent whose load-balancing exporter
points at a backend that is down, so everything stays in the spool.

1. Stored bytes per span: sidetrace_spool_size_bytes (the bytes counted against max_bytes) over the
   spans accepted, next to the bytes per span as received.
2. Disk against the bound: with ``[spool] max_bytes`` = --bound-mib, requests are sent until as many
   bytes again have been dropped at the bound, then spool.db and its WAL are measured
   (sidetrace_spool_file_bytes and the files' sizes) against max_bytes.

Usage: python bench/spool_sizing.py [--spans 200000] [--bound-mib 64]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult  # noqa: E402
from opentelemetry.trace import SpanKind, Status, StatusCode  # noqa: E402

from bench.trace_relay import start_agent  # noqa: E402
from tests.conftest import free_port, http_get, wait_until  # noqa: E402

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
BATCH = 512


class Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list = []

    def export(self, spans) -> SpanExportResult:  # noqa: ANN001
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def sdk_requests(spans: int, seed: int = 11) -> list[bytes]:
    """``spans`` SDK spans (traces of a server span, 2 client calls and a query), as OTLP requests of BATCH."""
    rng = random.Random(seed)
    keep = Keep()
    provider = TracerProvider(resource=Resource.create({"service.name": "checkout", "service.version": "2.14.1",
                                                        "deployment.environment": "prod",
                                                        "host.name": "node-17.eu-west-1"}))
    provider.add_span_processor(SimpleSpanProcessor(keep))
    tracer = provider.get_tracer("checkout.http", "2.14.1")
    routes = ["/api/v1/orders/{id}", "/api/v1/carts/{id}/items", "/api/v1/users/{id}/addresses", "/healthz"]
    while len(keep.spans) < spans:
        route = rng.choice(routes)
        item = rng.randint(1, 10**9)
        user = f"u-{rng.randint(1, 10**7):07d}"
        with tracer.start_as_current_span(f"GET {route}", kind=SpanKind.SERVER, attributes={
                "http.request.method": "GET", "http.route": route,
                "url.path": route.replace("{id}", str(item)),
                "url.query": f"page={rng.randint(1, 50)}&ref={rng.randbytes(4).hex()}",
                "http.response.status_code": rng.choice((200, 200, 200, 404, 500)),
                "client.address": f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                "user_agent.original": rng.choice(("Mozilla/5.0 (X11; Linux x86_64) Firefox/126.0",
                                                   "okhttp/4.12.0", "python-requests/2.32.3")),
                "enduser.id": user, "server.port": 8080}):
            for call in ("inventory", "pricing"):
                with tracer.start_as_current_span(f"POST /{call}.v1.Service/Get", kind=SpanKind.CLIENT, attributes={
                        "rpc.system": "grpc", "rpc.service": f"{call}.v1.Service", "rpc.method": "Get",
                        "server.address": f"{call}.svc.cluster.local", "server.port": 50051,
                        "network.peer.address": f"10.0.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                        "rpc.grpc.status_code": 0, "app.item_id": item, "app.request_id": rng.randbytes(8).hex()}):
                    pass
            with tracer.start_as_current_span("SELECT orders", kind=SpanKind.CLIENT, attributes={
                    "db.system": "postgresql", "db.namespace": "shop", "db.operation.name": "SELECT",
                    "db.collection.name": "orders", "server.address": "pg-primary.shop", "server.port": 5432,
                    "db.query.text": f"SELECT id, total FROM orders WHERE user_id = '{user}' AND id > {item} "
                                     f"LIMIT {rng.randint(1, 100)}",
                    "db.response.returned_rows": rng.randint(0, 100), "network.peer.port": 5432}) as span:
                if rng.random() < 0.05:
                    span.set_status(Status(StatusCode.ERROR, "timeout"))
    return [encode_spans(keep.spans[i:i + BATCH]).SerializeToString() for i in range(0, spans, BATCH)]


def metric(port: int, name: str) -> float:
    _, text = http_get(f"http://127.0.0.1:{port}/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + " ", name + "{")))


def send(grpc_port: int, bodies: list[bytes]) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        export = channel.unary_unary(EXPORT)
        for body in bodies:
            while True:
                try:
                    export(body, timeout=30)
                    break
                except grpc.RpcError:  # busy: retried, as an SDK does
                    time.sleep(0.05)


def agent_config(down: int, bound: int) -> str:
    return (f'[spool]\nmax_bytes = {bound}\nsync = "normal"\n'
            f'[[exporters.loadbalancing]]\nname = "tier"\nbackends = ["127.0.0.1:{down}"]\n')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spans", type=int, default=200_000)
    parser.add_argument("--bound-mib", type=int, default=64)
    args = parser.parse_args()
    started = time.monotonic()
    bodies = sdk_requests(args.spans)
    spans = sum(min(BATCH, args.spans - i) for i in range(0, args.spans, BATCH))
    received = sum(map(len, bodies))
    print(f"made {spans} SDK spans in {len(bodies)} requests in {time.monotonic() - started:.0f} s: "
          f"{received / spans:.0f} bytes a span as received")
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        proc, grpc_port, port = start_agent(tmp / "a", 0, agent_config(free_port(), 1 << 30))
        try:
            send(grpc_port, bodies)
            wait_until(lambda: metric(port, "sidetrace_spool_pending_bytes") == 0, 30, "committed")
            stored = metric(port, "sidetrace_spool_size_bytes")
            print(f"stored: {stored / spans:.1f} bytes a span ({received / stored:.2f} times smaller than "
                  f"as received); spool.db and WAL {metric(port, 'sidetrace_spool_file_bytes') / spans:.1f} "
                  f"bytes a span on disk")
        finally:
            proc.terminate()
            proc.wait(30)
        bound = args.bound_mib << 20
        proc, grpc_port, port = start_agent(tmp / "b", 0, agent_config(free_port(), bound))
        try:
            rounds = 0
            while metric(port, "sidetrace_spool_dropped_spans_total") * stored / spans < bound:
                send(grpc_port, bodies)
                rounds += 1
            wait_until(lambda: metric(port, "sidetrace_spool_pending_bytes") == 0, 30, "committed")
            size = metric(port, "sidetrace_spool_size_bytes")
            on_disk = metric(port, "sidetrace_spool_file_bytes")
            files = {suffix: os.stat(tmp / "b" / "data" / f"spool.db{suffix}").st_size for suffix in ("", "-wal")}
            print(f"bound {bound >> 20} MiB, {rounds} passes: counted {size / bound:.3f} of max_bytes; on disk "
                  f"(spool.db + WAL, allocated) {on_disk / (1 << 20):.1f} MiB = {on_disk / bound:.2f} times "
                  f"max_bytes (spool.db {files[''] / (1 << 20):.1f} MiB, WAL {files['-wal'] / (1 << 20):.1f} MiB)")
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
