"""One measurement process for bench/dapr_overhead.py: maybe instrument, then time three modes.

Usage: python bench/dapr_worker.py HTTP_PORT GRPC_PORT CONDITION OPS
(CONDITION: bare, sidetrace, sidetrace_nometrics, peer)
Prints one JSON line: microseconds of wall and CPU time per operation for each mode, and spans made.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from _sdk import Discard, discarding_provider
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider


def instrument(condition: str) -> tuple[TracerProvider | None, Discard | None]:
    if condition == "bare":
        return None, None
    provider, exporter = discarding_provider()
    meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
    # global too: the contrib gRPC client instrumentation takes its tracer provider from the global one
    from opentelemetry import metrics, trace

    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(meters)
    if condition.startswith("sidetrace"):
        from opentelemetry.metrics import NoOpMeterProvider

        from sidetrace.instrumentors.dapr import DaprInstrumentor

        # sidetrace_nometrics: the same spans, no dapr.client.operation.duration (to show its share)
        DaprInstrumentor().instrument(tracer_provider=provider, meter_provider=NoOpMeterProvider()
                                      if condition == "sidetrace_nometrics" else meters)
    else:  # the generic instrumentations from opentelemetry-python-contrib
        from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
        from opentelemetry.instrumentation.grpc import GrpcInstrumentorClient

        GrpcInstrumentorClient().instrument(tracer_provider=provider, meter_provider=meters)
        AioHttpClientInstrumentor().instrument(tracer_provider=provider, meter_provider=meters)
    return provider, exporter


def timed(run, ops: int) -> dict[str, float]:  # noqa: ANN001
    run(max(1, ops // 20))  # warm-up: connections, caches
    wall, cpu = time.perf_counter(), time.process_time()
    run(ops)
    return {"wall_us": (time.perf_counter() - wall) / ops * 1e6, "cpu_us": (time.process_time() - cpu) / ops * 1e6}


def main() -> None:
    http_port, grpc_port, condition, ops = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    os.environ.update(DAPR_HTTP_PORT=http_port, DAPR_GRPC_PORT=grpc_port)
    provider, exporter = instrument(condition)
    from aiohttp import ClientSession
    from dapr.clients import DaprClient

    url = f"http://127.0.0.1:{http_port}/v1.0/invoke/echo/method/v1.0/healthz"
    modes: dict[str, dict[str, float]] = {}
    with DaprClient() as client:
        def save_state(n: int) -> None:
            for i in range(n):
                client.save_state("statestore", f"k{i % 100}", "value")

        def invoke_sdk(n: int) -> None:
            for _ in range(n):
                client.invoke_method("echo", "v1.0/healthz", http_verb="GET")

        modes["save_state"] = timed(save_state, ops)
        modes["invoke_sdk"] = timed(invoke_sdk, max(1, ops // 5))

    async def invoke_aiohttp(n: int) -> None:
        async with ClientSession() as session:
            for _ in range(n):
                async with session.get(url) as response:
                    await response.read()

    modes["invoke_aiohttp"] = timed(lambda n: asyncio.run(invoke_aiohttp(n)), ops)
    spans = 0
    if provider is not None:
        provider.force_flush()
        spans = exporter.spans
    print(json.dumps({"condition": condition, "modes": modes, "spans": spans}))


if __name__ == "__main__":
    main()
