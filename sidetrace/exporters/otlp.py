"""OTLP exporter: sends spooled trace batches to an OTLP backend such as Jaeger (gRPC or HTTP).

Batches are read from the spool at this exporter's own cursor and joined without decoding
(concatenated ExportTraceServiceRequest bytes are one valid request). Transient failures (no
connection, gRPC UNAVAILABLE / RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED / ABORTED, HTTP 429 / 502 /
503 / 504) are retried with exponential backoff and full jitter, honouring Retry-After, with no
give-up deadline: the data waits on disk until the backend returns or the spool bound drops it.
A permanent rejection (gRPC INVALID_ARGUMENT, HTTP 400, ...) of a joined request is split in
halves to find the batch at fault, which alone is set aside and counted.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import logging
import os
import random
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from prometheus_client.core import CounterMetricFamily, Metric

from sidetrace._grpc_status import status_details
from sidetrace.config import OtlpExporterSection
from sidetrace.exporters.spool import Batch, Spool

log = logging.getLogger("sidetrace.exporter")

TRACE_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
RETRYABLE_GRPC = {
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DATA_LOSS,
    # Credentials are fixed by config, not by dropping data: keep it on disk and keep saying why.
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
}
RETRYABLE_HTTP = {401, 403, 408, 429, 502, 503, 504}
INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 30.0
MAX_RETRY_AFTER = 300.0
MAX_REQUEST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Outcome:
    """What one send attempt ended with."""

    ok: bool
    retry: bool = False
    retry_after: float | None = None
    reason: str = ""
    rejected_spans: int = 0


def retry_after_seconds(value: str | None) -> float | None:
    """Parse an HTTP Retry-After header (seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return min(MAX_RETRY_AFTER, max(0.0, when - time.time()))


def backoff(attempt: int) -> float:
    """Exponential backoff with jitter: between half and all of min(MAX, INITIAL * 2**attempt)."""
    ceiling = min(MAX_BACKOFF, INITIAL_BACKOFF * 2 ** min(attempt, 16))
    return random.uniform(ceiling / 2, ceiling)


class _GrpcSender:
    def __init__(self, section: OtlpExporterSection, headers: dict[str, str]) -> None:
        parts = urlsplit(section.endpoint if "://" in section.endpoint else f"http://{section.endpoint}")
        target = parts.netloc
        options = [("grpc.max_send_message_length", MAX_REQUEST_BYTES * 2),
                   ("grpc.keepalive_time_ms", 30_000)]
        if parts.scheme == "https":
            tls = section.tls
            if tls.insecure_skip_verify:
                log.warning("exporter %s: insecure_skip_verify is not supported for gRPC; verifying", section.name)
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_file(tls.ca_file), private_key=_read_file(tls.key_file),
                certificate_chain=_read_file(tls.cert_file))
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        self._export = self._channel.unary_unary(
            TRACE_METHOD, request_serializer=None, response_deserializer=ExportTraceServiceResponse.FromString)
        self._metadata = tuple((key.lower(), value) for key, value in headers.items())
        self._compression = grpc.Compression.Gzip if section.compression == "gzip" else grpc.Compression.NoCompression
        self._timeout = section.timeout_seconds

    async def send(self, body: bytes) -> Outcome:
        try:
            response = await self._export(body, timeout=self._timeout, metadata=self._metadata,
                                          compression=self._compression)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            reason = f"gRPC {code.name}: {exc.details()}"
            return Outcome(False, retry=code in RETRYABLE_GRPC, retry_after=_grpc_retry_delay(exc), reason=reason)
        rejected = response.partial_success.rejected_spans
        return Outcome(True, reason=response.partial_success.error_message, rejected_spans=rejected)

    async def close(self) -> None:
        await self._channel.close()


def _grpc_retry_delay(exc: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay in a gRPC error's status details, when the backend sent one."""
    from google.rpc import error_details_pb2

    for info in status_details(exc.trailing_metadata(), error_details_pb2.RetryInfo):
        return min(MAX_RETRY_AFTER, info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None


def _read_file(path: str) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as handle:
        return handle.read()


class _HttpSender:
    def __init__(self, section: OtlpExporterSection, headers: dict[str, str]) -> None:
        parts = urlsplit(section.endpoint if "://" in section.endpoint else f"http://{section.endpoint}")
        path = parts.path if parts.path not in ("", "/") else "/v1/traces"
        self._url = f"{parts.scheme}://{parts.netloc}{path}"
        self._headers = {"Content-Type": "application/x-protobuf", **headers}
        self._gzip = section.compression == "gzip"
        if self._gzip:
            self._headers["Content-Encoding"] = "gzip"
        self._ssl: ssl.SSLContext | bool = True
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=section.tls.ca_file or None)
            if section.tls.cert_file:
                context.load_cert_chain(section.tls.cert_file, section.tls.key_file or None)
            if section.tls.insecure_skip_verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._ssl = context
        self._timeout = aiohttp.ClientTimeout(total=section.timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    async def send(self, body: bytes) -> Outcome:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        if self._gzip:
            body = await asyncio.to_thread(gzip.compress, body, 1)  # level 1: a tenth larger, half the CPU
        try:
            async with self._session.post(self._url, data=body, headers=self._headers, ssl=self._ssl) as response:
                payload = await response.read()
                if 200 <= response.status < 300:
                    rejected = 0
                    if payload and response.content_type == "application/x-protobuf":
                        rejected = ExportTraceServiceResponse.FromString(payload).partial_success.rejected_spans
                    return Outcome(True, rejected_spans=rejected)
                reason = f"HTTP {response.status}: {payload[:200].decode(errors='replace')}"
                return Outcome(False, retry=response.status in RETRYABLE_HTTP,
                               retry_after=retry_after_seconds(response.headers.get("Retry-After")), reason=reason)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return Outcome(False, retry=True, reason=f"{type(exc).__name__}: {exc}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class OtlpExporter:
    """Delivers the spool to one OTLP backend, at its own pace."""

    def __init__(self, section: OtlpExporterSection, spool: Spool) -> None:
        self.section = section
        self.name = section.name
        self._spool = spool
        headers = {key: os.path.expandvars(value) for key, value in section.headers.items()}
        self._sender = (_GrpcSender if section.protocol == "grpc" else _HttpSender)(section, headers)
        self._task: asyncio.Task[None] | None = None
        self.sent_spans = 0
        self.failed_spans = 0
        self.rejected_spans = 0
        self.retries = 0
        self.resent_spans = 0
        self.last_error: str | None = None
        self.state = "created"
        self._sending = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"exporter-{self.name}")
        self.state = "running"

    async def stop(self) -> None:
        if self._sending:  # the backend may get the request we are about to abandon
            self._spool.interrupted.add(self.name)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._sender.close()
        self.state = "stopped"

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                await self._step()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug or a disk error must not end delivery for good
                self.last_error = f"{type(exc).__name__}: {exc}"
                if failures == 0:
                    log.exception("exporter %s: unexpected error; retrying", self.name)
                failures += 1
                await asyncio.sleep(backoff(failures))

    async def _step(self) -> None:
        batches = await self._spool.read(self.name, self.section.max_batch_spans, MAX_REQUEST_BYTES)
        if not batches:
            await self._spool.wait_for_new(self.name, timeout=5.0)
            return
        linger = batches[0].received_at + self.section.batch_timeout_seconds - time.time()
        if linger > 0 and sum(b.spans for b in batches) < self.section.max_batch_spans:
            # A partial request: let more spans join it (one call and one ack instead of many), as the
            # Collector's batch processor does; the data is already safe on disk meanwhile.
            await asyncio.sleep(linger)
            batches = await self._spool.read(self.name, self.section.max_batch_spans, MAX_REQUEST_BYTES)
        self.resent_spans += self._spool.possibly_resent(self.name, batches)
        self._sending = True
        await self._deliver(batches)
        await self._spool.ack(self.name, batches[-1].id)
        self._sending = False

    async def _deliver(self, batches: list[Batch]) -> None:
        """Send ``batches`` until the backend takes them, or set aside those it calls invalid."""
        attempt = 0
        while True:
            # Batches the spool dropped for space while we retried are counted there: do not send them.
            batches = [b for b in batches if b.id > self._spool.dropped_through]
            if not batches:
                return
            spans = sum(b.spans for b in batches)
            outcome = await self._sender.send(b"".join(b.body for b in batches))
            if outcome.ok:
                self.sent_spans += spans - outcome.rejected_spans
                if outcome.rejected_spans:
                    self.rejected_spans += outcome.rejected_spans
                    log.warning("exporter %s: backend rejected %d of %d spans: %s", self.name,
                                outcome.rejected_spans, spans, outcome.reason)
                if attempt:
                    log.info("exporter %s: delivered after %d retries", self.name, attempt)
                self.last_error = None
                return
            self.failed_spans += spans
            self.last_error = outcome.reason
            if not outcome.retry:
                if len(batches) > 1:
                    middle = len(batches) // 2
                    await self._deliver(batches[:middle])
                    await self._deliver(batches[middle:])
                else:
                    await self._spool.set_aside(self.name, batches[0], f"rejected: {outcome.reason}")
                return
            delay = outcome.retry_after if outcome.retry_after is not None else backoff(attempt)
            if attempt == 0:
                log.warning("exporter %s: send failed (%s); retrying, the data waits in the spool",
                            self.name, outcome.reason)
            attempt += 1
            self.retries += 1
            await asyncio.sleep(delay)

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "endpoint": self.section.endpoint, "protocol": self.section.protocol,
                "sent_spans": self.sent_spans, "last_error": self.last_error,
                "oldest_unsent_age_seconds": round(self._spool.oldest_unsent_age(self.name), 1)}



COUNTERS = (
    ("sidetrace_exporter_sent_spans", "Spans the backend accepted.", "sent_spans"),
    ("sidetrace_exporter_send_failed_spans", "Spans in send attempts that failed (retried or set aside).",
     "failed_spans"),
    ("sidetrace_exporter_rejected_spans", "Spans the backend reported as rejected in a partial success.",
     "rejected_spans"),
    ("sidetrace_exporter_retries", "Send attempts retried.", "retries"),
    ("sidetrace_exporter_resent_spans", "Spans sent again after a restart because their delivery was not confirmed "
     "before it (possible duplicates).", "resent_spans"),
)


def exporter_families(exporters: list[OtlpExporter]) -> Iterator[Metric]:
    """The per-exporter counters, one family each with an ``exporter`` label."""
    for name, doc, attribute in COUNTERS:
        family = CounterMetricFamily(name, doc, labels=["exporter"])
        for exporter in exporters:
            family.add_metric([exporter.name], getattr(exporter, attribute))
        yield family
