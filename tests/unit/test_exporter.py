from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from sidetrace.config import OtlpExporterSection
from sidetrace.exporters.otlp import OtlpExporter, backoff, retry_after_seconds
from sidetrace.exporters.spool import Spool
from tests.conftest import free_port


def test_retry_after_seconds_and_dates() -> None:
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("100000") == 300.0  # capped
    in_two = email.utils.formatdate(time.time() + 2, usegmt=True)
    assert 0.5 < retry_after_seconds(in_two) <= 2.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    assert 0.25 <= backoff(0) <= 0.5
    assert 2.0 <= backoff(3) <= 4.0
    assert all(15.0 <= backoff(40) <= 30.0 for _ in range(20))


class Backend:
    """An OTLP/HTTP backend whose answers the test scripts."""

    def __init__(self) -> None:
        self.port = free_port()
        self.bodies: list[bytes] = []
        self.answers: list[tuple[int, dict[str, str]]] = []
        self.times: list[float] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.times.append(time.monotonic())
        if b"POISON" in body:
            return web.Response(status=400, text="bad span")
        status, headers = self.answers.pop(0) if self.answers else (200, {})
        if status == 200:
            self.bodies.append(body)
        return web.Response(status=status, headers=headers)


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    b = Backend()
    app = web.Application()
    app.router.add_post("/v1/traces", b.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", b.port).start()
    yield b
    await runner.cleanup()


async def test_a_partial_request_waits_batch_timeout_for_more(tmp_path: Path, backend: Backend) -> None:
    spool = Spool(tmp_path / "spool.db", ["b"], max_bytes=1 << 20)
    await spool.open()
    exporter = OtlpExporter(OtlpExporterSection(name="b", endpoint=f"http://127.0.0.1:{backend.port}",
                                                protocol="http", compression="none", batch_timeout_seconds=0.5),
                            spool)
    await exporter.start()
    await spool.append(b"early", spans=1)
    await asyncio.sleep(0.2)
    await spool.append(b"late", spans=1)
    deadline = time.monotonic() + 10
    while spool.size_bytes and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await exporter.stop()
    await spool.close()
    assert backend.bodies == [b"earlylate"]  # one request, not two


async def run_exporter(tmp_path: Path, backend: Backend, bodies: list[bytes], until: float = 10.0) -> tuple:
    spool = Spool(tmp_path / "spool.db", ["b"], max_bytes=1 << 20)
    await spool.open()
    for body in bodies:
        await spool.append(body, spans=1)
    exporter = OtlpExporter(OtlpExporterSection(name="b", endpoint=f"http://127.0.0.1:{backend.port}",
                                                protocol="http", compression="none"), spool)
    await exporter.start()
    deadline = time.monotonic() + until
    while spool.size_bytes and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await exporter.stop()
    await spool.close()
    return exporter, spool


async def test_retry_after_is_honoured_then_delivered(tmp_path: Path, backend: Backend) -> None:
    backend.answers = [(503, {"Retry-After": "1"})]
    exporter, spool = await run_exporter(tmp_path, backend, [b"one", b"two"])
    assert backend.bodies == [b"onetwo"]  # joined into one request
    assert backend.times[1] - backend.times[0] >= 0.95
    assert (exporter.retries, exporter.sent_spans, exporter.failed_spans) == (1, 2, 2)
    assert spool.size_bytes == 0


async def test_permanent_rejection_sets_aside_only_the_bad_batch(tmp_path: Path, backend: Backend) -> None:
    exporter, spool = await run_exporter(tmp_path, backend, [b"a", b"b", b"POISON", b"c"])
    assert b"".join(backend.bodies) == b"abc"
    assert exporter.sent_spans == 3
    assert spool.set_aside_counts == {("b", "rejected: HTTP 400: bad span"): 1}


async def test_stop_in_the_middle_of_a_send_counts_it_as_possibly_resent(tmp_path: Path) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await request.read()
        arrived.set()
        await asyncio.wait_for(release.wait(), 30)
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/traces", hang)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        spool = Spool(tmp_path / "spool.db", ["b"], max_bytes=1 << 20)
        await spool.open()
        await spool.append(b"x", spans=9)
        exporter = OtlpExporter(OtlpExporterSection(name="b", endpoint=f"http://127.0.0.1:{port}", protocol="http",
                                                    compression="none"), spool)
        await exporter.start()
        await asyncio.wait_for(arrived.wait(), 10)
        await exporter.stop()
        await spool.close()
        again = Spool(tmp_path / "spool.db", ["b"], max_bytes=1 << 20)
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

    from sidetrace.exporters.otlp import MAX_RETRY_AFTER, _grpc_retry_delay

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
