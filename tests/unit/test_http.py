from __future__ import annotations

import asyncio
import gzip
import socket
import threading
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from sidetrace.agent.components import Context
from sidetrace.agent.http import HttpServer
from sidetrace.agent.sources.host import HostSource
from sidetrace.config import Config, HostSection, ServerSection
from tests.conftest import free_port


class Harness:
    def __init__(self) -> None:
        self.ready = False
        self.registry = CollectorRegistry(auto_describe=False)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        context = Context(config=Config(), registry=self.registry, daemon_status=lambda: {"components": {}},
                          not_ready=lambda: [] if self.ready else ["starting"])
        self.server = HttpServer(ServerSection(listen=f"127.0.0.1:{self.port}"), context)
        self.host = HostSource(HostSection(), context)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    await h.server.start()
    await h.host.start()
    h.registry.register(h.host)  # the daemon collects its components; here the test does
    yield h
    await h.host.stop()
    await h.server.stop()


async def get(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    headers.setdefault("Accept-Encoding", "identity")
    async with aiohttp.ClientSession(auto_decompress=False) as session, session.get(url, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def test_metrics_in_prometheus_text_format(harness: Harness) -> None:
    status, headers, body = await get(harness.url + "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["system_network_io_bytes"].type == "counter"
    assert {s.labels["direction"] for s in families["system_network_io_bytes"].samples} == {"receive", "transmit"}
    assert "system_cpu_time_seconds" in families


async def test_metrics_in_openmetrics_when_asked(harness: Harness) -> None:
    status, headers, body = await get(
        harness.url + "/metrics", Accept="application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
    )
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    text = body.decode()
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in parse_openmetrics(text)}
    assert families["system_network_io_bytes"].unit == "bytes"


async def test_metrics_gzip_when_accepted(harness: Harness) -> None:
    status, headers, body = await get(harness.url + "/metrics", **{"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert b"system_network_io_bytes_total" in gzip.decompress(body)


async def test_unknown_path_is_404(harness: Harness) -> None:
    assert (await get(harness.url + "/nope"))[0] == 404
    assert (await get(harness.url + "/metrics/extra"))[0] == 404


async def test_readyz_follows_readiness_and_healthz_always_200(harness: Harness) -> None:
    assert (await get(harness.url + "/readyz"))[0] == 503
    assert (await get(harness.url + "/healthz"))[0] == 200
    harness.ready = True
    assert (await get(harness.url + "/readyz"))[0] == 200


async def test_concurrent_scrapes_see_whole_snapshots(harness: Harness) -> None:
    stop = threading.Event()

    def rescan() -> None:
        while not stop.is_set():
            harness.host.scan()

    scanner = threading.Thread(target=rescan)
    scanner.start()
    try:
        bodies = await asyncio.wait_for(
            asyncio.gather(*(get(harness.url + "/metrics") for _ in range(40))), timeout=60
        )
    finally:
        stop.set()
        scanner.join(10)
    shapes = set()
    for status, _, body in bodies:
        assert status == 200
        families = text_string_to_metric_families(body.decode())
        shapes.add(tuple(sorted((f.name, len(f.samples)) for f in families if not f.name.startswith(
            ("system_network_connections", "process_", "system_disk")))))
    assert len(shapes) == 1, "every scrape must see one complete snapshot"


async def test_listen_conflict_names_the_address() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        context = Context(config=Config(), registry=CollectorRegistry(), daemon_status=dict, not_ready=list)
        server = HttpServer(ServerSection(listen=f"127.0.0.1:{port}"), context)
        with pytest.raises(RuntimeError, match=rf"server.listen: cannot listen on 127.0.0.1:{port}: "):
            await server.start()
        assert server.status()["state"] == "failed"
