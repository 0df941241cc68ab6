"""Load-balancing exporter: spans routed by trace id (or by service) over a set of OTLP backends.

As the OpenTelemetry Collector's ``loadbalancingexporter`` does, every span of a trace goes to the
same backend, so a tail sampler in a collector tier sees whole traces. Backends come from a static
list or from DNS (every address of a name, resolved again every ``dns_interval_seconds``), placed on
a consistent-hash ring: a change of the backend set moves about 1/N of the traces and no more.

Durability is the spool's, as for every exporter. A router reads the trace queue at its own cursor,
splits each batch by owner and appends each part to that backend's own queue (``NAME/HOST:PORT``, a
sub-reader of the exporter's), then acknowledges: one backend down holds up only its own share,
which waits on disk (bounded by ``[spool] max_bytes``). Each backend's queue is delivered by the
shared delivery loop (``delivery.py``) with the OTLP senders, so errors are classified and counted
as for ``[[exporters.otlp]]``. When a backend leaves the set, what its queue still holds is routed
again over the new ring and delivered to the backends that now own it.

A span is written to disk twice (the trace queue, then its backend's queue). If the agent dies between
the two, the batch is routed again at the next start: its spans may be sent twice, and they are counted
in ``sidetrace_exporter_resent_spans_total``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import ipaddress
import logging
import socket
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from prometheus_client.core import CounterMetricFamily, Metric

from sidetrace._aio import finish
from sidetrace._protowire import fields, varint
from sidetrace.config import (
    ClientTlsSection,
    LoadBalancingExporterSection,
    OtlpExporterSection,
    expand_env,
    parse_host_port,
)
from sidetrace.exporters.delivery import Delivery, DeliveryStats, Policy
from sidetrace.exporters.otlp import GrpcSender, HttpSender, TracesPayload
from sidetrace.exporters.spool import TRACES, Batch, Spool, SpoolError

log = logging.getLogger("sidetrace.exporter")

VIRTUAL_NODES = 4096  # ring positions per backend: shares within a few percent of 1/N (measured)
ROUTE_MAX_ITEMS = 16_384
ROUTE_MAX_BYTES = 16 * 1024 * 1024
RECENT_KEYS = 8192  # trace ids (or services) last routed, to count those a membership change moves


def _position(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big")


def _key_hash(key: bytes) -> int:
    # Keys are trace ids (random by the W3C spec, but not every SDK's are) or service names: hash them all.
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "big")


class HashRing:
    """A consistent-hash ring of backends (``VIRTUAL_NODES`` positions each)."""

    def __init__(self, backends: Iterable[str]) -> None:
        self.backends = tuple(sorted(set(backends)))
        points = sorted((_position(f"{backend}#{index}"), backend) for backend in self.backends
                        for index in range(VIRTUAL_NODES))
        self._positions = [position for position, _ in points]
        self._owners = [backend for _, backend in points]

    def owner(self, key: bytes) -> str:
        """The backend that owns ``key``: the first position at or after the key's hash, wrapping around."""
        index = bisect_left(self._positions, _key_hash(key))
        return self._owners[index % len(self._owners)]

    def __len__(self) -> int:
        return len(self.backends)


def _service(resource: memoryview) -> bytes:
    """service.name of an encoded Resource (b"" when absent)."""
    try:
        attributes = Resource.FromString(resource).attributes
    except DecodeError as exc:
        raise ValueError(f"invalid resource: {exc}") from None
    for kv in attributes:
        if kv.key == "service.name":
            return kv.value.string_value.encode()
    return b""


def _trace_id(span: memoryview) -> bytes:
    """An encoded Span's trace_id: its first field, as every SDK writes it, or found among the others."""
    if len(span) >= 18 and span[0] == 0x0A and span[1] == 16:
        return span[2:18].tobytes()
    for number, _, value, end in fields(span):
        if number == 1:
            return span[value:end].tobytes()
    return b""


def route(body: bytes, ring: HashRing, by_service: bool,
          seen: Callable[[bytes], None] | None = None) -> dict[str, tuple[bytes, int]]:
    """``body`` (an encoded ExportTraceServiceRequest) split by owner: backend -> (body, spans).

    Works on the wire format, without decoding a span (a protobuf decode and re-encode cost four times
    as much): each ResourceSpans keeps its resource, each ScopeSpans its scope, and the spans of one
    trace (or of one service) go to one backend. ``seen`` is given each routing key looked up. Raises
    ValueError when ``body`` cannot be read.
    """
    data = memoryview(body)
    requests: dict[str, list[bytes]] = {}
    counts: dict[str, int] = {}
    for number, _, value, end in fields(data):
        if number != 1:  # not resource_spans
            continue
        resource_spans = data[value:end]
        parts = fields(resource_spans)
        head = [resource_spans[start:stop] for field, start, _, stop in parts if field != 2]
        resource = next((resource_spans[v:e] for field, _, v, e in parts if field == 1), memoryview(b""))
        service_owner = None
        if by_service:
            service = _service(resource)
            service_owner = ring.owner(service)
            if seen is not None:
                seen(service)
        scopes: dict[str, list[bytes]] = {}
        for field, _, scope_value, scope_end in parts:
            if field != 2:  # not scope_spans
                continue
            scope_spans = data[value + scope_value:value + scope_end]
            scope_parts = fields(scope_spans)
            scope_head = [scope_spans[start:stop] for item, start, _, stop in scope_parts if item != 2]
            groups: dict[str, list[memoryview]] = {}
            last_trace, owner = None, service_owner
            for item, start, span_value, stop in scope_parts:
                if item != 2:  # not spans
                    continue
                if service_owner is None:
                    trace_id = _trace_id(scope_spans[span_value:stop])
                    if trace_id != last_trace:  # an SDK sends a trace's spans together: one lookup for them
                        owner, last_trace = ring.owner(trace_id), trace_id
                        if seen is not None:
                            seen(trace_id)
                groups.setdefault(owner, []).append(scope_spans[start:stop])
            for owner, spans in groups.items():
                encoded = b"".join([*scope_head, *spans])
                scopes.setdefault(owner, []).append(b"\x12" + varint(len(encoded)) + encoded)
                counts[owner] = counts.get(owner, 0) + len(spans)
        for owner, encoded_scopes in scopes.items():
            encoded = b"".join([*head, *encoded_scopes])
            requests.setdefault(owner, []).append(b"\x0a" + varint(len(encoded)) + encoded)
    return {owner: (b"".join(parts), counts[owner]) for owner, parts in requests.items()}


async def resolve(host: str, server: str = "") -> list[str]:
    """Every address ``host`` resolves to (A and AAAA), sorted; from ``server`` (HOST:PORT) when given."""
    if server:
        import dns.asyncresolver  # only the loadbalancing exporter with dns_server needs dnspython
        import dns.exception

        resolver = dns.asyncresolver.Resolver(configure=False)
        server_host, server_port = parse_host_port(server)
        resolver.nameservers = [server_host]
        resolver.port = server_port
        answers: list[str] = []
        failure: Exception | None = None
        for record_type in ("A", "AAAA"):
            try:
                answers += [record.to_text() for record in await resolver.resolve(host, record_type, lifetime=5.0)]
            except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
                continue
            except dns.exception.DNSException as exc:  # a server that refuses AAAA, say: the A records still count
                failure = exc
        if failure is not None and not answers:
            raise failure
        return sorted(set(answers))
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def _endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if isinstance(ipaddress.ip_address(address), ipaddress.IPv6Address) else \
        f"{address}:{port}"


class LoadBalancingExporter:
    """One ``[[exporters.loadbalancing]]`` table (see module doc)."""

    def __init__(self, section: LoadBalancingExporterSection, spool: Spool,
                 stats_for: Callable[[str], DeliveryStats]) -> None:
        self.section = section
        self.name = section.name
        self.spool = spool
        self._stats_for = stats_for
        self._headers = {key: expand_env(value) for key, value in section.headers.items()}
        self._by_service = section.routing_key == "service"
        self.ring = HashRing(())
        self.deliveries: dict[str, Delivery] = {}
        self._changing = asyncio.Lock()  # the ring and the backend set change between two routings
        self._router: asyncio.Task[None] | None = None
        self._resolver: asyncio.Task[None] | None = None
        self._stopping = False
        self.stats = stats_for(self.name)  # the router's: batches it could not decode, spans it may resend
        self.membership_changes = 0
        self.last_resolve_error: str | None = None
        self._resolve_problem: str | None = None
        self._recent: deque[bytes] = deque(maxlen=RECENT_KEYS)
        self._used: set[str] = set()  # backend readers this exporter has delivered through

    def readers(self) -> list[tuple[str, str]]:
        """The router's reader of the trace queue, and each current backend's sub-reader of its own queue."""
        return [(self.name, TRACES), *((self._reader(backend), self._reader(backend)) for backend in self.deliveries)]

    def _reader(self, backend: str) -> str:
        return f"{self.name}/{backend}"

    # lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        section = self.section
        if not section.dns:
            await self.set_backends(section.backends)
        self.stats.failing = not len(self.ring)
        self._router = asyncio.create_task(self._route_forever(), name=f"exporter-{self.name}-router")
        if section.dns:  # resolved in the background: a slow DNS server must not hold up the agent's start
            self._resolver = asyncio.create_task(self._resolve_forever(), name=f"exporter-{self.name}-dns")

    async def stop(self) -> None:
        self._stopping = True
        if self._resolver is not None:
            await finish(self._resolver, 5.0)
        if self._router is not None:
            # Let it finish the batches it is routing (appended and acknowledged, or neither), so a clean
            # stop never routes a batch twice; cut short, the next start counts them as possibly resent.
            done, _ = await asyncio.wait({self._router}, timeout=5.0)
            if not done:
                self.spool.interrupted.add(self.name)
                if not await finish(self._router, 5.0):
                    log.error("exporter %s: the router did not stop within 10 s", self.name)
        for delivery in self.deliveries.values():
            await delivery.stop()

    # membership ----------------------------------------------------------------------------------

    def _delivery(self, backend: str) -> Delivery:
        section = self.section
        scheme = "https" if section.tls.enabled else "http"
        tls = dataclasses.asdict(section.tls)
        del tls["enabled"]
        otlp = OtlpExporterSection(
            name=self._reader(backend), endpoint=f"{scheme}://{backend}", protocol=section.protocol,
            headers=section.headers, compression=section.compression, timeout_seconds=section.timeout_seconds,
            max_batch_spans=section.max_batch_spans, max_request_bytes=section.max_request_bytes,
            batch_timeout_seconds=section.batch_timeout_seconds, tls=ClientTlsSection(**tls))
        sender = (GrpcSender if section.protocol == "grpc" else HttpSender)(otlp, self._headers)
        policy = Policy(max_items=section.max_batch_spans, max_request_bytes=section.max_request_bytes,
                        linger_seconds=section.batch_timeout_seconds)
        reader = self._reader(backend)
        self._used.add(reader)
        return Delivery(reader, self.spool, reader, sender, TracesPayload(), policy, self._stats_for(reader))

    async def set_backends(self, backends: Iterable[str]) -> None:
        """Make ``backends`` the set: new ones get a queue and a delivery loop, leaving ones hand their queue over."""
        async with self._changing:
            if tuple(sorted(set(backends))) == self.ring.backends:
                return
            wanted = HashRing(backends)
            if len(self.ring) and len(wanted):
                # Traces routed just before the change whose owner changes: their later spans go to the new
                # owner, so each may arrive split across two backends.
                self.stats.moved += sum(self.ring.owner(key) != wanted.owner(key) for key in set(self._recent))
            leaving = [b for b in self.ring.backends if b not in wanted.backends]
            joining = [b for b in wanted.backends if b not in self.ring.backends]
            self.ring = wanted
            for backend in joining:
                await self.spool.add_reader(self._reader(backend), self._reader(backend))
                self._stats_for(self._reader(backend)).retired = False
                delivery = self._delivery(backend)
                await delivery.start()
                self.deliveries[backend] = delivery
            for backend in leaving:
                await self.deliveries.pop(backend).stop()
                retired = self._stats_for(self._reader(backend))
                retired.retired, retired.failing = True, False
                await self._hand_over(self._reader(backend))
            await self._hand_over_orphans()  # queues that waited for a backend to take them over
            self.stats.failing = not len(wanted)
            if self.membership_changes or leaving or not len(wanted):
                log.info("exporter %s: backends now %s (joined: %s; left: %s)", self.name,
                         ", ".join(wanted.backends) or "none", ", ".join(joining) or "none",
                         ", ".join(leaving) or "none")
            self.membership_changes += 1

    async def _hand_over_orphans(self) -> None:
        """Queues of backends no longer in the set (from an earlier run or config, or left while no backend
        could take them): route them again, once the ring has a backend."""
        if not len(self.ring):
            return
        for reader in self.spool.readers():
            if reader.startswith(f"{self.name}/") and reader.split("/", 1)[1] not in self.deliveries:
                await self._hand_over(reader)

    async def _hand_over(self, reader: str) -> None:
        """Route what ``reader``'s queue still holds over the current ring, then forget the queue."""
        if not len(self.ring):
            log.warning("exporter %s: no backend to take over %s's queue; it waits", self.name, reader)
            return
        moved = 0
        while batches := await self.spool.read(reader, ROUTE_MAX_ITEMS, ROUTE_MAX_BYTES):
            self.stats.resent += self.spool.possibly_resent(reader, batches)
            moved += await self._route_batches(reader, batches)
            await self.spool.ack(reader, batches[-1].id)
        await self.spool.remove_reader(reader)
        if moved:
            log.info("exporter %s: %d spans queued for %s routed to the backends that now own them", self.name,
                     moved, reader.split("/", 1)[1])

    # DNS -----------------------------------------------------------------------------------------

    async def _resolve_or_keep(self) -> list[str]:
        host, port = parse_host_port(self.section.dns)
        try:
            addresses = await resolve(host, self.section.dns_server)
        except Exception as exc:  # a resolver failure keeps the backends we have
            self._note_resolve_problem(f"cannot resolve {host}: {type(exc).__name__}: {exc}", type(exc).__name__)
            return list(self.ring.backends)
        if addresses and self._resolve_problem is not None:
            log.info("exporter %s: %s resolves again", self.name, host)
        self.last_resolve_error = self._resolve_problem = None
        return [_endpoint(address, port) for address in addresses]

    def _note_resolve_problem(self, message: str, kind: str) -> None:
        """Log a DNS problem once per kind (a timeout's text changes with its duration), keep it for status."""
        if kind != self._resolve_problem:
            log.warning("exporter %s: %s; keeping %d backend(s)", self.name, message, len(self.ring))
        self._resolve_problem = kind
        self.last_resolve_error = message

    async def _resolve_forever(self) -> None:
        while not self._stopping:
            backends = await self._resolve_or_keep()
            if backends or not self.ring.backends:
                if not backends and self.last_resolve_error is None:
                    self._note_resolve_problem(f"{self.section.dns} resolves to no address", "no address")
                await self.set_backends(backends)
            else:  # a name that resolves to nothing for a moment must not strand every queue
                self._note_resolve_problem(f"{self.section.dns} resolved to no address", "no address")
            await asyncio.sleep(self.section.dns_interval_seconds)

    # routing -------------------------------------------------------------------------------------

    async def _route_forever(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                batches = await self.spool.read(self.name, ROUTE_MAX_ITEMS, ROUTE_MAX_BYTES)
                if not batches:
                    await self.spool.wait_for_new(self.name, timeout=1.0)
                    continue
                if not len(self.ring):  # no backend yet (DNS): the spans wait in the trace queue
                    await asyncio.sleep(1.0)
                    continue
                self.stats.resent += self.spool.possibly_resent(self.name, batches)
                async with self._changing:
                    await self._route_batches(self.name, batches)
                await self.spool.ack(self.name, batches[-1].id)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a full disk, say: nothing was acknowledged, so nothing is lost
                failures += 1
                if failures == 1:
                    log.error("exporter %s: routing failed: %s; retrying", self.name, exc,
                              exc_info=not isinstance(exc, SpoolError))
                await asyncio.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)))

    async def _route_batches(self, reader: str, batches: list[Batch]) -> int:
        """Append each batch's spans to their owners' queues (one commit); return the spans routed."""
        shares: dict[str, list[bytes]] = {}
        counts: dict[str, int] = {}
        only = self.ring.backends[0] if len(self.ring) == 1 else None
        for batch in batches:
            if only is not None:  # one backend owns everything: no need to decode
                shares.setdefault(only, []).append(batch.body)
                counts[only] = counts.get(only, 0) + batch.items
                continue
            try:
                parts = route(batch.body, self.ring, self._by_service, self._recent.append)
            except ValueError as exc:
                await self.spool.set_aside(reader, batch.id, batch.body, batch.items, "undecodable", str(exc))
                continue
            for owner, (body, spans) in parts.items():
                shares.setdefault(owner, []).append(body)
                counts[owner] = counts.get(owner, 0) + spans
        await asyncio.gather(*(self.spool.append(b"".join(bodies), counts[owner], self._reader(owner))
                               for owner, bodies in shares.items()))
        return sum(counts.values())

    # reload ---------------------------------------------------------------------------------------

    def accepts(self, section: LoadBalancingExporterSection) -> bool:
        """Whether ``section`` differs from this exporter's only in its backends (list or DNS), which
        ``reconfigure`` applies in place: the other backends' deliveries go on uncut."""
        membership = {"backends": (), "dns": "", "dns_interval_seconds": 0.0, "dns_server": ""}
        return dataclasses.replace(section, **membership) == dataclasses.replace(self.section, **membership)

    async def reconfigure(self, section: LoadBalancingExporterSection) -> None:
        if self._resolver is not None:
            self._resolver.cancel()
            await asyncio.gather(self._resolver, return_exceptions=True)
            self._resolver = None
        self.section = section
        await self.set_backends(await self._resolve_or_keep() if section.dns else section.backends)
        if section.dns:
            self._resolver = asyncio.create_task(self._resolve_forever(), name=f"exporter-{self.name}-dns")

    # observability -------------------------------------------------------------------------------

    def _known_stats(self) -> list[tuple[str, DeliveryStats]]:
        """Every backend's counters this exporter has used, those that left included."""
        return [(reader, self._stats_for(reader)) for reader in sorted(self._used)]

    def families(self) -> Iterator[Metric]:
        moved = CounterMetricFamily("sidetrace_exporter_moved_traces_total",
                                    "Traces routed just before a change of the backend set whose owner changed: "
                                    "their later spans go to the new owner, so each may arrive split.",
                                    labels=["exporter"])
        moved.add_metric([self.name], self.stats.moved)
        yield moved

    def status(self) -> dict[str, Any]:
        backends = {backend: delivery.status() for backend, delivery in self.deliveries.items()}
        failing = [f"{backend}: {state['last_error']}" for backend, state in backends.items()
                   if state["state"] == "failing"]
        state = "failing" if failing or not backends else "running"
        error = "; ".join(failing) or self.last_resolve_error or (None if backends else "no backend")
        sent = sum(stats.sent for reader, stats in self._known_stats())
        return {"state": state if not self._stopping else "stopped", "sent": sent, "last_error": error,
                "last_error_at": None, "backends": backends,
                "oldest_unsent_age_seconds": round(max([self.spool.oldest_unsent_age(self.name),
                                                        *(s["oldest_unsent_age_seconds"] for s in backends.values())]),
                                                   1),
                "endpoint": self.section.dns or ", ".join(self.section.backends), "protocol": self.section.protocol}
