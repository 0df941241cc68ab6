"""The remote-write exporter: what a collection holds, how answers are read, and delivery from a real spool to a
real HTTP server that decodes what it receives as a store would (snappy, then prompb)."""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import cramjam
import pytest
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sidetrace.config import RemoteWriteExporterSection
from sidetrace.exporters.delivery import DeliveryStats, Verdict, delivery_families
from sidetrace.exporters.remote_write import (
    RemoteWriteExporter,
    RemoteWriteSender,
    Samples,
    WriteRequest,
    classify,
)
from sidetrace.exporters.spool import Spool
from tests.conftest import free_port, until


class Store:
    """A remote-write receiver on loopback: decodes every request, answers ``refuse`` (a status) to requests
    holding a series named ``poison``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[WriteRequest] = []
        self.headers: list[dict[str, str]] = []
        self.refuse: int | None = None
        self.poison = "poisoned_series"

    async def start(self) -> Store:
        app = web.Application()
        app.router.add_post("/api/v1/write", self._write)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def _write(self, request: web.Request) -> web.Response:
        body = WriteRequest.FromString(bytes(cramjam.snappy.decompress_raw(await request.read())))
        if self.refuse and any(label.value == self.poison for s in body.timeseries for label in s.labels
                               if label.name == "__name__"):
            return web.Response(status=self.refuse, text="out of order sample")
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        return web.Response(status=204)

    def samples(self, name: str) -> list[tuple[dict[str, str], float, int]]:
        found = []
        for body in self.requests:
            for series in body.timeseries:
                labels = {label.name: label.value for label in series.labels}
                if labels["__name__"] == name:
                    found += [(labels, sample.value, sample.timestamp) for sample in series.samples]
        return found

    async def stop(self) -> None:
        await self._runner.cleanup()


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    server = await Store().start()
    yield server
    await server.stop()


class Source:
    """Metric families as the daemon's registry hands them out; the test changes them between collections."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def __call__(self) -> list[Metric]:
        return list(self.families)


def gauge(name: str, value: float, **labels: str) -> Metric:
    family = GaugeMetricFamily(name, "a gauge", labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def test_a_collection_labels_every_series_and_marks_the_ones_that_went_stale() -> None:
    source = Source()
    section = RemoteWriteExporterSection(name="rw", external_labels={"cluster": "eu-1", "instance": "host-a"})
    unopened = Spool(Path("/nonexistent/spool.db"), max_bytes=1)  # collect() writes nothing
    exporter = RemoteWriteExporter(section, unopened, lambda _: DeliveryStats(), metrics=source)
    requests = CounterMetricFamily("app_requests", "requests", labels=["job"])
    requests.add_metric(["checkout"], 7)
    source.families = [gauge("queue_depth", 3, queue="orders"), requests]
    body, count = exporter.collect(1_700_000_000.25)
    first = {tuple((label.name, label.value) for label in s.labels): [(p.value, p.timestamp) for p in s.samples]
             for s in WriteRequest.FromString(body).timeseries}
    assert count == 2
    assert first == {
        (("__name__", "queue_depth"), ("cluster", "eu-1"), ("instance", "host-a"), ("job", "sidetrace"),
         ("queue", "orders")): [(3.0, 1_700_000_000_250)],
        (("__name__", "app_requests_total"), ("cluster", "eu-1"), ("instance", "host-a"), ("job", "checkout")):
            [(7.0, 1_700_000_000_250)],  # the series' own job wins over the default
    }
    source.families = [requests]
    body, count = exporter.collect(1_700_000_001.0)
    second = {s.labels[0].value: s.samples[0] for s in WriteRequest.FromString(body).timeseries}
    assert count == 2
    stale = second["queue_depth"]
    assert math.isnan(stale.value) and struct.pack("<d", stale.value) == struct.pack("<Q", 0x7FF0000000000002)
    assert stale.timestamp == 1_700_000_001_000
    body, count = exporter.collect(1_700_000_002.0)
    assert count == 1  # a marker is written once


def test_answers_are_read_as_the_remote_write_specification_says() -> None:
    assert classify(503, b"", "2").verdict is Verdict.RETRY and classify(503, b"", "2").retry_after == 2.0
    assert classify(429, b"", None).verdict is Verdict.RETRY
    assert classify(400, b"out of order sample", None).verdict is Verdict.BAD_DATA
    assert classify(413, b"", None).verdict is Verdict.TOO_LARGE
    for status in (401, 403, 404, 405):  # the config's fault: the samples stay on disk
        assert classify(status, b"", None).verdict is Verdict.FAULT


def test_samples_split_in_halves_of_their_series() -> None:
    request = WriteRequest()
    for n in range(5):
        series = request.timeseries.add()
        series.labels.add(name="__name__", value=f"m{n}")
        series.samples.add(value=n, timestamp=1)
        series.samples.add(value=n, timestamp=2)
    halves = Samples().split(request.SerializeToString())
    assert [count for _, count in halves] == [4, 6]
    assert [len(WriteRequest.FromString(body).timeseries) for body, _ in halves] == [2, 3]
    with pytest.raises(ValueError):
        Samples().split(b"\xff\xff")


async def test_a_refused_batch_is_set_aside_and_the_next_ones_flow(tmp_path: Path, store: Store) -> None:
    store.refuse = 400
    source = Source()
    spool = Spool(tmp_path / "spool.db", max_bytes=1 << 30, sync="normal")
    spool.add_reader_at_open("rw", "rw")
    await spool.open()
    stats: dict[str, DeliveryStats] = {}
    section = RemoteWriteExporterSection(name="rw", url=f"http://127.0.0.1:{store.port}/api/v1/write",
                                         interval_seconds=0.05, bearer_token="s3cret")
    exporter = RemoteWriteExporter(section, spool, lambda name: stats.setdefault(name, DeliveryStats()),
                                   metrics=source)
    source.families = [gauge("poisoned_series", 1), gauge("good_series", 2)]
    await exporter.start()
    await until(lambda: spool.set_aside_counts.get(("rw", "rejected"), 0) >= 1, 10, "the refused sample set aside")
    source.families = [gauge("good_series", 3)]
    await until(lambda: any(value == 3 for _, value, _ in store.samples("good_series")), 10, "later collections")
    await exporter.stop()
    await spool.close()
    assert all(labels["__name__"] != "poisoned_series" for body in store.requests for s in body.timeseries
               for labels in [{label.name: label.value for label in s.labels}])
    # Each refused collection (two samples: the poisoned series and the good one) was set aside whole, alone.
    assert {value for _, value, _ in store.samples("good_series")} == {3.0}
    assert set(spool.set_aside_counts) == {("rw", "rejected")} and spool.set_aside_counts[("rw", "rejected")] % 2 == 0
    assert store.headers[0]["Authorization"] == "Bearer s3cret"
    assert store.headers[0]["Content-Encoding"] == "snappy"
    families = {f.name: f for f in delivery_families(list(stats.items()))}
    assert families["sidetrace_exporter_sent_samples"].samples[0].value == stats["rw"].sent > 0
    assert all(s.labels["exporter"] != "rw" for s in families["sidetrace_exporter_sent_spans"].samples)


def test_credentials_come_from_the_environment_and_go_in_the_authorization_header(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIMIR_PASSWORD", "pa:ss")
    monkeypatch.setenv("TENANT", "team-a")
    basic = RemoteWriteSender(RemoteWriteExporterSection(basic_auth_username="agent",
                                                         basic_auth_password="${MIMIR_PASSWORD}",
                                                         headers={"X-Scope-OrgID": "${TENANT}"}))
    assert basic.headers["Authorization"] == "Basic " + base64.b64encode(b"agent:pa:ss").decode()
    assert basic.headers["X-Scope-OrgID"] == "team-a"
    bearer = RemoteWriteSender(RemoteWriteExporterSection(bearer_token="${TENANT}"))
    assert bearer.headers["Authorization"] == "Bearer team-a"
    assert "Authorization" not in RemoteWriteSender(RemoteWriteExporterSection()).headers


async def test_a_stop_ends_every_series_with_a_staleness_marker(tmp_path: Path, store: Store) -> None:
    source = Source()
    spool = Spool(tmp_path / "spool.db", max_bytes=1 << 30, sync="normal")
    spool.add_reader_at_open("rw", "rw")
    await spool.open()
    section = RemoteWriteExporterSection(name="rw", url=f"http://127.0.0.1:{store.port}/api/v1/write",
                                         interval_seconds=0.1)
    exporter = RemoteWriteExporter(section, spool, lambda _: DeliveryStats(), metrics=source)
    source.families = [gauge("queue_depth", 3, queue="orders"), gauge("workers", 2)]
    await exporter.start()
    await until(lambda: store.samples("workers"), 10, "a first collection")
    await exporter.stop()
    # A new exporter (a reload, or the next start) delivers what the stop queued: the markers, last.
    exporter = RemoteWriteExporter(section, spool, lambda _: DeliveryStats(), metrics=Source())
    await exporter.delivery.start()
    await until(lambda: any(math.isnan(value) for _, value, _ in store.samples("workers")), 10, "the markers")
    await exporter.delivery.stop()
    await spool.close()
    for name in ("queue_depth", "workers"):
        assert math.isnan(store.samples(name)[-1][1]), name  # each series' last sample ends it
