"""A Temporal app for the tests, run as its own process (see test_temporal.py for why).

Usage: python -m tests.integration.apps.temporal_app MODE   (MODE: ours, official-client)
Prints the finished spans as one JSON line, then leaves with os._exit(0).
"""

import asyncio
import json
import os
import sys
from datetime import timedelta

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.common import RetryPolicy
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from sidetrace.instrumentors.temporal import TemporalInstrumentor

exporter = InMemorySpanExporter()
if __name__ == "__main__":
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
attempts = {"n": 0}

@activity.defn
async def ok(x: str) -> str:
    return x.upper()

@activity.defn
async def flaky(x: str) -> str:
    attempts["n"] += 1
    if attempts["n"] < 3:
        raise RuntimeError(f"attempt {attempts['n']} fails")
    return x

@workflow.defn
class Flow:
    @workflow.run
    async def run(self, x: str) -> str:
        a = await workflow.execute_activity(ok, x, start_to_close_timeout=timedelta(seconds=10))
        b = await workflow.execute_activity(flaky, x, start_to_close_timeout=timedelta(seconds=10),
                                            retry_policy=RetryPolicy(initial_interval=timedelta(milliseconds=100),
                                                                     maximum_attempts=5))
        return a + b

async def main(mode: str):
    path = os.path.join(os.path.dirname(sys.executable), "temporal")
    env = await WorkflowEnvironment.start_local(dev_server_existing_path=path, ip="127.0.0.1")
    target, namespace = env.client.service_client.config.target_host, env.client.namespace
    try:
        if mode == "official-client":  # the starting side still uses temporalio.contrib.opentelemetry
            from temporalio.contrib.opentelemetry import TracingInterceptor as Official
            starter = await Client.connect(target, namespace=namespace, interceptors=[Official()])
            TemporalInstrumentor().instrument()
            worker_client = await Client.connect(target, namespace=namespace)
        else:
            TemporalInstrumentor().instrument()
            starter = worker_client = await Client.connect(target, namespace=namespace)
        async with Worker(worker_client, task_queue="q", workflows=[Flow], activities=[ok, flaky]):
            result = await starter.execute_workflow(Flow.run, "hi", id="wf-1", task_queue="q")
        assert result == "HIhi", result
    finally:
        await env.shutdown()
    spans = [{"name": s.name, "trace": s.context.trace_id, "id": s.context.span_id,
              "parent": s.parent.span_id if s.parent else None, "status": s.status.status_code.name,
              "attributes": dict(s.attributes)} for s in exporter.get_finished_spans()]
    print(json.dumps(spans), flush=True)

if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
    # Exit without interpreter finalization: with grpcio loaded beside temporalio's runtime, Python's
    # finalization aborts about one run in three (PyGILState_Release), after all the work is done.
    os._exit(0)
