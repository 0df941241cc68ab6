"""Prometheus remote-write 1.0 exporter: the agent's own metrics pushed to Prometheus, Mimir, Thanos,
Cortex or VictoriaMetrics.

Every ``interval_seconds`` the agent's metrics (the same families ``/metrics`` serves: host, network,
flows, span metrics, app metrics, self metrics) are collected into a WriteRequest, stamped with the
collection time and queued in the spool, so an outage of the store up to the spool's bound loses no
sample. The shared delivery loop (``delivery.py``) sends the queue oldest first, snappy-compressed,
joining queued collections up to ``max_samples_per_request``. A series present at one collection
and gone at the next gets a staleness marker (the NaN Prometheus itself writes), so it ends at once
in the store rather than five minutes later.

Answers, as the remote-write specification says, with one deliberate exception: 5xx and 429 are
retried with backoff (honouring Retry-After); 400 and other data refusals (out-of-order or duplicate
samples) set the refused collection aside (joined collections are split first, so the others go
through) and count it; 413 splits. 401, 403, 404 and 405 are the config's fault (credentials, URL),
not the data's: the samples stay on disk and are retried, as for every exporter, where the
specification would drop them.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

import cramjam
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from prometheus_client.core import Metric

from sidetrace import __version__
from sidetrace.config import RemoteWriteExporterSection, expand_env
from sidetrace.exporters.delivery import Answer, Delivery, DeliveryStats, Policy, Verdict
from sidetrace.exporters.http import HttpPoster
from sidetrace.exporters.otlp import retry_after_seconds
from sidetrace.exporters.spool import Spool, SpoolError

log = logging.getLogger("sidetrace.exporter")

STALE_NAN = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000002))[0]  # Prometheus' staleness marker
RETRYABLE = frozenset({408, 429})
CONFIG_FAULTS = frozenset({401, 403, 404, 405, 407})


def _messages() -> tuple[type, type]:
    """WriteRequest and TimeSeries of prometheus/prompb (remote.proto, types.proto), built from their
    descriptor: no package on PyPI ships them as the field's standard."""
    proto = descriptor_pb2.FileDescriptorProto(name="sidetrace/prompb.proto", package="prometheus", syntax="proto3")
    label = proto.message_type.add(name="Label")
    label.field.add(name="name", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING)
    label.field.add(name="value", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING)
    sample = proto.message_type.add(name="Sample")
    sample.field.add(name="value", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE)
    sample.field.add(name="timestamp", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT64)
    series = proto.message_type.add(name="TimeSeries")
    repeated = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
    message = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
    series.field.add(name="labels", number=1, type=message, label=repeated, type_name=".prometheus.Label")
    series.field.add(name="samples", number=2, type=message, label=repeated, type_name=".prometheus.Sample")
    request = proto.message_type.add(name="WriteRequest")
    request.field.add(name="timeseries", number=1, type=message, label=repeated, type_name=".prometheus.TimeSeries")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName("prometheus.WriteRequest")),
            message_factory.GetMessageClass(pool.FindMessageTypeByName("prometheus.TimeSeries")))


WriteRequest, TimeSeries = _messages()


class Samples:
    """WriteRequest bodies: joined by concatenation (one valid request), split in halves of their series."""

    def join(self, bodies: list[bytes]) -> bytes:
        return bodies[0] if len(bodies) == 1 else b"".join(bodies)

    def split(self, body: bytes) -> list[tuple[bytes, int]]:
        try:
            request = WriteRequest.FromString(body)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or anything a corrupt body raises
            raise ValueError(f"not a WriteRequest: {exc}") from None
        series = list(request.timeseries)
        if len(series) < 2:
            return []
        middle = len(series) // 2
        return [(WriteRequest(timeseries=part).SerializeToString(), sum(len(s.samples) for s in part))
                for part in (series[:middle], series[middle:])]


def classify(status: int, body: bytes, retry_after: str | None) -> Answer:
    """What a non-2xx remote-write answer means for the samples (see module doc)."""
    detail = f"HTTP {status}: {body[:200].decode(errors='replace').strip()}"
    reason = f"http_{status}"
    if status >= 500 or status in RETRYABLE:
        return Answer(Verdict.RETRY, reason, detail, retry_after_seconds(retry_after))
    if status == 413:
        return Answer(Verdict.TOO_LARGE, reason, detail, about_size=True)
    if status in CONFIG_FAULTS:
        return Answer(Verdict.FAULT, reason, detail)
    return Answer(Verdict.BAD_DATA, reason, detail)


class RemoteWriteSender:
    """POSTs snappy-compressed WriteRequests to the store."""

    def __init__(self, section: RemoteWriteExporterSection) -> None:
        self.headers = {"Content-Type": "application/x-protobuf", "Content-Encoding": "snappy",
                        "X-Prometheus-Remote-Write-Version": "0.1.0", "User-Agent": f"sidetrace/{__version__}",
                        **{key: expand_env(value) for key, value in section.headers.items()}}
        if section.bearer_token:
            self.headers["Authorization"] = f"Bearer {expand_env(section.bearer_token)}"
        elif section.basic_auth_username:
            pair = f"{section.basic_auth_username}:{expand_env(section.basic_auth_password)}"
            self.headers["Authorization"] = f"Basic {base64.b64encode(pair.encode()).decode()}"
        self._poster = HttpPoster(section.url, self.headers, section.tls, section.timeout_seconds)

    async def send(self, body: bytes) -> Answer:
        return await self._poster.post(bytes(cramjam.snappy.compress_raw(body)), _read_answer)

    async def close(self) -> None:
        await self._poster.close()


def _read_answer(status: int, payload: bytes, content_type: str, retry_after: str | None) -> Answer:
    return Answer(Verdict.DELIVERED) if 200 <= status < 300 else classify(status, payload, retry_after)


LabelSet = tuple[tuple[str, str], ...]


class RemoteWriteExporter:
    """One ``[[exporters.remote_write]]`` table (see module doc)."""

    NEEDS_METRICS = True

    def __init__(self, section: RemoteWriteExporterSection, spool: Spool, stats_for: Callable[[str], DeliveryStats],
                 metrics: Callable[[], Iterable[Metric]] | None = None) -> None:
        self.section = section
        self.name = section.name
        self.spool = spool
        self._metrics = metrics or (lambda: ())
        stats = stats_for(section.name)
        stats.unit = "samples"
        policy = Policy(max_items=section.max_samples_per_request, max_request_bytes=section.max_request_bytes)
        self.delivery = Delivery(section.name, spool, section.name, RemoteWriteSender(section), Samples(), policy,
                                 stats)
        self._defaults = {"job": "sidetrace", "instance": socket.gethostname(), **section.external_labels}
        self._previous: set[LabelSet] = set()
        self._collector: asyncio.Task[None] | None = None
        self.collections = 0
        self.last_collect_error: str | None = None

    def readers(self) -> list[tuple[str, str]]:
        return [(self.name, self.name)]

    async def start(self) -> None:
        await self.delivery.start()
        self._collector = asyncio.create_task(self._collect_forever(), name=f"exporter-{self.name}-collect")

    async def stop(self) -> None:
        if self._collector is not None:
            self._collector.cancel()
            await asyncio.gather(self._collector, return_exceptions=True)
        if self._previous:
            # Every series ends here, as Prometheus ends a target's series when it goes: a reload that changes
            # the labels (or a stop) must not leave the old series counted beside the new ones for 5 minutes.
            body, samples = self.collect(time.time(), families=())
            try:
                await self.spool.append(body, samples, self.name)  # sent now, or first at the next start
            except SpoolError as exc:
                log.warning("exporter %s: could not queue the staleness markers of its series: %s", self.name, exc)
        await self.delivery.stop()

    async def _collect_forever(self) -> None:
        interval = self.section.interval_seconds
        next_at = time.monotonic()
        while True:
            try:
                body, samples = await asyncio.to_thread(self.collect, time.time())
                if samples:
                    await self.spool.append(body, samples, self.name)
                self.collections += 1
                self.last_collect_error = None
            except Exception as exc:  # a full disk, say: this collection is lost, the next one comes
                message = f"{type(exc).__name__}: {exc}"
                if message != self.last_collect_error:
                    log.error("exporter %s: could not queue a collection: %s", self.name, message)
                self.last_collect_error = message
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    def collect(self, now: float, families: Iterable[Metric] | None = None) -> tuple[bytes, int]:
        """One collection (of the agent's metrics, or of ``families``) as an encoded WriteRequest and its sample
        count, with staleness markers for series that were in the previous collection and are gone."""
        timestamp = int(now * 1000)
        request = WriteRequest()
        seen: set[LabelSet] = set()
        for family in self._metrics() if families is None else families:
            for sample in family.samples:
                # An empty value is no label at all in Prometheus' model (as a scrape stores it): a default fills it.
                labels = {**self._defaults, **{k: v for k, v in sample.labels.items() if v}, "__name__": sample.name}
                key = tuple(sorted(labels.items()))
                if key in seen:  # two components emitting one series: the first wins, as on /metrics
                    continue
                seen.add(key)
                series = request.timeseries.add()
                for name, value in key:
                    series.labels.add(name=name, value=value)
                at = int(sample.timestamp * 1000) if sample.timestamp is not None else timestamp
                series.samples.add(value=float(sample.value), timestamp=at)
        for key in sorted(self._previous - seen):
            series = request.timeseries.add()
            for name, value in key:
                series.labels.add(name=name, value=value)
            series.samples.add(value=STALE_NAN, timestamp=timestamp)
        self._previous = seen
        return request.SerializeToString(), len(request.timeseries)

    def status(self) -> dict[str, Any]:
        state = self.delivery.status()
        if self.last_collect_error and state["state"] == "running":
            state = {**state, "state": "failing", "last_error": self.last_collect_error}
        return {**state, "endpoint": self.section.url, "protocol": "remote_write"}
