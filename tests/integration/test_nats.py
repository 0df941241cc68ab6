"""NatsInstrumentor against a real nats-server with JetStream."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import nats
import nats.aio.client
import nats.js.client
import pytest
import wrapt
from nats.js.api import ConsumerConfig
from opentelemetry import baggage, propagate, trace
from opentelemetry.context import Context, attach, detach
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.instrumentation.utils import suppress_instrumentation, unwrap
from opentelemetry.propagators.textmap import TextMapPropagator, default_getter, default_setter
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, Sampler, SamplingResult
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from sidetrace.agent.processors.span_metrics import SpanMetricsProcessor
from sidetrace.config import SpanMetricsProcessorSection
from sidetrace.instrumentors import nats as nats_instrumentation
from sidetrace.instrumentors.nats import NatsInstrumentor, process
from sidetrace.instrumentors.nats._telemetry import DESTINATION_LIMIT, DESTINATIONS_ATTR
from tests.integration.nats_server import NatsServer
from tests.telemetry import FailingTelemetry, Telemetry

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    s = NatsServer(tmp_path_factory.mktemp("nats"))
    yield s
    s.stop()


@pytest.fixture
def telemetry(request: pytest.FixtureRequest) -> Iterator[Telemetry]:
    options = getattr(request, "param", {})
    t = Telemetry()
    NatsInstrumentor().instrument(tracer_provider=t.tracer_provider, meter_provider=t.meter_provider, **options)
    yield t
    NatsInstrumentor().uninstrument()


@pytest.fixture
async def nc(server: NatsServer, telemetry: Telemetry) -> AsyncIterator[nats.aio.client.Client]:
    client = await nats.connect(server.url)
    yield client
    await client.close()


def collector(bucket: list):  # noqa: ANN201
    """A subscription callback (a coroutine function, as nats-py requires) that keeps messages."""

    async def cb(msg) -> None:  # noqa: ANN001
        bucket.append(msg)

    return cb


async def wait_for(predicate, timeout: float = 5.0) -> None:  # noqa: ANN001
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_publish_and_process_share_a_trace(nc, telemetry: Telemetry) -> None:
    got = []
    await nc.subscribe("orders.created", cb=collector(got))
    await nc.publish("orders.created", b"order-1", headers={"X-Tenant": "acme"})
    await wait_for(lambda: telemetry.finished("process orders.created"))
    publish = telemetry.one("publish orders.created")
    processed = telemetry.one("process orders.created")
    assert publish.kind == SpanKind.PRODUCER and processed.kind == SpanKind.CONSUMER
    assert processed.context.trace_id == publish.context.trace_id
    assert processed.parent.span_id == publish.context.span_id
    assert publish.attributes["messaging.system"] == "nats"
    assert publish.attributes["messaging.operation.type"] == "send"
    assert publish.attributes["messaging.destination.name"] == "orders.created"
    assert publish.attributes["messaging.message.body.size"] == 7
    assert publish.attributes["server.address"] == "127.0.0.1"
    assert processed.attributes["messaging.operation.name"] == "process"
    assert got[0].headers["X-Tenant"] == "acme"


async def test_user_headers_are_not_mutated_and_arrive_unchanged(nc, telemetry: Telemetry) -> None:
    got = []
    await nc.subscribe("hdr", cb=collector(got))
    headers = {"X-Key": "value with  spaces", "Nats-Msg-Id": "m-1"}
    before = dict(headers)
    await nc.publish("hdr", b"x", headers=headers)
    await wait_for(lambda: got)
    assert headers == before
    received = dict(got[0].headers)
    traceparent = received.pop("traceparent")
    assert received == before
    assert traceparent.split("-")[2] == format(telemetry.one("publish hdr").context.span_id, "016x")
    assert telemetry.one("publish hdr").attributes["messaging.message.id"] == "m-1"


class TenantPropagator(TextMapPropagator):
    """A propagator of the app's own (as B3 or a vendor's would be): one ``x-tenant-trace`` field."""

    def inject(self, carrier, context=None, setter=default_setter) -> None:  # noqa: ANN001
        span_context = trace.get_current_span(context).get_span_context()
        if span_context.is_valid:
            setter.set(carrier, "x-tenant-trace", f"{span_context.trace_id:x}:{span_context.span_id:x}")

    def extract(self, carrier, context=None, getter=default_getter) -> Context:  # noqa: ANN001
        value = getter.get(carrier, "x-tenant-trace")
        if not value:
            return context or Context()
        trace_id, span_id = (int(part, 16) for part in value[0].split(":"))
        producer = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        return trace.set_span_in_context(NonRecordingSpan(producer), context or Context())

    @property
    def fields(self) -> set[str]:
        return {"x-tenant-trace"}


@pytest.fixture
def global_propagator() -> Iterator[None]:
    before = propagate.get_global_textmap()
    yield
    propagate.set_global_textmap(before)


async def test_a_configured_propagator_carries_the_context(nc, telemetry: Telemetry, global_propagator: None) -> None:
    got = []
    await nc.subscribe("tenant", cb=collector(got))
    await nc.publish("tenant", b"default first")
    await wait_for(lambda: len(got) == 1)
    assert "traceparent" in got[0].headers
    propagate.set_global_textmap(TenantPropagator())  # switched while instrumented: used from the next message
    await nc.publish("tenant", b"configured")
    await wait_for(lambda: len(got) == 2)
    assert "traceparent" not in got[1].headers
    publish = telemetry.finished("publish tenant")[1]
    processed = telemetry.finished("process tenant")[1]
    assert got[1].headers["x-tenant-trace"] == f"{publish.context.trace_id:x}:{publish.context.span_id:x}"
    assert processed.parent.span_id == publish.context.span_id


class InjectRaises(TraceContextTextMapPropagator):
    """A broken propagator of the app's: its inject raises; it reads a context as W3C's does."""

    def inject(self, carrier, context=None, setter=default_setter) -> None:  # noqa: ANN001
        raise RuntimeError("propagator inject failed")


class OpenSpans(SpanProcessor):
    """The spans started and not yet ended, by span id."""

    def __init__(self) -> None:
        self.open: dict[int, str] = {}

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self.open[span.context.span_id] = span.name

    def on_end(self, span: ReadableSpan) -> None:
        self.open.pop(span.context.span_id, None)


async def test_a_propagator_whose_inject_raises_ends_every_span_and_the_app_goes_on(
    server: NatsServer, telemetry: Telemetry, global_propagator: None
) -> None:
    """publish, request, respond and JetStream publish: each message goes with the app's own headers (a
    reply without the request's trace fields), every span started ends, and each failure counts once."""
    opened = OpenSpans()
    telemetry.tracer_provider.add_span_processor(opened)
    propagate.set_global_textmap(InjectRaises())
    client = await nats.connect(server.url)
    try:
        got: list = []

        async def respond(msg) -> None:  # noqa: ANN001
            await msg.respond(b"pong:" + msg.data)

        await client.subscribe("inject.sub", cb=collector(got))
        await client.subscribe("inject.svc", cb=respond)
        await client.publish("inject.sub", b"pushed", headers={"X-Key": "v"})
        foreign = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"  # the app's own, on its request
        reply = await client.request("inject.svc", b"ping", timeout=5, headers={"traceparent": foreign})
        assert reply.data == b"pong:ping" and "traceparent" not in (reply.headers or {})
        js = client.jetstream()
        await js.add_stream(name="INJECT", subjects=["inject.js.>"])
        assert (await js.publish("inject.js.a", b"stored")).seq == 1
        await js.delete_stream("INJECT")
        await wait_for(lambda: [(m.data, m.headers) for m in got] == [(b"pushed", {"X-Key": "v"})])
        await wait_for(lambda: len(telemetry.finished("process inject.sub")) == 1)
    finally:
        await client.close()
    assert opened.open == {}
    assert sorted(s.name for s in telemetry.finished()) == ["process inject.sub", "process inject.svc",
                                                           "publish inject.js.a", "publish inject.sub",
                                                           "request inject.svc"]
    assert telemetry.errors() == {"inject": 4}  # publish, request, respond and JetStream publish


class ExtractRaises(TraceContextTextMapPropagator):
    """A broken propagator of the app's: it writes a context as W3C's does; its extract raises."""

    def extract(self, carrier, context=None, getter=default_getter) -> Context:  # noqa: ANN001
        raise RuntimeError("propagator extract failed")


async def test_a_propagator_whose_extract_raises_costs_consumers_their_parent_not_their_spans(
    nc, telemetry: Telemetry, global_propagator: None
) -> None:
    """A callback's process, a fetch's receive, process(msg) and an ack outside it: each span is made,
    without the producer as parent or link, and each failed read counts once."""
    propagate.set_global_textmap(ExtractRaises())
    got: list = []
    await nc.subscribe("extract.sub", cb=collector(got))
    await nc.publish("extract.sub", b"pushed")
    js = nc.jetstream()
    await js.add_stream(name="EXTRACT", subjects=["extract.js.>"])
    try:
        psub = await js.pull_subscribe("extract.js.>", durable="extract")
        await js.publish("extract.js.a", b"1")
        await js.publish("extract.js.b", b"2")
        msgs = await psub.fetch(2, timeout=5)
        with process(msgs[0]):
            await msgs[0].ack()
        await msgs[1].ack()
        await wait_for(lambda: telemetry.finished("process extract.sub"))
    finally:
        await js.delete_stream("EXTRACT")
    assert [m.data for m in got] == [b"pushed"]
    consumers = [s for s in telemetry.finished() if not s.name.startswith("publish ")]
    assert sorted(s.name for s in consumers) == ["ack extract.js.>", "process extract.js.>", "process extract.sub",
                                                 "receive extract.js.>"]
    assert [(s.name, s.links) for s in consumers if s.parent is not None or s.links] == []
    assert telemetry.errors() == {"extract": 5}  # process, two messages received, process(msg), the lone ack


async def test_tracestate_and_baggage_travel_with_the_default_propagator(nc, telemetry: Telemetry) -> None:
    got, seen = [], []

    async def cb(msg) -> None:  # noqa: ANN001
        seen.append((baggage.get_baggage("tenant"), trace.get_current_span().get_span_context().trace_state))
        got.append(msg)

    await nc.subscribe("stateful", cb=cb)
    upstream = SpanContext(0x1F, 0x2F, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED),
                           trace_state=TraceState([("vendor", "v1")]))
    ctx = baggage.set_baggage("tenant", "acme", trace.set_span_in_context(NonRecordingSpan(upstream)))
    token = attach(ctx)
    try:
        await nc.publish("stateful", b"x")
    finally:
        detach(token)
    await wait_for(lambda: got)
    publish, processed = telemetry.one("publish stateful"), telemetry.one("process stateful")
    assert publish.context.trace_id == 0x1F and publish.parent.span_id == 0x2F
    assert got[0].headers["traceparent"] == f"00-{0x1F:032x}-{publish.context.span_id:016x}-01"
    assert got[0].headers["tracestate"] == "vendor=v1"
    assert got[0].headers["baggage"] == "tenant=acme"
    assert processed.parent.span_id == publish.context.span_id
    assert seen == [("acme", TraceState([("vendor", "v1")]))]


@pytest.mark.parametrize(("headers", "parented"), [
    ({"Traceparent": f"00-{0xA1:032x}-{0xB2:016x}-01"}, True),  # another spelling of the field
    ({"traceparent": f"00-{0xA1:032x}-{0xB2:016x}-01", "X-Other": "1"}, True),
    ({"traceparent": f"01-{0xA1:032x}-{0xB2:016x}-01-future"}, True),  # a later version, read as W3C says
    ({"traceparent": f"00-{0xA1:032x}-{0xB2:016x}-01-extra"}, False),  # version 00 has no more fields
    ({"traceparent": f"00-{0:032x}-{0xB2:016x}-01"}, False),  # an all-zero id is invalid
    ({"traceparent": f"00-{0xA1:032X}-{0xB2:016x}-01"}, False),  # upper case hex is invalid
    ({"traceparent": f"ff-{0xA1:032x}-{0xB2:016x}-01"}, False),  # version ff is invalid
], ids=["spelling", "other header", "later version", "extra field", "zero id", "upper case", "version ff"])
async def test_foreign_trace_headers_are_read_as_the_propagator_reads_them(
    nc, telemetry: Telemetry, headers: dict[str, str], parented: bool
) -> None:
    """A message from an uninstrumented publisher (another client, another language) with a
    traceparent of its own making: parented by it exactly when the W3C propagator would be."""
    got = []
    await nc.subscribe("foreign", cb=collector(got))
    with suppress_instrumentation():
        await nc.publish("foreign", b"x", headers=headers)
    await wait_for(lambda: got)
    assert telemetry.finished("publish foreign") == []
    processed = telemetry.one("process foreign")
    if parented:
        assert (processed.context.trace_id, processed.parent.span_id) == (0xA1, 0xB2)
    else:
        assert processed.parent is None


async def test_what_a_connection_remembers_per_subject_is_bounded_and_follows_reconnects(
    tmp_path: Path, telemetry: Telemetry
) -> None:
    first, second = NatsServer(tmp_path / "first"), NatsServer(tmp_path / "second")
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    client = await nats.connect(servers=[first.url, second.url], dont_randomize=True, reconnect_time_wait=0.1,
                                reconnected_cb=on_reconnect)
    try:
        for n in range(DESTINATION_LIMIT + 50):
            await client.publish(f"ids.{n}", b"x")
        remembered = getattr(client, DESTINATIONS_ATTR)[3]
        assert len(remembered) == DESTINATION_LIMIT
        last = telemetry.one(f"publish ids.{DESTINATION_LIMIT + 49}")  # past the bound: built for the message
        assert (last.attributes["messaging.destination.name"], last.attributes["server.port"]) == (
            f"ids.{DESTINATION_LIMIT + 49}", first.port)
        first.stop()
        await asyncio.wait_for(reconnected.wait(), 20)
        await client.publish("ids.0", b"x")
        assert [s.attributes["server.port"] for s in telemetry.finished("publish ids.0")] == [first.port, second.port]
        assert len(getattr(client, DESTINATIONS_ATTR)[3]) == 1
    finally:
        await client.close()
        first.stop()
        second.stop()


async def test_queue_group_and_wildcard_subscription_names(nc, telemetry: Telemetry) -> None:
    got = []
    await nc.subscribe("orders.*", queue="workers", cb=collector(got))
    await nc.publish("orders.123", b"x")
    await wait_for(lambda: got)
    processed = telemetry.one("process orders.*")
    assert processed.attributes["messaging.destination.name"] == "orders.123"
    assert processed.attributes["messaging.destination.template"] == "orders.*"
    assert processed.attributes["messaging.consumer.group.name"] == "workers"


async def test_request_is_one_client_span_and_the_reply_carries_the_responder(nc, telemetry: Telemetry) -> None:
    async def responder(msg) -> None:  # noqa: ANN001
        await msg.respond(b"pong")

    await nc.subscribe("svc.echo", cb=responder)
    reply = await nc.request("svc.echo", b"ping", timeout=5, headers={"X-Req": "1"})
    assert reply.data == b"pong"
    await wait_for(lambda: telemetry.finished("process svc.echo"))
    request = telemetry.one("request svc.echo")
    processed = telemetry.one("process svc.echo")
    assert request.kind == SpanKind.CLIENT
    assert processed.parent.span_id == request.context.span_id
    assert [s.name for s in telemetry.finished() if s.kind == SpanKind.PRODUCER] == []
    assert not any("_INBOX" in s.name and s.name != "process _INBOX.*" for s in telemetry.finished())
    # The reply's traceparent is the responder's, not the request's echoed back.
    assert reply.headers["traceparent"].split("-")[2] == format(processed.context.span_id, "016x")
    assert reply.headers["X-Req"] == "1"  # nats-py's own echo of other headers is left as it is


async def test_jetstream_publish_push_and_ack_event(nc, telemetry: Telemetry) -> None:
    js = nc.jetstream()
    await js.add_stream(name="ORDERS", subjects=["js.orders.>"])
    got = []
    await js.subscribe("js.orders.>", cb=collector(got), durable="billing")
    ack = await js.publish("js.orders.new", b"o-1", headers={"Nats-Msg-Id": "o-1"})
    await wait_for(lambda: telemetry.finished("process js.orders.>"))
    publish = telemetry.one("publish js.orders.new")
    assert publish.attributes["messaging.nats.jetstream.stream"] == "ORDERS"
    assert publish.attributes["messaging.nats.jetstream.sequence"] == ack.seq
    assert publish.attributes["messaging.message.id"] == "o-1"
    processed = telemetry.one("process js.orders.>")
    assert processed.parent.span_id == publish.context.span_id
    assert processed.attributes["messaging.destination.subscription.name"] == "billing"
    assert [e.name for e in processed.events] == ["ack"]
    names = [s.name for s in telemetry.finished()]
    assert not any("$JS" in n or "_INBOX" in n for n in names), names
    await js.delete_stream("ORDERS")


async def test_pull_fetch_receive_links_process_and_redelivery(nc, telemetry: Telemetry) -> None:
    js = nc.jetstream()
    await js.add_stream(name="JOBS", subjects=["jobs.>"])
    psub = await js.pull_subscribe("jobs.>", durable="worker",
                                   config=ConsumerConfig(ack_wait=1.0, max_deliver=5))
    await js.publish("jobs.a", b"1")
    await js.publish("jobs.b", b"2")
    msgs = await psub.fetch(2, timeout=5)
    receive = telemetry.one("receive jobs.>")
    assert receive.kind == SpanKind.CLIENT
    publishes = {s.context.span_id for s in telemetry.finished() if s.name.startswith("publish jobs.")}
    assert {link.context.span_id for link in receive.links} == publishes
    assert receive.attributes["messaging.batch.message_count"] == 2
    with process(msgs[0]) as span:
        await msgs[0].ack()
    assert span.name == "process jobs.>" and [e.name for e in span.events] == ["ack"]
    processed = telemetry.one("process jobs.>")
    assert processed.parent.span_id in publishes
    await msgs[1].nak()
    again = await psub.fetch(1, timeout=5)
    with process(again[0]):
        await again[0].ack()
    redelivered = [s for s in telemetry.finished("process jobs.>") if "messaging.nats.jetstream.delivered_count" in
                   s.attributes]
    assert [s.attributes["messaging.nats.jetstream.delivered_count"] for s in redelivered] == [2]
    await js.delete_stream("JOBS")


async def test_an_ack_outside_a_process_span_is_its_own_span_linked_to_the_producer(nc, telemetry: Telemetry) -> None:
    """settle_spans left off: a fetched message acked outside process(msg) has no process span to carry
    the event, so the ack is an `ack {subject}` CLIENT span of its own, a child of the current span (here
    none: a root), linked to the message's producer."""
    js = nc.jetstream()
    await js.add_stream(name="LOOSE", subjects=["loose.>"])
    try:
        psub = await js.pull_subscribe("loose.>", durable="loose")
        await js.publish("loose.a", b"1")
        (msg,) = await psub.fetch(1, timeout=5)
        await msg.ack()
        publish = telemetry.one("publish loose.a")
        (ack,) = [s for s in telemetry.finished() if s.name.startswith("ack ")]
        assert (ack.kind, ack.parent) == (SpanKind.CLIENT, None)
        assert [link.context.span_id for link in ack.links] == [publish.context.span_id]
        assert telemetry.finished("process loose.>") == []
    finally:
        await js.delete_stream("LOOSE")


@pytest.mark.parametrize("telemetry", [{"settle_spans": True, "use_links": True}], indirect=True)
async def test_settle_spans_and_links_options(nc, telemetry: Telemetry) -> None:
    js = nc.jetstream()
    await js.add_stream(name="OPT", subjects=["opt.>"])
    psub = await js.pull_subscribe("opt.>", durable="o")
    await js.publish("opt.x", b"1")
    (msg,) = await psub.fetch(1, timeout=5)
    with process(msg):
        await msg.ack()
    processed = telemetry.one("process opt.>")
    publish = telemetry.one("publish opt.x")
    assert processed.parent is None
    assert [link.context.span_id for link in processed.links] == [publish.context.span_id]
    settle = telemetry.one("ack opt.>")
    assert settle.kind == SpanKind.CLIENT and settle.parent.span_id == processed.context.span_id
    await js.delete_stream("OPT")


async def test_a_plain_function_callback_is_still_refused_by_nats(nc, telemetry: Telemetry) -> None:
    with pytest.raises(nats.errors.Error, match="coroutine"):
        await nc.subscribe("plain", cb=lambda msg: None)


async def test_next_msg_is_a_receive_span(nc, telemetry: Telemetry) -> None:
    sub = await nc.subscribe("pulled")
    await nc.publish("pulled", b"x")
    msg = await sub.next_msg(timeout=5)
    receive = telemetry.one("receive pulled")
    assert [link.context.span_id for link in receive.links] == [telemetry.one("publish pulled").context.span_id]
    assert msg.data == b"x"


class LinkRecordingSampler(Sampler):
    """Samples everything, and keeps the links each span was started with: what a sampler can see."""

    def __init__(self) -> None:
        self.links: dict[str, list[int]] = {}

    def should_sample(self, parent_context: Context | None, trace_id: int, name: str, kind: SpanKind | None = None,
                      attributes: Attributes = None, links: Sequence[Link] | None = None,
                      trace_state: TraceState | None = None) -> SamplingResult:
        self.links[name] = [link.context.span_id for link in links or ()]
        return ALWAYS_ON.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return "LinkRecordingSampler"


async def test_receive_links_are_given_at_span_start(server: NatsServer) -> None:
    sampler = LinkRecordingSampler()
    t = Telemetry()
    t.tracer_provider = TracerProvider(sampler=sampler)
    t.tracer_provider.add_span_processor(SimpleSpanProcessor(t.spans))
    NatsInstrumentor().instrument(tracer_provider=t.tracer_provider, meter_provider=t.meter_provider)
    client = await nats.connect(server.url)
    try:
        js = client.jetstream()
        await js.add_stream(name="LINKS", subjects=["links.>"])
        psub = await js.pull_subscribe("links.>", durable="linker")
        await js.publish("links.a", b"1")
        await js.publish("links.b", b"2")
        before = time.time_ns()
        await psub.fetch(2, timeout=5)
        after = time.time_ns()
        await js.delete_stream("LINKS")
    finally:
        await client.close()
        NatsInstrumentor().uninstrument()
    publishes = [s.context.span_id for s in t.finished() if s.name.startswith("publish links.")]
    receive = t.one("receive links.>")
    assert sampler.links["receive links.>"] == publishes == [link.context.span_id for link in receive.links]
    assert before <= receive.start_time <= receive.end_time <= after  # the span covers the whole fetch


def consumed(telemetry: Telemetry) -> dict[tuple[str, str], int]:
    """messaging.client.consumed.messages by (operation, destination)."""
    return {(p.attributes["messaging.operation.name"], p.attributes["messaging.destination.name"]): p.value
            for p in telemetry.metric_points("messaging.client.consumed.messages")}


async def test_a_pulled_message_is_counted_consumed_once(nc, telemetry: Telemetry) -> None:
    js = nc.jetstream()
    await js.add_stream(name="ONCE", subjects=["once.>"])
    psub = await js.pull_subscribe("once.>", durable="counter")
    for n in range(3):
        await js.publish(f"once.{n}", b"x")
    for msg in await psub.fetch(3, timeout=5):
        with process(msg):
            await msg.ack()
    sub = await nc.subscribe("once.core")
    await nc.publish("once.core", b"x")
    with process(await sub.next_msg(timeout=5)):
        pass
    await js.delete_stream("ONCE")
    # each delivery counted by its receive, none again by its process span
    assert consumed(telemetry) == {("receive", "once.>"): 3, ("receive", "once.core"): 1}
    assert sum(p.count for p in telemetry.metric_points("messaging.process.duration")) == 4


async def test_receive_spans_of_a_queue_subscription_carry_its_group(nc, telemetry: Telemetry) -> None:
    sub = await nc.subscribe("work.items", queue="workers")
    await nc.publish("work.items", b"x")
    await sub.next_msg(timeout=5)
    receive = telemetry.one("receive work.items")
    assert receive.attributes["messaging.consumer.group.name"] == "workers"
    assert consumed(telemetry) == {("receive", "work.items"): 1}
    assert [p.attributes["messaging.consumer.group.name"]
            for p in telemetry.metric_points("messaging.client.consumed.messages")] == ["workers"]


async def test_a_thousand_subjects_to_one_wildcard_subscription_make_one_consumer_span_name(
        nc, telemetry: Telemetry) -> None:
    """Publishers of id-bearing subjects get a span name per subject (the conventions name a send by
    its destination); the wildcard subscription's consumer names all of them by its own subject, and
    the agent's span-metrics cap bounds what the publishers' names cost it."""
    got: list = []
    await nc.subscribe("orders.*", cb=collector(got))
    pulled = await nc.subscribe("pulled.*")
    for n in range(1, 1001):
        await nc.publish(f"orders.{n}", b"x")
    await nc.publish("pulled.7", b"x")
    with process(await pulled.next_msg(timeout=5)):
        pass
    await wait_for(lambda: len(telemetry.finished("process orders.*")) == 1000, timeout=30)
    consumers = [s for s in telemetry.finished() if s.kind is SpanKind.CONSUMER]
    assert sorted({s.name for s in consumers}) == ["process orders.*", "process pulled.*"]
    assert {s.attributes["messaging.destination.template"] for s in consumers} == {"orders.*", "pulled.*"}
    assert len({s.attributes["messaging.destination.name"] for s in consumers}) == 1001
    assert telemetry.one("receive pulled.*").attributes["messaging.destination.template"] == "pulled.*"
    assert len({s.name for s in telemetry.finished() if s.kind is SpanKind.PRODUCER}) == 1001
    # metrics: the consumer's one destination; the publishers' first 200, then _OTHER
    assert consumed(telemetry) == {("process", "orders.*"): 1000, ("receive", "pulled.*"): 1}
    sent = {p.attributes["messaging.destination.name"]: p.value
            for p in telemetry.metric_points("messaging.client.sent.messages")}
    assert (len(sent), sent["_OTHER"]) == (201, 801)
    # the agent's span metrics, [processors.span_metrics] max_series = 10: the two consumers' series,
    # eight publish subjects, and the other 993 publishes in one overflow series
    processor = SpanMetricsProcessor(SpanMetricsProcessorSection(max_series=10))
    processor.apply(encode_spans([*consumers, *(s for s in telemetry.finished() if s.kind is SpanKind.PRODUCER)]))
    calls, _, overflow = processor.families()
    series = {(m.labels["span_name"], m.labels["span_kind"]): m.value for m in calls.samples}
    assert series[("process orders.*", "SPAN_KIND_CONSUMER")] == 1000
    assert series[("__overflow__", "SPAN_KIND_PRODUCER")] == 993
    assert len(series) == 11 and overflow.samples[0].value == 993


async def test_metrics_are_recorded(nc, telemetry: Telemetry) -> None:
    await nc.subscribe("m", cb=collector([]))
    for _ in range(3):
        await nc.publish("m", b"x")
    await wait_for(lambda: len(telemetry.finished("process m")) == 3)
    (sent,) = telemetry.metric_points("messaging.client.sent.messages")
    assert sent.value == 3 and sent.attributes["messaging.destination.name"] == "m"
    (consumed,) = telemetry.metric_points("messaging.client.consumed.messages")
    assert consumed.value == 3
    (process_duration,) = telemetry.metric_points("messaging.process.duration")
    assert process_duration.count == 3
    assert telemetry.metric_points("messaging.client.operation.duration")[0].count == 3


@pytest.mark.parametrize("hooks", [("on_start", "on_end"), ("on_end",)], ids=["on_start and on_end raise",
                                                                           "on_end raises"])
async def test_a_failing_tracer_never_reaches_the_app(server: NatsServer, hooks: tuple[str, ...]) -> None:
    """publish, process, request, respond, JetStream publish, fetch, next_msg and ack with a tracer
    whose SpanProcessor raises (then no span starts, or each fails as it ends) and whose exporter
    raises: the app sees every message and answer, and each span we tried is one counted failure."""
    failing = FailingTelemetry(hooks)
    NatsInstrumentor().instrument(tracer_provider=failing.tracer_provider, meter_provider=failing.meter_provider)
    client = await nats.connect(server.url)
    try:
        got: list = []

        async def respond(msg) -> None:  # noqa: ANN001
            await msg.respond(b"pong:" + msg.data)

        await client.subscribe("safe.sub", cb=collector(got))
        await client.subscribe("safe.svc", cb=respond)
        pulled = await client.subscribe("safe.pulled")
        await client.publish("safe.sub", b"pushed")
        assert (await client.request("safe.svc", b"ping", timeout=5)).data == b"pong:ping"
        await client.publish("safe.pulled", b"pulled")
        assert (await pulled.next_msg(timeout=5)).data == b"pulled"
        js = client.jetstream()
        await js.add_stream(name="SAFE", subjects=["safe.js.>"])
        assert (await js.publish("safe.js.a", b"stored")).seq == 1
        psub = await js.pull_subscribe("safe.js.>", durable="safe")
        (msg,) = await psub.fetch(1, timeout=5)
        with process(msg):
            await msg.ack()
        assert msg.data == b"stored"
        await wait_for(lambda: [m.data for m in got] == [b"pushed"])
        await js.delete_stream("SAFE")
    finally:
        await client.close()
        NatsInstrumentor().uninstrument()
    if "on_start" in hooks:  # no span started; the ack, outside any process span, tried its own
        expected = {"publish": 2, "request": 1, "jetstream publish": 1, "process": 3, "next_msg": 1, "fetch": 1,
                    "ack": 1}
        assert (failing.finished(), failing.exporter.spans) == ([], 0)
    else:  # 9 spans started and ended (the ack an event on its process span); each end failed
        expected = {"end": 6, "process end": 3}
        assert (len(failing.finished()), failing.exporter.spans) == (9, 9)
    assert failing.errors() == expected
    # the messages were counted all the same: two pushed (callback and responder), two pulled
    assert sum(p.value for p in failing.metric_points("messaging.client.consumed.messages")) == 4


async def test_over_max_payload_goes_without_headers_and_is_counted(
    tmp_path: Path, telemetry: Telemetry
) -> None:
    small = NatsServer(tmp_path / "small", "max_payload: 200")
    try:
        client = await nats.connect(small.url)
        got = []
        await client.subscribe("big", cb=collector(got))
        await client.publish("big", b"x" * 190)
        await wait_for(lambda: got)
        assert not got[0].headers
        assert nats_instrumentation._TELEMETRY.injection_misses == 1
        await client.close()
    finally:
        small.stop()


async def test_uninstrument_restores_nats_and_instrumenting_twice_is_harmless(server: NatsServer) -> None:
    original = nats.aio.client.Client.publish
    original_fetch = nats.js.client.JetStreamContext.PullSubscription.fetch
    t = Telemetry()
    NatsInstrumentor().instrument(tracer_provider=t.tracer_provider, meter_provider=t.meter_provider)
    NatsInstrumentor().instrument(tracer_provider=t.tracer_provider, meter_provider=t.meter_provider)
    assert nats.aio.client.Client.publish is not original
    client = await nats.connect(server.url)
    await client.publish("twice", b"x")
    assert len(t.finished("publish twice")) == 1
    NatsInstrumentor().uninstrument()
    assert nats.aio.client.Client.publish is original
    assert nats.js.client.JetStreamContext.PullSubscription.fetch is original_fetch
    await client.publish("twice", b"x")
    assert len(t.finished("publish twice")) == 1
    await client.close()


async def test_uninstrument_takes_out_only_ours_beside_another_wrapper_of_publish(server: NatsServer) -> None:
    """Another instrumentation's wrapt wrapper of Client.publish, put on before instrument() or after
    it, sees every publish with its client bound, and keeps doing so after uninstrument(), which
    stops our spans: put on before, it is what uninstrument puts back; put on after, it stays. Its
    unwrap() works once ours is out, not while ours is on top of it."""
    client_class = nats.aio.client.Client
    original = client_class.publish
    calls: list[tuple[bool, str]] = []

    async def theirs(wrapped, instance, args, kwargs):  # noqa: ANN001, ANN202
        calls.append((instance is client, args[0]))
        return await wrapped(*args, **kwargs)

    t = Telemetry()
    client = await nats.connect(server.url)
    try:
        wrapt.wrap_function_wrapper(client_class, "publish", theirs)
        before = vars(client_class)["publish"]
        NatsInstrumentor().instrument(tracer_provider=t.tracer_provider, meter_provider=t.meter_provider)
        await client.publish("under", b"x")
        NatsInstrumentor().uninstrument()
        assert vars(client_class)["publish"] is before
        await client.publish("under", b"x")
        assert (calls, len(t.finished("publish under"))) == ([(True, "under")] * 2, 1)

        client_class.publish = original
        calls.clear()
        NatsInstrumentor().instrument(tracer_provider=t.tracer_provider, meter_provider=t.meter_provider)
        wrapt.wrap_function_wrapper(client_class, "publish", theirs)
        await client.publish("over", b"x")
        NatsInstrumentor().uninstrument()
        await client.publish("over", b"x")
        assert (calls, len(t.finished("publish over"))) == ([(True, "over")] * 2, 1)

        # put on before ours, and taken out with OpenTelemetry's unwrap() while ours is on top: the unwrap
        # does nothing (it takes out wrapt proxies only); taken out after our uninstrument(), it works
        client_class.publish = original
        calls.clear()
        wrapt.wrap_function_wrapper(client_class, "publish", theirs)
        NatsInstrumentor().instrument(tracer_provider=t.tracer_provider, meter_provider=t.meter_provider)
        ours = vars(client_class)["publish"]
        unwrap(client_class, "publish")
        assert vars(client_class)["publish"] is ours
        await client.publish("unwrapped", b"x")
        NatsInstrumentor().uninstrument()
        unwrap(client_class, "publish")
        assert vars(client_class)["publish"] is vars(nats.aio.client.Client)["publish"] is original
        await client.publish("unwrapped", b"x")
        assert (calls, len(t.finished("publish unwrapped"))) == ([(True, "unwrapped")], 1)
    finally:
        client_class.publish = original
        await client.close()


async def test_a_wrapper_under_our_publish_gets_the_apps_arguments_as_given(server: NatsServer) -> None:
    """Put on before instrument(): a wrapt wrapper sees the app's keywords as keywords and its positional
    arguments as positional, with only the headers replaced by the copy carrying the context; a publish
    replaced by one with an extra keyword (put there before instrument()) gets that keyword; a keyword
    nobody takes fails in nats-py's publish, named as such, as it does uninstrumented."""
    client_class = nats.aio.client.Client
    original = vars(client_class)["publish"]
    seen: list[tuple[tuple, dict]] = []

    async def theirs(wrapped, instance, args, kwargs):  # noqa: ANN001, ANN202
        seen.append((args, kwargs))
        return await wrapped(*args, **kwargs)

    async def extended(self, subject, payload=b"", reply="", headers=None, *, priority=0):  # noqa: ANN001, ANN202
        seen.append(((subject, payload), {"priority": priority, "headers": headers}))
        return await original(self, subject, payload, reply, headers)

    t = Telemetry()
    client = await nats.connect(server.url)
    try:
        with pytest.raises(TypeError, match=r"^Client\.publish\(\) got an unexpected keyword argument 'priority'"):
            await client.publish("kw", b"x", priority=1)
        wrapt.wrap_function_wrapper(client_class, "publish", theirs)
        NatsInstrumentor().instrument(tracer_provider=t.tracer_provider, meter_provider=t.meter_provider)
        user = {"k": "v"}
        await client.publish("kw", payload=b"x", headers=user)
        await client.publish("pos", b"x", "", user)
        await client.publish("bare", b"x")
        with pytest.raises(TypeError, match=r"^Client\.publish\(\) got an unexpected keyword argument 'priority'"):
            await client.publish("kw", b"x", priority=1)
        (kw_args, kw_kwargs), (pos_args, pos_kwargs), (bare_args, bare_kwargs) = seen[:3]
        assert (kw_args, sorted(kw_kwargs), kw_kwargs["payload"]) == (("kw",), ["headers", "payload"], b"x")
        assert (pos_args[:3], len(pos_args), pos_kwargs) == (("pos", b"x", ""), 4, {})
        assert (bare_args, sorted(bare_kwargs)) == (("bare", b"x"), ["headers"])
        for headers in (kw_kwargs["headers"], pos_args[3], bare_kwargs["headers"]):
            assert "traceparent" in headers
        assert user == {"k": "v"} and kw_kwargs["headers"]["k"] == pos_args[3]["k"] == "v"
        NatsInstrumentor().uninstrument()

        client_class.publish = extended
        seen.clear()
        NatsInstrumentor().instrument(tracer_provider=t.tracer_provider, meter_provider=t.meter_provider)
        await client.publish("extended", b"x", priority=3)
        NatsInstrumentor().uninstrument()
        ((_, extra),) = seen
        assert extra["priority"] == 3 and "traceparent" in extra["headers"]
        assert len(t.finished("publish extended")) == 1
        assert [s.attributes.get("error.type") for s in t.finished("publish kw")] == [None, "TypeError"]
        assert t.metric_points("sidetrace.instrumentation.errors") == []
    finally:
        client_class.publish = original
        await client.close()


@pytest.mark.parametrize(("args", "kwargs", "raised"), [
    (("mistake.none", None), {}, TypeError), ((42, b"x"), {}, TypeError), ((), {"payload": b"x"}, TypeError),
    (("mistake.header", b"x"), {"headers": {"n": 1}}, AttributeError)],
    ids=["None payload", "int subject", "no subject", "int header value"])
async def test_the_apps_mistaken_publish_reaches_nats_py_untouched_and_is_not_counted_as_ours(
        nc, telemetry: Telemetry, args: tuple, kwargs: dict, raised: type) -> None:
    """nats-py raises what it raises uninstrumented; no sidetrace.instrumentation.errors point."""
    with pytest.raises(raised) as uninstrumented, suppress_instrumentation():
        await nc.publish(*args, **kwargs)
    with pytest.raises(raised) as instrumented:
        await nc.publish(*args, **kwargs)
    assert str(instrumented.value) == str(uninstrumented.value)
    assert telemetry.metric_points("sidetrace.instrumentation.errors") == []


SUBSCRIBER = textwrap.dedent('''
    import asyncio, json, sys
    import nats
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from sidetrace.instrumentors.nats import NatsInstrumentor

    async def main():
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        NatsInstrumentor().instrument(tracer_provider=provider)
        nc = await nats.connect(sys.argv[1])
        done = asyncio.Event()
        async def handler(msg):
            done.set()
        await nc.subscribe("cross.process", cb=handler)
        await nc.flush()
        print("ready", flush=True)
        await asyncio.wait_for(done.wait(), 20)
        await asyncio.sleep(0.05)
        (span,) = exporter.get_finished_spans()
        print(json.dumps({"name": span.name, "trace_id": span.context.trace_id,
                          "parent": span.parent.span_id}), flush=True)
        await nc.close()

    asyncio.run(main())
''')


async def test_publisher_and_subscriber_in_separate_processes_join_one_trace(
    server: NatsServer, nc, telemetry: Telemetry
) -> None:
    child = subprocess.Popen([sys.executable, "-c", SUBSCRIBER, server.url], stdout=subprocess.PIPE, text=True,
                             cwd=ROOT)
    try:
        assert await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 20) == "ready\n"
        await nc.publish("cross.process", b"hello")
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 20)
        remote = json.loads(line)
        publish = telemetry.one("publish cross.process")
        assert remote == {"name": "process cross.process", "trace_id": publish.context.trace_id,
                          "parent": publish.context.span_id}
        assert child.wait(10) == 0
    finally:
        if child.poll() is None:
            child.kill()


async def test_server_without_headers_gets_no_trace_headers_and_the_miss_is_counted(
    nc, telemetry: Telemetry
) -> None:
    got = []
    await nc.subscribe("noheaders", cb=collector(got))
    nc._server_info["headers"] = False  # as an old server or a headers-off config announces itself
    before = nats_instrumentation._TELEMETRY.injection_misses
    await nc.publish("noheaders", b"x")
    await wait_for(lambda: got)
    assert got[0].headers is None
    assert nats_instrumentation._TELEMETRY.injection_misses - before == 1
    assert telemetry.one("publish noheaders").kind == SpanKind.PRODUCER  # the span is still made
