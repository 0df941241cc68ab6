"""OTLP exporter: the spool's trace queue delivered to an OTLP backend such as Jaeger (gRPC or HTTP).

What this module supplies to the shared delivery loop (``delivery.py``): how to send one request,
how to read the backend's answer, as the OTLP specification classifies it, and how to split an
ExportTraceServiceRequest. Spooled batches are joined without decoding (concatenated
ExportTraceServiceRequest bytes are one valid request).

gRPC: UNAVAILABLE (counted as reason ``connection_refused`` when the connection was refused, and
``connection_lost``, as HTTP's is, when grpc core reports the call's connection lost under it), CANCELLED,
DEADLINE_EXCEEDED (counted as reason ``timeout``, as HTTP's is), ABORTED, OUT_OF_RANGE, DATA_LOSS, and
RESOURCE_EXHAUSTED with a RetryInfo, are retried; RESOURCE_EXHAUSTED without
one means the request is too large; INVALID_ARGUMENT is bad data; every other code is the backend's or the
config's fault.
HTTP: 429, 502, 503, 504 (and 408) are retried; 413 is too large; 400 is bad data; any other status,
and failures to connect or to agree on TLS, are faults. Only bad data is ever set aside.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from sidetrace._grpc_status import status_details
from sidetrace.config import OtlpExporterSection, expand_env
from sidetrace.exporters.delivery import (
    MAX_RETRY_AFTER,
    MAX_UNREACHABLE_BACKOFF,
    Answer,
    Delivery,
    DeliveryStats,
    Policy,
    Verdict,
)
from sidetrace.exporters.http import HttpPoster
from sidetrace.exporters.spool import TRACES, Spool

log = logging.getLogger("sidetrace.exporter")

TRACE_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
RETRYABLE_GRPC = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DATA_LOSS,
})
RETRYABLE_HTTP = frozenset({408, 429, 502, 503, 504})
# How grpc core words an UNAVAILABLE for a call that was under way on a connection: the connection lost ("Stream
# removed (Socket closed)", "... (recvmsg:Connection reset by peer (104))"), or a grpc core server shut down with
# the call in its hands ("Cancelling all calls"). The request may have been taken. A backend's own UNAVAILABLE (a
# memory limiter's refusal) and a refused connection say otherwise, and mean it was not.
LOST_MID_CALL = ("Stream removed", "Cancelling all calls")
_TLS_WORDS = ("ssl", "tls", "certificate", "handshake")


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


def classify_grpc(code: grpc.StatusCode, details: str, retry_delay: float | None) -> Answer:
    """What a failed OTLP/gRPC export means for the data (see module doc)."""
    detail = f"gRPC {code.name}: {details}"
    reason = f"grpc_{code.name.lower()}"
    lowered = details.lower()
    if code is grpc.StatusCode.UNAVAILABLE and any(word in lowered for word in _TLS_WORDS):
        return Answer(Verdict.FAULT, "tls", detail)
    if code in RETRYABLE_GRPC:
        if code is grpc.StatusCode.UNAVAILABLE and ("connection refused" in lowered or "failed to connect" in lowered):
            reason = "connection_refused"
        elif code is grpc.StatusCode.UNAVAILABLE and details.startswith(LOST_MID_CALL):
            reason = "connection_lost"  # the backend may have taken the request before it went: as HTTP names it
        elif code is grpc.StatusCode.DEADLINE_EXCEEDED:  # no answer within timeout_seconds: as HTTP names it
            reason = "timeout"
        return Answer(Verdict.RETRY, reason, detail, retry_delay)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        if retry_delay is not None:
            return Answer(Verdict.RETRY, reason, detail, retry_delay)
        return Answer(Verdict.TOO_LARGE, reason, detail, about_size="larger than max" in lowered)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return Answer(Verdict.BAD_DATA, reason, detail)
    return Answer(Verdict.FAULT, reason, detail)


def classify_http(status: int, body: bytes, retry_after: str | None) -> Answer:
    """What a non-2xx OTLP/HTTP answer means for the data (see module doc)."""
    detail = f"HTTP {status}: {body[:200].decode(errors='replace').strip()}"
    reason = f"http_{status}"
    if status in RETRYABLE_HTTP:
        return Answer(Verdict.RETRY, reason, detail, retry_after_seconds(retry_after))
    if status == 413:
        return Answer(Verdict.TOO_LARGE, reason, detail, about_size=True)
    if status == 400:
        return Answer(Verdict.BAD_DATA, reason, detail)
    return Answer(Verdict.FAULT, reason, detail)


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


def _delivered(response: ExportTraceServiceResponse) -> Answer:
    partial = response.partial_success
    return Answer(Verdict.DELIVERED, rejected=partial.rejected_spans, detail=partial.error_message)


class GrpcSender:
    """OTLP/gRPC: one unary Export call per request."""

    def __init__(self, section: OtlpExporterSection, headers: dict[str, str]) -> None:
        parts = urlsplit(section.endpoint if "://" in section.endpoint else f"http://{section.endpoint}")
        target = parts.netloc
        # No client-side size limit: the backend's limit decides, and a refusal splits the request. A backend
        # that refused connections is tried again as often as the delivery loop retries (gRPC's own default
        # waits up to 120 s between attempts, and calls fail meanwhile).
        options = [("grpc.max_send_message_length", -1), ("grpc.keepalive_time_ms", 30_000),
                   ("grpc.max_reconnect_backoff_ms", int(MAX_UNREACHABLE_BACKOFF * 1000))]
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

    async def send(self, body: bytes) -> Answer:
        try:
            response = await self._export(body, timeout=self._timeout, metadata=self._metadata,
                                          compression=self._compression)
        except grpc.aio.AioRpcError as exc:
            return classify_grpc(exc.code(), exc.details() or "", _grpc_retry_delay(exc))
        return _delivered(response)

    async def close(self) -> None:
        await self._channel.close()


class HttpSender:
    """OTLP/HTTP with protobuf bodies, POSTed to /v1/traces (or the endpoint's own path)."""

    def __init__(self, section: OtlpExporterSection, headers: dict[str, str]) -> None:
        parts = urlsplit(section.endpoint if "://" in section.endpoint else f"http://{section.endpoint}")
        path = parts.path if parts.path not in ("", "/") else "/v1/traces"
        self._gzip = section.compression == "gzip"
        request_headers = {"Content-Type": "application/x-protobuf", **headers}
        if self._gzip:
            request_headers["Content-Encoding"] = "gzip"
        self._poster = HttpPoster(f"{parts.scheme}://{parts.netloc}{path}", request_headers, section.tls,
                                  section.timeout_seconds)

    async def send(self, body: bytes) -> Answer:
        if self._gzip:
            body = await asyncio.to_thread(gzip.compress, body, 1)  # level 1: a tenth larger, half the CPU
        return await self._poster.post(body, _read_http_answer)

    async def close(self) -> None:
        await self._poster.close()


def _read_http_answer(status: int, payload: bytes, content_type: str, retry_after: str | None) -> Answer:
    if 200 <= status < 300:
        if payload and content_type == "application/x-protobuf":
            try:
                return _delivered(ExportTraceServiceResponse.FromString(payload))
            except DecodeError:
                pass  # a 2xx is a success whatever its body says
        return Answer(Verdict.DELIVERED)
    return classify_http(status, payload, retry_after)


class TracesPayload:
    """ExportTraceServiceRequest bodies: joined by concatenation, split in halves of their spans."""

    def join(self, bodies: list[bytes]) -> bytes:
        return bodies[0] if len(bodies) == 1 else b"".join(bodies)

    def split(self, body: bytes) -> list[tuple[bytes, int]]:
        try:
            request = ExportTraceServiceRequest.FromString(body)
        except DecodeError as exc:
            raise ValueError(f"not an ExportTraceServiceRequest: {exc}") from None
        spans = [(r, s, span) for r, resource in enumerate(request.resource_spans)
                 for s, scope in enumerate(resource.scope_spans) for span in scope.spans]
        if len(spans) < 2:
            return []
        middle = len(spans) // 2
        return [(self._request(request, part).SerializeToString(), len(part)) for part in (spans[:middle],
                                                                                             spans[middle:])]

    @staticmethod
    def _request(original: ExportTraceServiceRequest, spans: list[tuple[int, int, Any]]) -> ExportTraceServiceRequest:
        request = ExportTraceServiceRequest()
        scopes: dict[tuple[int, int], Any] = {}
        resources: dict[int, Any] = {}
        for r, s, span in spans:
            if r not in resources:
                source = original.resource_spans[r]
                resources[r] = target = request.resource_spans.add()
                target.resource.CopyFrom(source.resource)
                target.schema_url = source.schema_url
            if (r, s) not in scopes:
                source_scope = original.resource_spans[r].scope_spans[s]
                scopes[(r, s)] = scope = resources[r].scope_spans.add()
                scope.scope.CopyFrom(source_scope.scope)
                scope.schema_url = source_scope.schema_url
            scopes[(r, s)].spans.add().CopyFrom(span)
        return request


class OtlpExporter:
    """One ``[[exporters.otlp]]`` backend: reads the spool's trace queue at its own cursor."""

    def __init__(self, section: OtlpExporterSection, spool: Spool, stats_for: Callable[[str], DeliveryStats]) -> None:
        self.section = section
        self.name = section.name
        headers = {key: expand_env(value) for key, value in section.headers.items()}
        sender = (GrpcSender if section.protocol == "grpc" else HttpSender)(section, headers)
        policy = Policy(max_items=section.max_batch_spans, max_request_bytes=section.max_request_bytes,
                        linger_seconds=section.batch_timeout_seconds)
        self.delivery = Delivery(section.name, spool, TRACES, sender, TracesPayload(), policy, stats_for(section.name))

    def readers(self) -> list[tuple[str, str]]:
        """The spool readers this exporter needs: (reader, queue)."""
        return [(self.name, TRACES)]

    async def start(self) -> None:
        await self.delivery.start()

    async def stop(self) -> None:
        await self.delivery.stop()

    def status(self) -> dict[str, Any]:
        return {**self.delivery.status(), "endpoint": self.section.endpoint, "protocol": self.section.protocol}

