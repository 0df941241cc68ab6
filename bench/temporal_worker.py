"""One measurement process for bench/temporal_overhead.py: a worker running one workflow of N trivial
activities, under one condition (bare, sidetrace, official). Prints one JSON line and leaves with
os._exit (see tests/integration/test_temporal.py for why).

Usage: python -m bench.temporal_worker TARGET CONDITION N
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from datetime import timedelta

from temporalio import activity, workflow


@activity.defn
async def noop(index: int) -> int:
    return index


@workflow.defn
class Many:
    @workflow.run
    async def run(self, count: int) -> int:
        total = 0
        for index in range(count):
            total += await workflow.execute_activity(noop, index, start_to_close_timeout=timedelta(seconds=30))
        return total


async def measure(target: str, condition: str, count: int) -> dict:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from temporalio.client import Client
    from temporalio.worker import Worker

    class Discard(SpanExporter):
        spans = 0

        def export(self, spans) -> SpanExportResult:  # noqa: ANN001
            Discard.spans += len(spans)
            return SpanExportResult.SUCCESS

    interceptors = []
    if condition != "bare":
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Discard()))
        trace.set_tracer_provider(provider)
    if condition == "sidetrace":
        from sidetrace.instrumentors.temporal import TemporalInstrumentor

        TemporalInstrumentor().instrument(core_metrics=False)
    elif condition == "official":
        from temporalio.contrib.opentelemetry import TracingInterceptor

        interceptors = [TracingInterceptor()]
    client = await Client.connect(target, interceptors=interceptors)
    queue = f"bench-{uuid.uuid4()}"
    async with Worker(client, task_queue=queue, workflows=[Many], activities=[noop]):
        cpu, wall = time.process_time(), time.perf_counter()
        result = await client.execute_workflow(Many.run, count, id=f"many-{uuid.uuid4()}", task_queue=queue)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert result == count * (count - 1) // 2
    if condition != "bare":
        trace.get_tracer_provider().force_flush()
    return {"condition": condition, "cpu_ms_per_activity": cpu / count * 1000,
            "wall_ms_per_activity": wall / count * 1000, "spans": Discard.spans if condition != "bare" else 0}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(measure(sys.argv[1], sys.argv[2], int(sys.argv[3])))), flush=True)
    os._exit(0)
