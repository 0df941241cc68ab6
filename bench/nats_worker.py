"""One measurement process for bench/nats_overhead.py: connect, maybe instrument, time three modes.

Usage: python bench/nats_worker.py URL CONDITION MESSAGES [SIDETRACE_DIR]
CONDITION: bare, sidetrace, sidetrace+metrics (with an SDK meter provider, whose reader is never
collected: the cost of recording), peer, sdk (the reference: no NATS, only the two spans a pipelined
message makes, started and ended with the same attributes, pipelined mode only), by-hand (the same
two spans made by the app around nats-py, with a traceparent header read by no one: the process span
starts under a constant parent; pipelined mode only) or by-hand-parented (the same, but the handler
reads the producer's context with ``propagate.extract``, starts the process span as its child and
makes it current for the handler body, as any instrumentation that parents must). SIDETRACE_DIR: a
directory whose `sidetrace` package is imported instead of the installed one (an older revision).
Prints one JSON line: microseconds of wall and CPU time per message for each mode, and spans made.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import nats
from _sdk import Discard, discarding_provider
from opentelemetry import context, propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind

# The attributes sidetrace gives the publish and the process span of one pipelined message.
PEER = {"server.address": "127.0.0.1", "server.port": 4222, "messaging.client.id": "7"}
PUBLISH = {"messaging.system": "nats", "messaging.operation.name": "publish", "messaging.operation.type": "send",
           "messaging.destination.name": "bench.pipe", **PEER, "messaging.message.body.size": 64}
PROCESS = {**PUBLISH, "messaging.operation.name": "process", "messaging.operation.type": "process"}


def instrument(condition: str) -> tuple[TracerProvider | None, Discard | None]:
    if condition == "bare":
        return None, None
    provider, exporter = discarding_provider()
    options = {}
    if condition.startswith("sidetrace"):
        from sidetrace.instrumentors.nats import NatsInstrumentor

        if condition == "sidetrace+metrics":  # an SDK meter provider: the histograms are recorded
            from opentelemetry.sdk.metrics import MeterProvider
            from opentelemetry.sdk.metrics.export import InMemoryMetricReader

            options["meter_provider"] = MeterProvider([InMemoryMetricReader()])
    else:
        from otel_instrumentation_nats import NatsInstrumentor
    NatsInstrumentor().instrument(tracer_provider=provider, **options)
    return provider, exporter


async def measure(url: str, messages: int) -> dict[str, dict[str, float]]:
    nc = await nats.connect(url)
    results: dict[str, dict[str, float]] = {}
    count = 0
    done = asyncio.Event()
    target = 0

    async def handler(msg) -> None:  # noqa: ANN001
        nonlocal count
        count += 1
        if count >= target:
            done.set()

    async def responder(msg) -> None:  # noqa: ANN001
        await msg.respond(b"pong")

    await nc.subscribe("bench.pipe", cb=handler)
    await nc.subscribe("bench.seq", cb=handler)
    await nc.subscribe("bench.req", cb=responder)
    await nc.flush()

    async def pipelined() -> None:
        nonlocal count, target
        count, target = 0, messages
        done.clear()
        for _ in range(messages):
            await nc.publish("bench.pipe", b"x" * 64)
        await nc.flush()
        await asyncio.wait_for(done.wait(), 120)

    async def sequential() -> None:
        nonlocal count, target
        for _ in range(messages // 5):
            count, target = 0, 1
            done.clear()
            await nc.publish("bench.seq", b"x" * 64)
            await asyncio.wait_for(done.wait(), 10)

    async def request() -> None:
        for _ in range(messages // 5):
            await nc.request("bench.req", b"ping", timeout=10)

    for name, run, n in (("pipelined", pipelined, messages), ("sequential", sequential, messages // 5),
                         ("request", request, messages // 5)):
        await run()  # warm up: connections, caches, code paths
        wall, cpu = time.perf_counter(), time.process_time()
        await run()
        results[name] = {"wall_us": (time.perf_counter() - wall) / n * 1e6,
                         "cpu_us": (time.process_time() - cpu) / n * 1e6}
    await nc.close()
    return results


def two_spans(provider: TracerProvider, messages: int) -> dict[str, dict[str, float]]:
    """The SDK's own cost of what a pipelined message makes: a publish span and its process span."""
    tracer = provider.get_tracer("bench")

    def run() -> None:
        for _ in range(messages):
            publish = tracer.start_span("publish bench.pipe", kind=SpanKind.PRODUCER, attributes=PUBLISH)
            publish.end()
            process = tracer.start_span("process bench.pipe", context=trace.set_span_in_context(publish),
                                        kind=SpanKind.CONSUMER, attributes=PROCESS)
            process.end()

    run()  # warm up
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return {"pipelined": {"wall_us": (time.perf_counter() - wall) / messages * 1e6,
                          "cpu_us": (time.process_time() - cpu) / messages * 1e6}}


async def by_hand(url: str, provider: TracerProvider, messages: int, parented: bool
                  ) -> dict[str, dict[str, float]]:
    """Pipelined publish-and-process with the same two spans made by the app around nats-py and a
    traceparent header (the publish span's own) sent along. Not ``parented``: the header is read by no
    one and the process span starts under one constant parent, without a single propagation call or
    attribute built. ``parented``: the handler reads the producer's context the standard way
    (``propagate.extract``), starts the process span as its child and makes it current (in the
    message's context) for the handler body: the least any instrumentation that parents pays."""
    tracer = provider.get_tracer("bench")
    producer = trace.set_span_in_context(trace.NonRecordingSpan(
        trace.SpanContext(0x1F, 0x2F, is_remote=True, trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))))
    nc = await nats.connect(url)
    count = 0
    done = asyncio.Event()

    async def handler(msg) -> None:  # noqa: ANN001
        nonlocal count
        tracer.start_span("process bench.pipe", context=producer, kind=SpanKind.CONSUMER, attributes=PROCESS).end()
        count += 1
        if count >= messages:
            done.set()

    async def parented_handler(msg) -> None:  # noqa: ANN001
        nonlocal count
        message_context = propagate.extract(msg.headers)
        span = tracer.start_span("process bench.pipe", context=message_context, kind=SpanKind.CONSUMER,
                                 attributes=PROCESS)
        token = context.attach(trace.set_span_in_context(span, message_context))
        try:
            count += 1
            if count >= messages:
                done.set()
        finally:
            context.detach(token)
            span.end()

    await nc.subscribe("bench.pipe", cb=parented_handler if parented else handler)
    await nc.flush()

    async def run() -> None:
        nonlocal count
        count = 0
        done.clear()
        for _ in range(messages):
            span = tracer.start_span("publish bench.pipe", kind=SpanKind.PRODUCER, attributes=PUBLISH)
            # the span's own context, as any instrumentation sends it: a constant header would be
            # cheaper in nats-py (its per-value str.translate costs with the distinct characters)
            sent = span.get_span_context()
            traceparent = "00-%032x-%016x-%02x" % (sent.trace_id, sent.span_id, sent.trace_flags)  # noqa: UP031
            await nc.publish("bench.pipe", b"x" * 64, headers={"traceparent": traceparent})
            span.end()
        await nc.flush()
        await asyncio.wait_for(done.wait(), 120)

    await run()  # warm up
    wall, cpu = time.perf_counter(), time.process_time()
    await run()
    result = {"pipelined": {"wall_us": (time.perf_counter() - wall) / messages * 1e6,
                            "cpu_us": (time.process_time() - cpu) / messages * 1e6}}
    await nc.close()
    return result


def main() -> None:
    url, condition, messages = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if len(sys.argv) > 4:
        sys.path.insert(0, sys.argv[4])
    if condition in ("sdk", "by-hand", "by-hand-parented"):
        provider, exporter = discarding_provider()
        results = two_spans(provider, messages) if condition == "sdk" else asyncio.run(
            by_hand(url, provider, messages, parented=condition == "by-hand-parented"))
        provider.force_flush()
        print(json.dumps({"condition": condition, "modes": results, "spans": exporter.spans}))
        return
    provider, exporter = instrument(condition)
    results = asyncio.run(measure(url, messages))
    if provider is not None:
        provider.force_flush()
    print(json.dumps({"condition": condition, "modes": results, "spans": exporter.spans if exporter else 0}))


if __name__ == "__main__":
    main()
