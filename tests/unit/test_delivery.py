"""The shared delivery loop with the OTLP senders, against real misbehaving backends (tests/backends.py)
and a real spool: every failure a backend can answer, and what it costs the queued data."""

from __future__ import annotations

import asyncio
import email.utils
import http.server
import logging
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidetrace.config import OtlpExporterSection
from sidetrace.exporters.delivery import MAX_UNREACHABLE_BACKOFF, Delivery, DeliveryStats, Policy, Verdict
from sidetrace.exporters.otlp import GrpcSender, HttpSender, OtlpExporter, TracesPayload, retry_after_seconds
from sidetrace.exporters.spool import TRACES, Spool
from tests.backends import Backend, GrpcBackend, HttpBackend
from tests.conftest import free_port, port_open, stop_process, until

ROOT = Path(__file__).resolve().parents[2]
BATCHES = 300
SPANS = 10
FAST = Policy(max_items=8192, max_request_bytes=4 * 1024 * 1024, initial_backoff=0.01, max_backoff=0.05,
              max_fault_backoff=0.05)


def request(first_id: int, spans: int, name: str = "op", attribute_bytes: int = 0) -> bytes:
    message = ExportTraceServiceRequest()
    scope = message.resource_spans.add().scope_spans.add()
    for n in range(spans):
        span = scope.spans.add()
        span.trace_id, span.span_id, span.name = b"t" * 16, (first_id + n).to_bytes(8, "big"), name
        span.start_time_unix_nano, span.end_time_unix_nano = 1, 2
        if attribute_bytes:
            kv = span.attributes.add()
            kv.key, kv.value.string_value = "payload", "x" * attribute_bytes
    return message.SerializeToString()


async def queued(tmp_path: Path, bodies: list[tuple[bytes, int]]) -> Spool:
    spool = Spool(tmp_path / "spool.db", max_bytes=1 << 30, sync="normal")
    spool.add_reader_at_open("b")
    await spool.open()
    await asyncio.gather(*(spool.append(body, spans) for body, spans in bodies))
    return spool


def standard_batches(poisoned: int | None = None) -> list[tuple[bytes, int]]:
    return [(request(i * SPANS + 1, SPANS, "POISON" if i == poisoned else "op"), SPANS) for i in range(BATCHES)]


def delivery(backend: Backend, spool: Spool, protocol: str, policy: Policy = FAST, **section: object) -> Delivery:
    scheme = section.pop("scheme", "http")
    exporter = OtlpExporterSection(name="b", endpoint=f"{scheme}://127.0.0.1:{backend.port}", protocol=protocol,
                                   compression="none", batch_timeout_seconds=0, **section)
    sender = (GrpcSender if protocol == "grpc" else HttpSender)(exporter, {})
    return Delivery("b", spool, TRACES, sender, TracesPayload(), policy, DeliveryStats())


async def drained(spool: Spool, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while await spool.read("b", 1, 1):
        if time.monotonic() > deadline:
            raise AssertionError("the spool was not drained")
        await asyncio.sleep(0.02)


@pytest.fixture
async def backends() -> AsyncIterator[Callable[..., object]]:
    started: list[Backend] = []

    async def make(protocol: str, **kwargs: object) -> Backend:
        backend = await (GrpcBackend if protocol == "grpc" else HttpBackend)(**kwargs).start()
        started.append(backend)
        return backend

    yield make
    for backend in started:
        await backend.stop()


def set_aside(spool: Spool) -> int:
    return sum(spool.set_aside_counts.values())


# Requests of at most 10 batches: the 300 queued batches go out in 30 requests, so a failure lands mid-queue.
TABLE = Policy(max_items=10 * SPANS, max_request_bytes=4 * 1024 * 1024, initial_backoff=0.01, max_backoff=0.05,
               max_fault_backoff=0.05)
RETRYABLE = [("http", s) for s in (429, 502, 503, 504)] + [
    ("grpc", c) for c in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                          grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DATA_LOSS)]
FAULTS = [("http", s) for s in (401, 403, 404, 405, 415, 500)] + [
    ("grpc", c) for c in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED,
                          grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)]
TOO_LARGE = [("http", 413), ("grpc", grpc.StatusCode.RESOURCE_EXHAUSTED)]  # no RetryInfo: split, not retried


def reason_of(protocol: str, status: object) -> str:
    if status is grpc.StatusCode.DEADLINE_EXCEEDED:
        return "timeout"  # as an HTTP request without an answer in time is: one series for an alert
    return f"http_{status}" if protocol == "http" else f"grpc_{status.name.lower()}"


@pytest.mark.parametrize(("protocol", "status"), RETRYABLE + FAULTS + TOO_LARGE, ids=str)
async def test_a_backend_or_config_fault_never_costs_a_span(tmp_path: Path, backends: Callable, protocol: str,
                                                            status: object) -> None:
    backend = await backends(protocol)
    backend.script.status, backend.script.fail_after, backend.script.fail_requests = status, 5, 3
    spool = await queued(tmp_path, standard_batches())
    loop = delivery(backend, spool, protocol, TABLE)
    await loop.start()
    await drained(spool)
    await loop.stop()
    assert backend.unique() == BATCHES * SPANS and backend.duplicates() == 0
    assert set_aside(spool) == 0
    assert loop.stats.sent == BATCHES * SPANS
    assert loop.stats.failures == {reason_of(protocol, status): 3}
    # A batch called too large is split at once; every other refusal waits and sends the same again.
    assert loop.stats.retries == (0 if (protocol, status) in TOO_LARGE else 3)
    await spool.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
async def test_resource_exhausted_or_429_with_a_retry_delay_waits_it_and_keeps_every_span(
        tmp_path: Path, backends: Callable, protocol: str) -> None:
    backend = await backends(protocol)
    backend.script.status = 429 if protocol == "http" else grpc.StatusCode.RESOURCE_EXHAUSTED
    backend.script.fail_after, backend.script.fail_requests, backend.script.retry_delay = 5, 2, 0.3
    spool = await queued(tmp_path, standard_batches())
    loop = delivery(backend, spool, protocol, TABLE)
    await loop.start()
    await drained(spool)
    await loop.stop()
    assert backend.unique() == BATCHES * SPANS and set_aside(spool) == 0
    assert loop.stats.failures == {reason_of(protocol, backend.script.status): 2} and loop.stats.retries == 2
    waits = [later - earlier for earlier, later in zip(backend.times[5:7], backend.times[6:8], strict=True)]
    assert min(waits) >= 0.3
    await spool.close()


@pytest.mark.parametrize(("protocol", "status"), [("http", 400), ("grpc", grpc.StatusCode.INVALID_ARGUMENT)], ids=str)
async def test_only_the_batch_the_backend_calls_invalid_is_set_aside(tmp_path: Path, backends: Callable,
                                                                     protocol: str, status: object) -> None:
    backend = await backends(protocol)
    backend.script.poison, backend.script.poison_status = "POISON", status
    spool = await queued(tmp_path, standard_batches(poisoned=137))
    loop = delivery(backend, spool, protocol, TABLE)
    await loop.start()
    await drained(spool)
    await loop.stop()
    assert backend.unique() == (BATCHES - 1) * SPANS
    assert spool.set_aside_counts == {("b", "rejected"): SPANS}
    assert loop.stats.sent == (BATCHES - 1) * SPANS
    received = {int.from_bytes(span_id, "big") for span_id in backend.received}
    assert received == set(range(1, BATCHES * SPANS + 1)) - set(range(137 * SPANS + 1, 138 * SPANS + 1))
    await spool.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
async def test_a_backend_answering_404_for_a_while_keeps_every_batch(tmp_path: Path, backends: Callable,
                                                                     protocol: str) -> None:
    backend = await backends(protocol)
    backend.script.status = 404 if protocol == "http" else grpc.StatusCode.UNIMPLEMENTED
    backend.script.fail_until = time.monotonic() + 1.5
    spool = await queued(tmp_path, standard_batches())
    loop = delivery(backend, spool, protocol)
    await loop.start()
    await until(lambda: loop.stats.failing, 5, "the first failure")
    status = loop.status()
    assert status["state"] == "failing" and status["last_error"].startswith(("http_404: HTTP 404",
                                                                             "grpc_unimplemented: gRPC UNIMPLEMENTED"))
    await drained(spool)
    await loop.stop()
    assert backend.unique() == BATCHES * SPANS and set_aside(spool) == 0
    assert loop.status()["state"] == "stopped" and not loop.stats.failing
    await spool.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
async def test_a_batch_larger_than_the_backend_takes_is_delivered_in_parts(tmp_path: Path, backends: Callable,
                                                                           protocol: str) -> None:
    backend = await backends(protocol, max_request_bytes=100_000)
    big = request(1, 3000, attribute_bytes=50)  # about 250 KB
    small = [(request(10_000 + i * SPANS, SPANS), SPANS) for i in range(10)]
    spool = await queued(tmp_path, [(big, 3000), *small])
    loop = delivery(backend, spool, protocol)
    await loop.start()
    await drained(spool)
    await loop.stop()
    assert backend.unique() == 3000 + 10 * SPANS and backend.duplicates() == 0
    assert set_aside(spool) == 0 and max(backend.sizes) <= 100_000
    await spool.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
async def test_a_single_span_too_large_for_the_backend_is_set_aside_alone(tmp_path: Path, backends: Callable,
                                                                          protocol: str) -> None:
    backend = await backends(protocol, max_request_bytes=100_000)
    spans = ExportTraceServiceRequest.FromString(request(1, 4))
    huge = spans.resource_spans[0].scope_spans[0].spans.add()
    huge.trace_id, huge.span_id, huge.name = b"t" * 16, (99).to_bytes(8, "big"), "huge"
    kv = huge.attributes.add()
    kv.key, kv.value.string_value = "payload", "x" * 150_000
    spool = await queued(tmp_path, [(spans.SerializeToString(), 5), (request(100, 3), 3)])
    loop = delivery(backend, spool, protocol)
    await loop.start()
    await drained(spool)
    await loop.stop()
    assert backend.unique() == 7 and (99).to_bytes(8, "big") not in backend.received
    assert spool.set_aside_counts == {("b", "too_large"): 1}
    await spool.close()


async def test_a_batch_above_max_request_bytes_is_split_before_sending(tmp_path: Path, backends: Callable) -> None:
    backend = await backends("grpc")
    spool = await queued(tmp_path, [(request(1, 2000, attribute_bytes=50), 2000)])
    loop = delivery(backend, spool, "grpc", Policy(max_items=8192, max_request_bytes=50_000, initial_backoff=0.01))
    await loop.start()
    await drained(spool)
    await loop.stop()
    assert backend.unique() == 2000 and max(backend.sizes) <= 50_000
    assert loop.stats.failures == {}  # never refused: split before it was sent
    await spool.close()


async def test_requests_past_8_mib_go_out_when_the_backend_takes_them(tmp_path: Path, backends: Callable) -> None:
    backend = await backends("grpc")
    spool = await queued(tmp_path, [(request(1, 9000, attribute_bytes=1000), 9000)])  # about 9.2 MB
    loop = delivery(backend, spool, "grpc", Policy(max_items=10_000, max_request_bytes=16 << 20))
    await loop.start()
    await drained(spool)
    await loop.stop()
    assert backend.unique() == 9000 and backend.requests == 1 and loop.stats.failures == {}
    await spool.close()


async def test_a_body_that_cannot_be_decoded_is_set_aside(tmp_path: Path, backends: Callable) -> None:
    backend = await backends("http", max_request_bytes=1000)
    spool = await queued(tmp_path, [(b"\xff" * 5000, 5), (request(1, 2), 2)])
    loop = delivery(backend, spool, "http")
    await loop.start()
    await drained(spool)
    await loop.stop()
    assert backend.unique() == 2 and spool.set_aside_counts == {("b", "undecodable"): 5}
    await spool.close()


async def test_an_undecodable_body_above_max_request_bytes_is_set_aside_without_sending(
        tmp_path: Path, backends: Callable) -> None:
    backend = await backends("grpc")
    spool = await queued(tmp_path, [(b"\xff" * 60_000, 5), (request(1, 2), 2)])
    loop = delivery(backend, spool, "grpc", Policy(max_items=8192, max_request_bytes=50_000, initial_backoff=0.01))
    await loop.start()
    await drained(spool)
    await loop.stop()
    assert backend.unique() == 2 and backend.requests == 1
    assert spool.set_aside_counts == {("b", "undecodable"): 5}
    await spool.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
async def test_a_zero_retry_delay_never_spins(tmp_path: Path, backends: Callable, protocol: str) -> None:
    backend = await backends(protocol)
    backend.script.status = 503 if protocol == "http" else grpc.StatusCode.RESOURCE_EXHAUSTED
    backend.script.retry_delay = 0.0
    backend.script.fail_until = time.monotonic() + 1.0
    spool = await queued(tmp_path, [(request(1, 3), 3)])
    loop = delivery(backend, spool, protocol)
    await loop.start()
    await drained(spool)
    await loop.stop()
    assert backend.unique() == 3 and set_aside(spool) == 0
    assert backend.requests <= 1.0 / 0.2 + 2  # the delay floor is 0.2 s
    await spool.close()


async def test_retry_after_is_honoured_then_delivered(tmp_path: Path, backends: Callable) -> None:
    backend = await backends("http")
    backend.script.status, backend.script.fail_requests, backend.script.retry_delay = 503, 1, 1.0
    spool = await queued(tmp_path, [(request(1, 1), 1), (request(2, 1), 1)])
    loop = delivery(backend, spool, "http")
    await loop.start()
    await drained(spool)
    await loop.stop()
    assert backend.requests == 2 and backend.unique() == 2  # both batches joined in one request
    assert backend.times[1] - backend.times[0] >= 0.95
    assert (loop.stats.retries, loop.stats.sent, loop.stats.failed) == (1, 2, 2)
    await spool.close()


async def test_a_partial_success_is_counted_and_its_message_logged_once(
        tmp_path: Path, backends: Callable, caplog: pytest.LogCaptureFixture) -> None:
    backend = await backends("grpc")
    backend.script.partial_rejected, backend.script.partial_message = 2, "span names too long"
    spool = await queued(tmp_path, [])
    loop = delivery(backend, spool, "grpc", Policy(max_items=SPANS, max_request_bytes=1 << 20))
    await loop.start()
    with caplog.at_level(logging.WARNING, logger="sidetrace.exporter"):
        for i in range(4):
            await spool.append(request(i * SPANS + 1, SPANS), SPANS)
            await until(lambda i=i: backend.requests == i + 1, 10, "the request")
        await drained(spool)
    await loop.stop()
    assert loop.stats.rejected == 8 and loop.stats.sent == 4 * SPANS - 8
    assert sum("span names too long" in record.getMessage() for record in caplog.records) == 1
    await spool.close()


async def test_connection_refused_keeps_the_data_until_the_backend_comes(tmp_path: Path) -> None:
    backend = HttpBackend()
    spool = await queued(tmp_path, standard_batches()[:5])
    loop = delivery(backend, spool, "http")
    await loop.start()
    await until(lambda: loop.stats.failures.get("connection_refused", 0) >= 2, 10, "refused connections")
    await backend.start()
    try:
        await drained(spool)
    finally:
        await loop.stop()
        await backend.stop()
    assert backend.unique() == 5 * SPANS and set_aside(spool) == 0
    await spool.close()


def test_a_refused_connection_is_retried_at_most_a_few_seconds_apart_with_jitter() -> None:
    policy = Policy(max_items=8192, max_request_bytes=1 << 20)  # the defaults every exporter runs with
    refused = [policy.backoff(attempt, fault, unreachable=True) for attempt in range(40) for fault in (False, True)]
    assert MAX_UNREACHABLE_BACKOFF == 3.0 and max(refused) <= 3.0
    assert min(refused[-20:]) >= 1.5 and len(set(refused[-20:])) > 1  # jittered: agents do not come back in step
    assert max(policy.backoff(attempt, fault=True) for attempt in range(40)) > 60  # other faults back off further
    assert max(policy.backoff(attempt, fault=False) for attempt in range(40)) > 15


async def test_a_stop_lets_the_request_in_flight_be_answered_so_a_restart_sends_nothing_twice(tmp_path: Path) -> None:
    backend = await GrpcBackend().start()
    backend.script.answer_delay = 0.5
    spool = await queued(tmp_path, standard_batches()[:5])
    loop = delivery(backend, spool, "grpc")
    await loop.start()
    await until(lambda: backend.requests >= 1, 10, "a request in flight")
    await loop.stop()  # a reload restarting the exporter, say
    assert "b" not in spool.interrupted
    again = delivery(backend, spool, "grpc")
    await again.start()
    await drained(spool)
    await again.stop()
    await backend.stop()
    assert backend.unique() == 5 * SPANS and backend.duplicates() == 0 and backend.requests == 1
    await spool.close()


async def test_a_tls_failure_keeps_the_data(tmp_path: Path, backends: Callable) -> None:
    backend = await backends("http")  # plain HTTP, but the exporter speaks TLS to it
    spool = await queued(tmp_path, standard_batches()[:5])
    loop = delivery(backend, spool, "http", scheme="https")
    await loop.start()
    await until(lambda: loop.stats.failures.get("tls", 0) >= 2, 10, "TLS failures")
    await loop.stop()
    assert set_aside(spool) == 0 and len(await spool.read("b", 10_000, 1 << 30)) == 5
    await spool.close()


def test_retry_after_seconds_and_dates() -> None:
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("100000") == 300.0  # capped
    in_two = email.utils.formatdate(time.time() + 2, usegmt=True)
    assert 0.5 < retry_after_seconds(in_two) <= 2.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    policy = Policy(max_items=1, max_request_bytes=1)
    assert 0.25 <= policy.backoff(0, fault=False) <= 0.5
    assert 2.0 <= policy.backoff(3, fault=False) <= 4.0
    assert all(15.0 <= policy.backoff(40, fault=False) <= 30.0 for _ in range(20))
    assert all(60.0 <= policy.backoff(40, fault=True) <= 120.0 for _ in range(20))


async def test_a_partial_request_waits_batch_timeout_for_more(tmp_path: Path, backends: Callable) -> None:
    backend = await backends("http")
    spool = await queued(tmp_path, [])
    exporter = OtlpExporter(OtlpExporterSection(name="b", endpoint=f"http://127.0.0.1:{backend.port}",
                                                protocol="http", compression="none", batch_timeout_seconds=0.5),
                            spool, lambda reader: DeliveryStats())
    await exporter.start()
    await spool.append(request(1, 1), 1)
    await asyncio.sleep(0.2)
    await spool.append(request(2, 1), 1)
    await drained(spool)
    await exporter.stop()
    assert backend.requests == 1 and backend.unique() == 2  # one request, not two
    await spool.close()


async def test_a_stop_while_waiting_to_retry_counts_nothing_as_resent(tmp_path: Path, backends: Callable) -> None:
    backend = await backends("grpc")
    backend.script.status, backend.script.fail_until = grpc.StatusCode.UNAVAILABLE, time.monotonic() + 3600
    spool = await queued(tmp_path, [(request(1, 9), 9)])
    loop = delivery(backend, spool, "grpc", Policy(max_items=100, max_request_bytes=1 << 20, initial_backoff=30))
    await loop.start()
    await until(lambda: backend.requests >= 1, 10, "the first, refused, attempt")
    await loop.stop()  # in its backoff wait: nothing is in flight, nothing can have reached the backend
    await spool.close()
    again = Spool(tmp_path / "spool.db", max_bytes=1 << 20)
    again.add_reader_at_open("b")
    await again.open()
    assert again.possibly_resent("b", await again.read("b", 100, 1 << 20)) == 0
    await again.close()


async def test_stop_in_the_middle_of_a_send_counts_it_as_possibly_resent(tmp_path: Path) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await request.read()
        arrived.set()
        await release.wait()
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/traces", hang)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        spool = await queued(tmp_path, [(request(1, 9), 9)])
        exporter = OtlpExporter(OtlpExporterSection(name="b", endpoint=f"http://127.0.0.1:{port}", protocol="http",
                                                    compression="none"), spool, lambda reader: DeliveryStats())
        await exporter.start()
        await asyncio.wait_for(arrived.wait(), 10)
        await exporter.stop()
        await spool.close()
        again = Spool(tmp_path / "spool.db", max_bytes=1 << 20)
        again.add_reader_at_open("b")
        await again.open()
        batches = await again.read("b", 100, 1000)
        assert again.possibly_resent("b", batches) == 9
        await again.close()
    finally:
        release.set()
        await runner.cleanup()


def test_grpc_retry_delay_comes_from_the_rich_status_retry_info() -> None:
    from google.protobuf import any_pb2
    from google.rpc import error_details_pb2, status_pb2

    from sidetrace.exporters.delivery import MAX_RETRY_AFTER
    from sidetrace.exporters.otlp import _grpc_retry_delay

    class Failure:  # the part of grpc.aio.AioRpcError the exporter reads
        def __init__(self, *details: object) -> None:
            packed = []
            for detail in details:
                any_detail = any_pb2.Any()
                any_detail.Pack(detail)
                packed.append(any_detail)
            status = status_pb2.Status(code=14, details=packed)
            self.trailers = (("grpc-status-details-bin", status.SerializeToString()),)

        def trailing_metadata(self) -> tuple:
            return self.trailers

    info = error_details_pb2.ErrorInfo(reason="BUSY")
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromMilliseconds(2500)
    assert _grpc_retry_delay(Failure(info, retry)) == 2.5
    far = error_details_pb2.RetryInfo()
    far.retry_delay.FromSeconds(10**6)
    assert _grpc_retry_delay(Failure(far)) == MAX_RETRY_AFTER
    assert _grpc_retry_delay(Failure(info)) is None


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_a_backend_answering_past_the_deadline_is_counted_as_timeout_and_the_resend_as_resent(
        tmp_path: Path, backends: Callable, protocol: str) -> None:
    # The backend takes the request (its spans arrive) but answers after timeout_seconds, as a collector frozen
    # for a moment does: the retry duplicates them, and the duplicates are counted.
    backend = await backends(protocol)
    backend.script.answer_delay = 1.0
    spool = await queued(tmp_path, standard_batches()[:3])
    loop = delivery(backend, spool, protocol, timeout_seconds=0.3)
    await loop.start()
    await until(lambda: loop.stats.failures.get("timeout", 0) >= 1, 10, "a deadline exceeded")
    backend.script.answer_delay = 0
    await drained(spool)
    await loop.stop()
    assert backend.unique() == 3 * SPANS and backend.duplicates() > 0
    assert loop.stats.resent == backend.duplicates()
    assert set(loop.stats.failures) == {"timeout"}
    await spool.close()


async def test_a_stop_cut_short_counts_the_batches_in_flight_as_resent_by_the_next_reader_of_this_run(
        tmp_path: Path, backends: Callable) -> None:
    backend = await backends("grpc")
    backend.script.answer_delay = 30  # frozen: the stop's 2 s grace runs out
    spool = await queued(tmp_path, standard_batches()[:3])
    loop = delivery(backend, spool, "grpc")
    await loop.start()
    await until(lambda: backend.requests >= 1, 10, "a request in flight")
    await loop.stop()
    backend.script.answer_delay = 0
    again = delivery(backend, spool, "grpc")  # a reload restarting the exporter, say
    await again.start()
    await until(lambda: backend.requests >= 2, 10, "the batches sent again")
    await drained(spool)
    await again.stop()
    assert backend.duplicates() == 3 * SPANS and again.stats.resent == 3 * SPANS
    assert "b" not in spool.interrupted  # counted once: the next run does not count them again
    await spool.close()


class _StdlibOtlpHandler(http.server.BaseHTTPRequestHandler):
    """OTLP/HTTP served by the standard library's HTTP/1.1 server, which keeps connections alive and closes one
    idle for ``timeout`` seconds; a request above the server's ``close_above`` bytes is cut: the connection is
    closed without reading its body, as a server enforcing a size limit by closing does."""

    protocol_version = "HTTP/1.1"
    timeout = 0.2

    def do_POST(self) -> None:  # noqa: N802 - the http.server method name
        server: _StdlibOtlpServer = self.server  # type: ignore[assignment]
        length = int(self.headers["Content-Length"])
        if length > server.close_above:
            server.cut += 1
            self.close_connection = True
            return
        server.bodies.append(self.rfile.read(length))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class _StdlibOtlpServer(http.server.ThreadingHTTPServer):
    def __init__(self, close_above: int = 1 << 40) -> None:
        super().__init__(("127.0.0.1", 0), _StdlibOtlpHandler)
        self.close_above = close_above
        self.cut = 0
        self.bodies: list[bytes] = []
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def spans(self) -> list[bytes]:
        return [span.span_id for body in self.bodies for r in ExportTraceServiceRequest.FromString(body).resource_spans
                for s in r.scope_spans for span in s.spans]


async def test_a_keep_alive_connection_the_backend_closed_while_the_loop_was_busy_is_not_written_to() -> None:
    server = _StdlibOtlpServer()
    sender = HttpSender(OtlpExporterSection(name="b", endpoint=f"http://127.0.0.1:{server.port}", protocol="http",
                                            compression="none"), {})
    try:
        assert (await sender.send(request(1, SPANS))).verdict is Verdict.DELIVERED
        time.sleep(0.6)  # the agent's loop busy elsewhere: the server closes the idle connection meanwhile
        answer = await sender.send(request(SPANS + 1, SPANS))
        assert (answer.verdict, answer.reason) == (Verdict.DELIVERED, "")  # on a new connection, not a failure
        assert len(server.spans()) == 2 * SPANS
    finally:
        await sender.close()
        server.shutdown()
        server.server_close()


async def test_a_request_cut_off_while_being_written_is_sent_again_without_counting_it_as_resent(
        tmp_path: Path) -> None:
    big = request(1, 4, attribute_bytes=8 * 1024 * 1024)  # 32 MiB: more than the socket buffers take
    server = _StdlibOtlpServer(close_above=len(big) - 1)
    spool = await queued(tmp_path, [(big, 4)])
    loop = Delivery("b", spool, TRACES, HttpSender(OtlpExporterSection(
        name="b", endpoint=f"http://127.0.0.1:{server.port}", protocol="http", compression="none",
        max_request_bytes=64 * 1024 * 1024), {}), TracesPayload(), Policy(
        max_items=8192, max_request_bytes=64 * 1024 * 1024, initial_backoff=0.01, max_backoff=0.05), DeliveryStats())
    try:
        await loop.start()
        await until(lambda: server.cut == 1, 10, "the request cut off")
        server.close_above = 1 << 40
        await drained(spool)
    finally:
        await loop.stop()
        server.shutdown()
        server.server_close()
    assert loop.stats.failures == {"connection_lost": 1}
    assert len(server.spans()) == 4 and loop.stats.resent == 0
    await spool.close()


async def test_a_grpc_collector_that_crashes_after_taking_the_request_counts_the_retry_as_resent(
        tmp_path: Path) -> None:
    port, taken = free_port(), tmp_path / "taken"

    def collector(mode: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "tests.integration.apps.crashing_collector", str(port),
                                 str(taken), mode], cwd=ROOT)

    crashing = collector("crash")
    serving = None
    await until(lambda: port_open(port), 20, "the collector listening")
    spool = await queued(tmp_path, standard_batches()[:3])
    exporter = OtlpExporterSection(name="b", endpoint=f"http://127.0.0.1:{port}", protocol="grpc",
                                   compression="none", batch_timeout_seconds=0)
    loop = Delivery("b", spool, TRACES, GrpcSender(exporter, {}), TracesPayload(), FAST, DeliveryStats())
    try:
        await loop.start()
        await until(lambda: crashing.poll() is not None, 20, "the collector crashed with the request taken")
        await until(lambda: loop.stats.failures, 20, "the failed attempt")
        serving = collector("serve")
        await drained(spool)
    finally:
        await loop.stop()
        for process in (crashing, serving):
            if process is not None:
                stop_process(process)
    ids = taken.read_text().split()
    assert len(set(ids)) == 3 * SPANS and len(ids) == 6 * SPANS  # taken by both lives of the collector
    assert loop.stats.failures["connection_lost"] == 1
    assert loop.stats.resent == len(ids) - len(set(ids))
    await spool.close()
