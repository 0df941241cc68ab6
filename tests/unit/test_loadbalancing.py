"""The load-balancing exporter: the ring, the wire-level split, and delivery over real misbehaving backends
(tests/backends.py) from a real spool."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidetrace.config import LoadBalancingExporterSection
from sidetrace.exporters.delivery import DeliveryStats, delivery_families
from sidetrace.exporters.loadbalancing import ROUTE_MAX_ITEMS, HashRing, LoadBalancingExporter, route
from sidetrace.exporters.spool import TRACES, Spool
from tests.backends import Backend, GrpcBackend
from tests.conftest import until

TRACES_SENT = 600
SPANS_PER_TRACE = 5


def test_the_ring_shares_traces_evenly_and_a_fourth_backend_takes_about_a_quarter() -> None:
    three = HashRing(["10.0.0.1:4317", "10.0.0.2:4317", "10.0.0.3:4317"])
    four = HashRing([*three.backends, "10.0.0.4:4317"])
    ids = [os.urandom(16) for _ in range(30_000)]
    shares = Counter(three.owner(trace_id) for trace_id in ids)
    assert max(shares.values()) / min(shares.values()) < 1.2
    moved = [trace_id for trace_id in ids if three.owner(trace_id) != four.owner(trace_id)]
    assert 0.15 < len(moved) / len(ids) < 0.35
    assert {four.owner(trace_id) for trace_id in moved} == {"10.0.0.4:4317"}  # nothing moves between the old three
    assert HashRing(reversed(three.backends)).owner(ids[0]) == three.owner(ids[0])  # order of the list is no matter


_NAMES = st.text(max_size=6)


@st.composite
def requests(draw: st.DrawFn) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    for _ in range(draw(st.integers(0, 3))):
        resource_spans = request.resource_spans.add()
        if draw(st.booleans()):
            kv = resource_spans.resource.attributes.add()
            kv.key, kv.value.string_value = "service.name", draw(_NAMES)
        resource_spans.schema_url = draw(_NAMES)
        for _ in range(draw(st.integers(0, 3))):
            scope_spans = resource_spans.scope_spans.add()
            scope_spans.scope.name = draw(_NAMES)
            for _ in range(draw(st.integers(0, 6))):
                span = scope_spans.spans.add()
                span.trace_id = draw(st.sampled_from([b"\x01" * 16, b"\x02" * 16, b"\x03" * 16, os.urandom(16)]))
                span.span_id, span.name = os.urandom(8), draw(_NAMES)
                if draw(st.booleans()):  # the trace id written after other fields: still found
                    span.name = draw(_NAMES) or "late"
                    encoded = span.SerializeToString()
                    span.Clear()
                    span.MergeFromString(encoded[18:] + encoded[:18])
    return request


def _spans(request: ExportTraceServiceRequest) -> list[tuple[str, str, bytes, bytes]]:
    return sorted((str(r.resource), s.scope.name, span.trace_id, span.span_id)
                  for r in request.resource_spans for s in r.scope_spans for span in s.spans)


# Built once: a ring of three backends is 12,288 hashed and sorted positions, most of each example's time.
SPLIT_RING = HashRing(["a:1", "b:2", "c:3"])


@settings(max_examples=300, deadline=None, derandomize=True)
@given(request=requests(), by_service=st.booleans())
def test_the_split_keeps_every_span_with_its_resource_and_scope_at_its_owner(
        request: ExportTraceServiceRequest, by_service: bool) -> None:
    ring = SPLIT_RING
    parts = route(request.SerializeToString(), ring, by_service)
    received = []
    for owner, (body, count) in parts.items():
        part = ExportTraceServiceRequest.FromString(body)
        assert len(_spans(part)) == count > 0
        for resource_spans in part.resource_spans:
            service = next((kv.value.string_value.encode() for kv in resource_spans.resource.attributes
                            if kv.key == "service.name"), b"")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    assert owner == ring.owner(service if by_service else span.trace_id)
        received += _spans(part)
    assert sorted(received) == _spans(request)


def test_a_request_that_cannot_be_read_is_refused() -> None:
    with pytest.raises(ValueError):
        route(b"\x0a\x05ab", HashRing(["a:1", "b:2"]), False)


# Delivery over real backends -----------------------------------------------------------------------


def trace_request(first_trace: int, traces: int) -> bytes:
    """``traces`` traces of SPANS_PER_TRACE spans; span ids are (trace number, position)."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    kv = resource_spans.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", "shop"
    scope = resource_spans.scope_spans.add()
    for number in range(first_trace, first_trace + traces):
        for position in range(SPANS_PER_TRACE):
            span = scope.spans.add()
            span.trace_id = number.to_bytes(16, "big")
            span.span_id = (number * 100 + position).to_bytes(8, "big")
            span.name, span.start_time_unix_nano, span.end_time_unix_nano = "op", 1, 2
    return request.SerializeToString()


def traces_at(backend: Backend) -> set[int]:
    return {int.from_bytes(span_id, "big") // 100 for span_id in backend.received}


@pytest.fixture
async def backends() -> AsyncIterator[list[GrpcBackend]]:
    started = [await GrpcBackend().start() for _ in range(3)]
    yield started
    for backend in started:
        await backend.stop()


async def opened(path: Path) -> Spool:
    """The spool as the trace pipeline opens it for one load-balancing exporter named lb."""
    spool = Spool(path, max_bytes=1 << 30, sync="normal")
    spool.add_reader_at_open("lb", TRACES, resume_only=True, sub_readers=True)
    await spool.open()
    return spool


def exporter(spool: Spool, backends: list[str], stats: dict[str, DeliveryStats]) -> LoadBalancingExporter:
    section = LoadBalancingExporterSection(name="lb", backends=tuple(backends), compression="none",
                                           batch_timeout_seconds=0)
    return LoadBalancingExporter(section, spool, lambda reader: stats.setdefault(reader, DeliveryStats()))


async def accept(lb: LoadBalancingExporter, body: bytes, spans: int) -> None:
    """What the trace pipeline does with an accepted request."""
    with lb.routing(body, spans) as parts:
        await lb.spool.append_all(parts)


async def queue_traces(lb: LoadBalancingExporter, first: int = 0, requests: int = 60) -> None:
    per_request = TRACES_SENT // 60
    await asyncio.gather(*(accept(lb, trace_request(first + n * per_request, per_request),
                                  per_request * SPANS_PER_TRACE) for n in range(requests)))


def assert_whole_traces_on_one_backend_each(backends: list[Backend], traces: int) -> None:
    owners: dict[int, list[int]] = {}
    for index, backend in enumerate(backends):
        for trace_number in traces_at(backend):
            owners.setdefault(trace_number, []).append(index)
        assert backend.duplicates() == 0
    assert len(owners) == traces and all(len(at) == 1 for at in owners.values())
    spans_per_trace = Counter(int.from_bytes(span_id, "big") // 100 for b in backends for span_id in b.received)
    assert set(spans_per_trace.values()) == {SPANS_PER_TRACE}


async def test_every_trace_reaches_one_backend_whole_and_the_shares_are_even(
        tmp_path: Path, backends: list[GrpcBackend]) -> None:
    spool = await opened(tmp_path / "spool.db")
    stats: dict[str, DeliveryStats] = {}
    lb = exporter(spool, [f"127.0.0.1:{b.port}" for b in backends], stats)
    await lb.start()
    await queue_traces(lb)
    await until(lambda: sum(b.unique() for b in backends) == TRACES_SENT * SPANS_PER_TRACE, 20, "every span")
    await lb.stop()
    assert_whole_traces_on_one_backend_each(backends, TRACES_SENT)
    shares = [len(traces_at(b)) for b in backends]
    assert max(shares) / min(shares) < 1.4  # 600 traces: chance spread on top of the ring's
    sent = {name: s.sent for name, s in stats.items()}
    assert sent == {"lb": 0, **{f"lb/127.0.0.1:{b.port}": len(traces_at(b)) * SPANS_PER_TRACE for b in backends}}
    families = {f.name: f for f in delivery_families(list(stats.items()))}
    assert families["sidetrace_exporter_sent_spans"].samples[0].value == TRACES_SENT * SPANS_PER_TRACE
    per_backend = {s.labels["backend"]: s.value for s in families["sidetrace_exporter_backend_sent_spans"].samples}
    assert per_backend == {f"127.0.0.1:{b.port}": len(traces_at(b)) * SPANS_PER_TRACE for b in backends}
    await spool.close()


async def test_a_backend_down_holds_up_only_its_own_share(tmp_path: Path, backends: list[GrpcBackend]) -> None:
    down = backends[0]
    down.script.status, down.script.fail_until = grpc.StatusCode.UNAVAILABLE, time.monotonic() + 3600
    spool = await opened(tmp_path / "spool.db")
    stats: dict[str, DeliveryStats] = {}
    lb = exporter(spool, [f"127.0.0.1:{b.port}" for b in backends], stats)
    await lb.start()
    await queue_traces(lb)
    owners = {number: lb.ring.owner(number.to_bytes(16, "big")) for number in range(TRACES_SENT)}
    theirs = sum(owner != f"127.0.0.1:{down.port}" for owner in owners.values()) * SPANS_PER_TRACE
    await until(lambda: backends[1].unique() + backends[2].unique() == theirs, 20, "the live backends' shares")
    assert down.unique() == 0 and stats[f"lb/127.0.0.1:{down.port}"].failing
    status = lb.status()  # the exporter's line says when a backend last failed, and how old its share is
    assert status["last_error_at"] == status["backends"][f"127.0.0.1:{down.port}"]["last_error_at"] is not None
    await until(lambda: lb.status()["oldest_unsent_age_seconds"] >= 0.2, 10, "the waiting share's age")
    down.script.fail_until = 0.0  # back: its share waited on disk
    await until(lambda: sum(b.unique() for b in backends) == TRACES_SENT * SPANS_PER_TRACE, 30, "every span")
    await lb.stop()
    assert_whole_traces_on_one_backend_each(backends, TRACES_SENT)
    await spool.close()


async def test_a_backend_that_leaves_hands_its_queued_share_to_the_new_owners(
        tmp_path: Path, backends: list[GrpcBackend]) -> None:
    leaving = backends[2]
    leaving.script.status, leaving.script.fail_until = grpc.StatusCode.UNAVAILABLE, time.monotonic() + 3600
    spool = await opened(tmp_path / "spool.db")
    stats: dict[str, DeliveryStats] = {}
    lb = exporter(spool, [f"127.0.0.1:{b.port}" for b in backends], stats)
    await lb.start()
    await queue_traces(lb)
    stranded = sum(lb.ring.owner(n.to_bytes(16, "big")) == f"127.0.0.1:{leaving.port}" for n in range(TRACES_SENT))
    await until(lambda: backends[0].unique() + backends[1].unique() == (TRACES_SENT - stranded) * SPANS_PER_TRACE,
                20, "the others' shares")
    await lb.set_backends([f"127.0.0.1:{b.port}" for b in backends[:2]])
    await until(lambda: backends[0].unique() + backends[1].unique() == TRACES_SENT * SPANS_PER_TRACE, 20,
                "the leaving backend's share at its new owners")
    await lb.stop()
    assert leaving.unique() == 0
    assert_whole_traces_on_one_backend_each(backends, TRACES_SENT)
    assert f"lb/127.0.0.1:{leaving.port}" not in spool.readers()
    await spool.close()


async def test_a_restart_resumes_each_backends_share_where_it_was(tmp_path: Path, backends: list[GrpcBackend]) -> None:
    down = backends[1]
    down.script.status, down.script.fail_until = grpc.StatusCode.UNAVAILABLE, time.monotonic() + 3600
    spool = await opened(tmp_path / "spool.db")
    stats: dict[str, DeliveryStats] = {}
    endpoints = [f"127.0.0.1:{b.port}" for b in backends]
    lb = exporter(spool, endpoints, stats)
    await lb.start()
    await queue_traces(lb)
    others = [b for b in backends if b is not down]
    mine = sum(lb.ring.owner(n.to_bytes(16, "big")) == f"127.0.0.1:{down.port}" for n in range(TRACES_SENT))
    await until(lambda: sum(b.unique() for b in others) == (TRACES_SENT - mine) * SPANS_PER_TRACE, 20, "others")
    await lb.stop()
    await spool.close()
    down.script.fail_until = 0.0
    spool = await opened(tmp_path / "spool.db")  # the backends' cursors come back with the exporter's
    assert sorted(spool.readers()) == sorted(f"lb/{e}" for e in endpoints)
    lb = exporter(spool, endpoints, stats)
    await lb.start()
    await until(lambda: down.unique() == mine * SPANS_PER_TRACE, 20, "the waiting share")
    await lb.stop()
    assert_whole_traces_on_one_backend_each(backends, TRACES_SENT)  # and nothing delivered before is sent again
    await spool.close()


async def test_a_membership_change_counts_the_traces_it_may_split(tmp_path: Path, backends: list[GrpcBackend]) -> None:
    fourth = await GrpcBackend().start()
    try:
        spool = await opened(tmp_path / "spool.db")
        stats: dict[str, DeliveryStats] = {}
        three = [f"127.0.0.1:{b.port}" for b in backends]
        lb = exporter(spool, three, stats)
        await lb.start()
        await queue_traces(lb)
        await until(lambda: sum(b.unique() for b in backends) == TRACES_SENT * SPANS_PER_TRACE, 20, "every span")
        old, new = HashRing(three), HashRing([*three, f"127.0.0.1:{fourth.port}"])
        moving = {n for n in range(TRACES_SENT) if old.owner(n.to_bytes(16, "big")) != new.owner(n.to_bytes(16, "big"))}
        await lb.set_backends(new.backends)
        assert stats["lb"].moved == len(moving) > 0
        # Later spans of the same traces (a long trace still running at the change) follow the new ring.
        late = ExportTraceServiceRequest.FromString(trace_request(0, TRACES_SENT))
        for span in late.resource_spans[0].scope_spans[0].spans:
            span.span_id = (int.from_bytes(span.span_id, "big") + 50).to_bytes(8, "big")
        await accept(lb, late.SerializeToString(), TRACES_SENT * SPANS_PER_TRACE)
        everyone = [*backends, fourth]
        await until(lambda: sum(b.unique() for b in everyone) == 2 * TRACES_SENT * SPANS_PER_TRACE, 20, "late spans")
        await lb.stop()
        split = {n for n in range(TRACES_SENT) if sum(n in traces_at(b) for b in everyone) > 1}
        assert split == moving  # exactly the traces counted, and no other
        families = {f.name: f for f in lb.families()}
        assert families["sidetrace_exporter_moved_traces"].samples[0].value == len(moving)
        await spool.close()
    finally:
        await fourth.stop()


async def test_a_share_left_while_no_backend_could_take_it_is_delivered_once_backends_come(
        tmp_path: Path, backends: list[GrpcBackend]) -> None:
    down, live, later = backends
    down.script.status, down.script.fail_until = grpc.StatusCode.UNAVAILABLE, time.monotonic() + 3600
    spool = await opened(tmp_path / "spool.db")
    stats: dict[str, DeliveryStats] = {}
    lb = exporter(spool, [f"127.0.0.1:{down.port}", f"127.0.0.1:{live.port}"], stats)
    await lb.start()
    await queue_traces(lb)
    stranded = sum(lb.ring.owner(n.to_bytes(16, "big")) == f"127.0.0.1:{down.port}" for n in range(TRACES_SENT))
    await until(lambda: live.unique() == (TRACES_SENT - stranded) * SPANS_PER_TRACE, 20, "the live share")
    await until(lambda: stats[f"lb/127.0.0.1:{down.port}"].failing, 10, "the down backend failing")
    await lb.set_backends([])  # DNS answering nothing, say: nobody can take the down backend's share yet
    assert lb.status()["state"] == "failing" and stats["lb"].failing
    await until(lambda: lb.status()["oldest_unsent_age_seconds"] >= 0.2, 10, "the stranded share's age in status")
    await lb.set_backends([f"127.0.0.1:{live.port}", f"127.0.0.1:{later.port}"])
    await until(lambda: live.unique() + later.unique() == TRACES_SENT * SPANS_PER_TRACE, 20, "the stranded share")
    await lb.stop()
    assert down.unique() == 0
    assert_whole_traces_on_one_backend_each(backends, TRACES_SENT)
    families = {f.name: f for f in delivery_families(list(stats.items()))}
    assert {s.labels["backend"] for s in families["sidetrace_exporter_backend_failing"].samples} == \
        {f"127.0.0.1:{live.port}", f"127.0.0.1:{later.port}"}  # the one that left has no series any more
    assert [s.value for s in families["sidetrace_exporter_failing"].samples] == [0]
    assert families["sidetrace_exporter_sent_spans"].samples[0].value == TRACES_SENT * SPANS_PER_TRACE
    assert lb.status()["sent"] == TRACES_SENT * SPANS_PER_TRACE
    await spool.close()


async def test_a_request_routed_before_a_change_is_on_disk_before_the_leaving_queue_is_handed_over(
        tmp_path: Path, backends: list[GrpcBackend]) -> None:
    spool = await opened(tmp_path / "spool.db")
    stats: dict[str, DeliveryStats] = {}
    endpoints = [f"127.0.0.1:{b.port}" for b in backends]
    lb = exporter(spool, endpoints, stats)
    await lb.start()
    body = trace_request(0, TRACES_SENT)
    with lb.routing(body, TRACES_SENT * SPANS_PER_TRACE) as parts:  # split on the ring of three
        leaving = endpoints[2]
        assert f"lb/{leaving}" in {queue for queue, _, _ in parts}
        change = asyncio.create_task(lb.set_backends(endpoints[:2]))
        await asyncio.sleep(0.2)
        assert not change.done()  # the leaving queue is not read before this request's part is on it
        await spool.append_all(parts)
    await asyncio.wait_for(change, 10)
    await until(lambda: backends[0].unique() + backends[1].unique() == TRACES_SENT * SPANS_PER_TRACE, 20,
                "every span, the leaving backend's share at its new owners")
    await lb.stop()
    assert backends[2].unique() == 0
    assert_whole_traces_on_one_backend_each(backends, TRACES_SENT)  # none lost, none twice
    assert f"lb/{leaving}" not in spool.readers()
    await spool.close()


async def test_requests_accepted_while_no_backend_is_known_wait_on_disk_and_are_delivered_once_one_is(
        tmp_path: Path, backends: list[GrpcBackend]) -> None:
    spool = await opened(tmp_path / "spool.db")
    stats: dict[str, DeliveryStats] = {}
    lb = exporter(spool, [], stats)
    await lb.start()
    await queue_traces(lb)
    assert "lb/unrouted" in spool.readers() and lb.status()["state"] == "failing"
    await lb.stop()
    await spool.close()
    spool = await opened(tmp_path / "spool.db")  # they wait across a restart, too
    lb = exporter(spool, [f"127.0.0.1:{b.port}" for b in backends], stats)
    await lb.start()
    await until(lambda: sum(b.unique() for b in backends) == TRACES_SENT * SPANS_PER_TRACE, 20, "every span")
    await lb.stop()
    assert_whole_traces_on_one_backend_each(backends, TRACES_SENT)
    assert "lb/unrouted" not in spool.readers()
    await spool.close()


async def test_a_spool_written_before_routing_at_accept_time_is_drained_from_the_trace_queue(
        tmp_path: Path, backends: list[GrpcBackend]) -> None:
    # The previous version: the pipeline wrote every request to the trace queue, read by a router named lb
    # and by any otlp exporter (here "jaeger", whose cursor stays behind).
    old = Spool(tmp_path / "spool.db", max_bytes=1 << 30, sync="normal")
    old.add_reader_at_open("lb")
    old.add_reader_at_open("jaeger")
    await old.open()
    per_request = TRACES_SENT // 60
    for n in range(60):
        await old.append(trace_request(n * per_request, per_request), per_request * SPANS_PER_TRACE, TRACES)
    await old.close()
    spool = Spool(tmp_path / "spool.db", max_bytes=1 << 30, sync="normal")
    spool.add_reader_at_open("lb", TRACES, resume_only=True, sub_readers=True)
    spool.add_reader_at_open("jaeger")
    await spool.open()
    stats: dict[str, DeliveryStats] = {}
    lb = exporter(spool, [f"127.0.0.1:{b.port}" for b in backends], stats)
    await lb.start()
    assert "lb" in spool.readers()  # routed in the background: the start did not wait for the backlog
    await until(lambda: "lb" not in spool.readers(), 20, "the backlog routed")  # its backends' cursors stay
    await until(lambda: sum(b.unique() for b in backends) == TRACES_SENT * SPANS_PER_TRACE, 20, "every span")
    await lb.stop()
    assert_whole_traces_on_one_backend_each(backends, TRACES_SENT)
    assert len(await spool.read("jaeger", 1 << 20, 1 << 30)) == 60  # the other exporter's backlog is untouched
    await spool.close()
    spool = await opened(tmp_path / "spool.db")  # the next start: no cursor to resume, nothing routed twice
    assert "lb" not in spool.readers()
    lb = exporter(spool, [f"127.0.0.1:{b.port}" for b in backends], stats)
    await lb.start()
    await lb.stop()
    assert sum(b.unique() for b in backends) == TRACES_SENT * SPANS_PER_TRACE
    await spool.close()


async def test_a_stop_while_the_old_backlog_is_routed_loses_nothing_and_routes_nothing_twice(
        tmp_path: Path, backends: list[GrpcBackend]) -> None:
    # A backlog of several routing steps (16,384 spans each), with new requests accepted meanwhile.
    traces = 200 * (3 * ROUTE_MAX_ITEMS // SPANS_PER_TRACE // 200 + 1)
    old = Spool(tmp_path / "spool.db", max_bytes=1 << 30, sync="normal")
    old.add_reader_at_open("lb")
    await old.open()
    for first in range(0, traces, 200):
        await old.append(trace_request(first, 200), 200 * SPANS_PER_TRACE, TRACES)
    await old.close()
    stats: dict[str, DeliveryStats] = {}
    addresses = [f"127.0.0.1:{b.port}" for b in backends]
    restarts = 0
    drained = False
    while not drained:
        assert restarts < 10
        spool = await opened(tmp_path / "spool.db")
        lb = exporter(spool, addresses, stats)
        before = sum(b.unique() for b in backends)
        await lb.start()
        await accept(lb, trace_request(traces + restarts * 10, 10), 10 * SPANS_PER_TRACE)
        await until(lambda: sum(b.unique() for b in backends) > before + 10 * SPANS_PER_TRACE, 20,  # noqa: B023
                    "some of the backlog delivered")
        await lb.stop()  # in the middle of the backlog, or after it
        drained = "lb" not in spool.readers()
        await spool.close()
        restarts += 1
    spool = await opened(tmp_path / "spool.db")
    lb = exporter(spool, addresses, stats)
    await lb.start()
    total = traces + restarts * 10
    await until(lambda: sum(b.unique() for b in backends) == total * SPANS_PER_TRACE, 30, "every span")
    await lb.stop()
    await spool.close()
    assert_whole_traces_on_one_backend_each(backends, total)  # each span exactly once
    assert sum(stats[r].resent for r in stats) == 0


async def test_an_exporter_rebuilt_by_a_reload_takes_over_the_ring_queues_and_requests_in_flight(
        tmp_path: Path, backends: list[GrpcBackend]) -> None:
    leaving = backends[2]
    leaving.script.status, leaving.script.fail_until = grpc.StatusCode.UNAVAILABLE, time.monotonic() + 3600
    spool = await opened(tmp_path / "spool.db")
    stats: dict[str, DeliveryStats] = {}
    endpoints = [f"127.0.0.1:{b.port}" for b in backends]
    old = exporter(spool, endpoints, stats)
    await old.start()
    await queue_traces(old, requests=30)  # the first half
    await old.stop()  # as the pipeline does: the old one stops, and routes requests until the new one runs
    new = exporter(spool, endpoints[:2], stats)
    new.adopt(old)
    half = TRACES_SENT // 2
    with old.routing(trace_request(half, half), half * SPANS_PER_TRACE) as parts:
        starting = asyncio.create_task(new.start())
        await asyncio.sleep(0.2)
        assert not starting.done()  # the leaving backend's queue is read again only once this part is on it
        await spool.append_all(parts)
    await asyncio.wait_for(starting, 10)
    await until(lambda: backends[0].unique() + backends[1].unique() == TRACES_SENT * SPANS_PER_TRACE, 20,
                "every span at the two backends left")
    await new.stop()
    assert leaving.unique() == 0
    assert_whole_traces_on_one_backend_each(backends, TRACES_SENT)
    assert sorted(spool.readers()) == sorted(f"lb/{e}" for e in endpoints[:2])
    await spool.close()
