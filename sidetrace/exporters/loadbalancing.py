"""Load-balancing exporter: spans routed by trace id (or by service) over a set of OTLP backends.

As the OpenTelemetry Collector's ``loadbalancingexporter`` does, every span of a trace goes to the
same backend, so a tail sampler in a collector tier sees whole traces. Backends come from a static
list or from DNS (every address of a name, resolved again every ``dns_interval_seconds``), placed on
a consistent-hash ring: a change of the backend set moves about 1/N of the traces and no more.

Durability is the spool's, as for every exporter. The trace pipeline hands each accepted request to
``routing``, which splits it by owner; each part is appended to that backend's own queue
(``NAME/HOST:PORT``) in the same spool transaction that acknowledges the request, so a span is
written once and nothing is acknowledged before it is on disk. One backend down holds up only its
own share, which waits on disk (bounded by ``[spool] max_bytes``). Each backend's queue is delivered
by the shared delivery loop (``delivery.py``) with the OTLP senders, so errors are classified and
counted as for ``[[exporters.otlp]]``. While no backend is known (DNS not answered yet, or answering
nothing), requests wait whole in ``NAME/unrouted``.

At a change of the backend set, requests routed on the old ring are committed (or refused) before
the queues of the backends that left are read again: what those queues (and ``NAME/unrouted``) hold
is routed over the new ring and appended to the queues of the backends that now own it, then
acknowledged; if the agent dies in between, it is routed again at the next start (its spans may be
sent twice, and are counted in ``sidetrace_exporter_resent_spans_total``). So are the spans of a request
in flight to a leaving backend that was not answered within the stop's grace (or whose last attempt
timed out): it may still take them, and they are routed to the new owners too. A spool written before routing at
accept time may still hold spans in the trace queue under this exporter's cursor (``NAME``): they
are routed once, in the background from the start on (a large backlog does not delay the start), then
that cursor is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from sidetrace.exporters.delivery import MAX_UNREACHABLE_BACKOFF, Delivery, DeliveryStats, Policy
from sidetrace.exporters.otlp import GrpcSender, HttpSender, TracesPayload
from sidetrace.exporters.spool import TRACES, Batch, Spool, SpoolError

log = logging.getLogger("sidetrace.exporter")

VIRTUAL_NODES = 4096  # ring positions per backend: shares within a few percent of 1/N (measured)
ROUTE_MAX_ITEMS = 16_384
ROUTE_MAX_BYTES = 16 * 1024 * 1024
RECENT_KEYS = 8192  # trace ids (or services) last routed, to count those a membership change moves
UNROUTED = "unrouted"  # the sub-queue requests wait in while no backend is known (never a HOST:PORT)


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


class _Routes:
    """The ring accepted requests are split by, and the appends routed on each ring not yet committed.

    Shared by an exporter and the one a reload builds to replace it, so requests routed by either
    follow one ring and a hand-over waits for both.
    """

    def __init__(self) -> None:
        self.ring = HashRing(())
        self.recent: deque[bytes] = deque(maxlen=RECENT_KEYS)
        self._epoch = 0
        self._inflight: dict[int, int] = {}  # ring epoch -> appends routed on it, not yet committed or refused
        self._waiters: list[asyncio.Future[None]] = []

    def enter(self) -> int:
        self._inflight[self._epoch] = self._inflight.get(self._epoch, 0) + 1
        return self._epoch

    def leave(self, epoch: int) -> None:
        self._inflight[epoch] -= 1
        if not self._inflight[epoch]:
            del self._inflight[epoch]
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def switch(self, ring: HashRing) -> None:
        """Route on ``ring`` from now on; return once every append routed on an earlier ring is done."""
        self.ring = ring
        self._epoch += 1
        while any(epoch < self._epoch for epoch in self._inflight):
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter


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
        self._routes = _Routes()
        self.deliveries: dict[str, Delivery] = {}
        self._changing = asyncio.Lock()  # one change of the backend set at a time
        self._resolver: asyncio.Task[None] | None = None
        self._upgrade: asyncio.Task[None] | None = None  # routing a pre-upgrade trace-queue backlog
        self._upgrade_through = 0  # the last trace-queue batch id of its current step
        self._stopping = False
        self.stats = stats_for(self.name)  # the router's: batches it could not decode, spans it may resend
        self.membership_changes = 0
        self.last_resolve_error: str | None = None
        self._resolve_problem: str | None = None  # the kind of the DNS problem last logged, until it resolves again
        self._lookup_failed = False  # the last lookup failed (rather than answering no address)
        self._used: set[str] = set()  # backend readers this exporter has delivered through

    @property
    def ring(self) -> HashRing:
        return self._routes.ring

    def readers(self) -> list[tuple[str, str]]:
        """Each current backend's sub-reader of its own queue."""
        return [(self._reader(backend), self._reader(backend)) for backend in self.deliveries]

    def resumed_readers(self) -> list[tuple[str, str]]:
        """The trace-queue cursor of a spool written before routing at accept time, kept only if the spool has it;
        registered at open, it also brings back its sub-readers' cursors."""
        return [(self.name, TRACES)]

    def _reader(self, backend: str) -> str:
        return f"{self.name}/{backend}"

    def adopt(self, previous: object) -> None:
        """Take over the ring of the exporter of the same name this one replaces at a reload."""
        if isinstance(previous, LoadBalancingExporter):
            self._routes = previous._routes
            self.membership_changes = previous.membership_changes

    # accepting -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def routing(self, body: bytes, spans: int) -> Iterator[list[tuple[str, bytes, int]]]:
        """``body`` (an accepted ExportTraceServiceRequest, ``spans`` spans) split into (queue, body, spans)
        parts, to append in one spool transaction before the context exits."""
        routes = self._routes
        ring = routes.ring
        if not len(ring):
            parts = [(self._reader(UNROUTED), body, spans)]
        elif len(ring) == 1:  # one backend owns everything: no need to decode
            parts = [(self._reader(ring.backends[0]), body, spans)]
        else:
            try:
                shares = route(body, ring, self._by_service, routes.recent.append)
            except ValueError:  # the receiver decoded it; should it happen, the backend's answer decides
                shares = {ring.owner(b""): (body, spans)}
            parts = [(self._reader(owner), part, count) for owner, (part, count) in shares.items()]
        epoch = routes.enter()
        try:
            yield parts
        finally:
            routes.leave(epoch)

    # lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        section = self.section
        if not section.dns:
            await self.set_backends(section.backends)
        if not len(self.ring):  # DNS not asked yet
            await self._wait_unrouted()
        self.stats.failing = not len(self.ring)
        if self.name in self.spool.readers():  # in the background: a large old backlog must not hold up the start
            self._upgrade = asyncio.create_task(self._route_legacy(), name=f"exporter-{self.name}-upgrade")
        if section.dns:  # resolved in the background: a slow DNS server must not hold up the agent's start
            self._resolver = asyncio.create_task(self._resolve_forever(), name=f"exporter-{self.name}-dns")

    async def stop(self) -> None:
        """Stop resolving and delivering; return once every request routed so far is committed or refused."""
        self._stopping = True
        if self._upgrade is not None:  # ends after the step it is in, so nothing it routed is routed again
            await asyncio.wait({self._upgrade}, timeout=5.0)
            if not self._upgrade.done():
                log.error("exporter %s: routing the trace queue's backlog did not stop within 5 s", self.name)
                self.spool.mark_unsure(self.name, self._upgrade_through)
                await finish(self._upgrade, 1.0)
        if self._resolver is not None:
            await finish(self._resolver, 5.0)
        await asyncio.gather(*(delivery.stop() for delivery in self.deliveries.values()))
        await self.settled()

    async def settled(self) -> None:
        """Return once every request routed so far (by this exporter or the one it replaced) is committed or refused."""
        await self._routes.switch(self._routes.ring)

    async def _wait_unrouted(self) -> None:
        """Give requests a queue to wait in while no backend is known."""
        await self.spool.add_reader(self._reader(UNROUTED), self._reader(UNROUTED))

    async def _route_legacy(self) -> None:
        """Route what the trace queue still holds for this exporter (a spool from before routing at accept time),
        then remove its cursor there, keeping the backends'. Runs beside new requests, which go straight to the
        backends' queues; a stop ends it between steps, and the next start goes on from the cursor."""
        routed = failures = 0
        while not self._stopping:
            try:
                # A change of the backend set waits for the step, so nothing is routed to a queue handed over.
                async with self._changing:
                    batches = await self.spool.read(self.name, ROUTE_MAX_ITEMS, ROUTE_MAX_BYTES)
                    if not batches:
                        await self.spool.remove_reader(self.name, keep_sub_readers=True)
                        log.info("exporter %s: routed %d spans the trace queue held from before the upgrade",
                                 self.name, routed)
                        return
                    self._upgrade_through = batches[-1].id
                    self.stats.resent += self.spool.possibly_resent(self.name, batches)
                    routed += await self._route_batches(self.name, batches)
                    failures = 0
            except Exception as exc:  # a full or failing disk (or a bug): the backlog waits under its cursor
                if not failures:
                    log.error("exporter %s: routing the trace queue's backlog: %s; retrying", self.name, exc,
                              exc_info=not isinstance(exc, SpoolError))
                failures += 1
                await asyncio.sleep(min(MAX_UNREACHABLE_BACKOFF, 0.1 * 2 ** failures))

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
            wanted = HashRing(backends)
            current = self.ring
            if wanted.backends == current.backends and set(self.deliveries) == set(wanted.backends):
                return
            if len(current) and len(wanted):
                # Traces routed just before the change whose owner changes: their later spans go to the new
                # owner, so each may arrive split across two backends.
                self.stats.moved += sum(current.owner(key) != wanted.owner(key) for key in set(self._routes.recent))
            leaving = [b for b in current.backends if b not in wanted.backends]
            joining = [b for b in wanted.backends if b not in self.deliveries]
            for backend in joining:  # each queue has its reader before the first request is routed to it
                await self.spool.add_reader(self._reader(backend), self._reader(backend))
                self._stats_for(self._reader(backend)).retired = False
                delivery = self._delivery(backend)
                await delivery.start()
                self.deliveries[backend] = delivery
            if not len(wanted):
                await self._wait_unrouted()
            await self._routes.switch(wanted)  # requests routed on the old ring are on disk from here on
            for backend in leaving:
                delivery = self.deliveries.pop(backend, None)
                if delivery is not None:
                    await delivery.stop()
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
        could take them), and requests that waited for a backend: route them again, once the ring has one."""
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
        await self.spool.remove_reader(reader)
        if moved:
            log.info("exporter %s: %d spans queued for %s routed to the backends that now own them", self.name,
                     moved, reader.split("/", 1)[1])

    # DNS -----------------------------------------------------------------------------------------

    async def _resolve_or_keep(self) -> list[str]:
        host, port = parse_host_port(self.section.dns)
        self._lookup_failed = False
        try:
            addresses = await resolve(host, self.section.dns_server)
        except Exception as exc:  # a resolver failure keeps the backends we have
            self._note_resolve_problem(f"cannot resolve {host}: {type(exc).__name__}: {exc}", type(exc).__name__)
            self._lookup_failed = True
            return list(self.ring.backends)
        if addresses:  # an empty answer keeps the problem noted, so it is logged once, not at every lookup
            if self._resolve_problem is not None:
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
                if not backends and not self._lookup_failed:
                    self._note_resolve_problem(f"{self.section.dns} resolves to no address", "no address")
                await self.set_backends(backends)
            elif not self._lookup_failed:  # a name that resolves to nothing for a moment must not strand every queue
                self._note_resolve_problem(f"{self.section.dns} resolved to no address", "no address")
            await asyncio.sleep(self.section.dns_interval_seconds)

    # routing -------------------------------------------------------------------------------------

    async def _route_batches(self, reader: str, batches: list[Batch]) -> int:
        """Append each batch's spans to their owners' queues (one commit), then acknowledge the batches; return
        the spans routed. With no backend known, they go whole to the queue of requests waiting for one."""
        shares: dict[str, list[bytes]] = {}
        counts: dict[str, int] = {}
        ring = self.ring
        for batch in batches:
            if len(ring) <= 1:
                parts = {ring.backends[0] if len(ring) else UNROUTED: (batch.body, batch.items)}
            else:
                try:
                    parts = route(batch.body, ring, self._by_service, self._routes.recent.append)
                except ValueError as exc:
                    await self.spool.set_aside(reader, batch.id, batch.body, batch.items, "undecodable", str(exc))
                    continue
            for owner, (body, spans) in parts.items():
                shares.setdefault(owner, []).append(body)
                counts[owner] = counts.get(owner, 0) + spans
        await self.spool.append_all([(self._reader(owner), b"".join(bodies), counts[owner])
                                     for owner, bodies in shares.items()])
        await self.spool.ack(reader, batches[-1].id)
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
        failed_at = [s["last_error_at"] for s in backends.values() if s["state"] == "failing" and s["last_error_at"]]
        # Every queue of this exporter: the backends', requests waiting for one, a share waiting to be handed over,
        # and a pre-upgrade backlog in the trace queue.
        queues = [reader for reader in self.spool.readers() if reader.split("/", 1)[0] == self.name]
        return {"state": state if not self._stopping else "stopped", "sent": sent, "last_error": error,
                "last_error_at": max(failed_at, default=None), "backends": backends,
                "oldest_unsent_age_seconds": round(max([0.0, *map(self.spool.oldest_unsent_age, queues)]), 1),
                "endpoint": self.section.dns or ", ".join(self.section.backends), "protocol": self.section.protocol}
