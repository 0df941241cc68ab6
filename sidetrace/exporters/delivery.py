"""The one delivery loop every exporter runs: read, linger, send, classify, retry, split, set aside, acknowledge.

An exporter supplies a Sender (send one request and classify the backend's answer into a Verdict)
and a Payload (join and split bodies of its kind); the rest, and every counter, is here, as the
OpenTelemetry Collector's exporterhelper is for its exporters.

What happens to a batch, by verdict:
- DELIVERED: acknowledged in the spool (a ``partial_success`` is counted as rejected items).
- RETRY (the backend is busy or away: gRPC UNAVAILABLE, HTTP 503, a timeout, ...): sent again after
  exponential backoff with jitter, or after the Retry-After / RetryInfo delay, never sooner than
  ``MIN_RETRY_DELAY`` so a delay of 0 cannot spin. No give-up deadline: the data waits on disk.
- FAULT (the backend's or the config's fault: HTTP 404 or 500, gRPC UNIMPLEMENTED, bad credentials,
  TLS): the same, with backoff up to ``MAX_FAULT_BACKOFF``; the exporter shows as failing with the
  last answer. Never set aside.
- A refused connection (a backend restarting, a collector being replaced), whatever its verdict, backs
  off no more than ``MAX_UNREACHABLE_BACKOFF``: trying costs the backend nothing, and its share flows
  within seconds of its return.
- TOO_LARGE (HTTP 413, RESOURCE_EXHAUSTED without RetryInfo): split in halves, by batches and then
  by items, until the parts pass; a single item the backend still calls too large is set aside.
- BAD_DATA (HTTP 400, INVALID_ARGUMENT): split by batches to find the one at fault, which alone is
  set aside; a body that cannot be decoded is set aside too.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sidetrace._aio import finish
from sidetrace.exporters.spool import Batch, Spool, SpoolError

log = logging.getLogger("sidetrace.exporter")

MAX_RETRY_AFTER = 300.0
MIN_RETRY_DELAY = 0.2
MAX_FAULT_BACKOFF = 120.0
MAX_UNREACHABLE_BACKOFF = 3.0
STOP_GRACE_SECONDS = 2.0
_REMEMBERED_MESSAGES = 256


class Verdict(Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    FAULT = "fault"
    TOO_LARGE = "too_large"
    BAD_DATA = "bad_data"


# The failure reasons every exporter can meet whatever its backend answers (the backend's own answers, http_503 or
# grpc_unavailable, are open-ended and appear when first met); exported at 0 from the start.
SEND_FAILURE_REASONS = ("connection_refused", "connection_lost", "timeout", "tls")
# Failures after which the request may have reached the backend all the same (no answer within the deadline, the
# connection lost with the request sent): sending its items again may duplicate them, so they count as resent.
UNKNOWN_OUTCOME_REASONS = frozenset({"timeout", "connection_lost"})


@dataclass(frozen=True)
class Answer:
    """A backend's answer to one request, as the exporter reads it."""

    verdict: Verdict
    reason: str = ""  # a metric label from a fixed set: http_503, grpc_unavailable, connection_refused, tls, ...
    detail: str = ""  # the backend's own words, for logs and status
    retry_after: float | None = None  # Retry-After / RetryInfo, when the backend gave one
    rejected: int = 0  # items a partial success reports as rejected
    about_size: bool = False  # a refusal that names the request's size
    # The request provably did not reach the backend whole (the connection failed while it was being written):
    # sending it again cannot make a duplicate, whatever the reason.
    incomplete: bool = False


class Sender(Protocol):
    async def send(self, body: bytes) -> Answer: ...

    async def close(self) -> None: ...


class Payload(Protocol):
    """How bodies of one kind (OTLP traces, remote-write requests) are joined and split."""

    def join(self, bodies: list[bytes]) -> bytes: ...

    def split(self, body: bytes) -> list[tuple[bytes, int]]:
        """Two or more parts of ``body`` with their item counts; [] for a single item. ValueError if undecodable."""
        ...


@dataclass(frozen=True)
class Policy:
    """Limits and timing of one exporter's requests."""

    max_items: int
    max_request_bytes: int
    linger_seconds: float = 0.0
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    max_fault_backoff: float = MAX_FAULT_BACKOFF
    max_unreachable_backoff: float = MAX_UNREACHABLE_BACKOFF

    def backoff(self, attempt: int, fault: bool, unreachable: bool = False) -> float:
        """Exponential backoff with jitter: between half and all of min(cap, initial * 2**attempt); the cap is
        lower for a backend that refused the connection."""
        cap = self.max_fault_backoff if fault else self.max_backoff
        if unreachable:
            cap = min(cap, self.max_unreachable_backoff)
        ceiling = min(cap, self.initial_backoff * 2 ** min(attempt, 20))
        return random.uniform(ceiling / 2, ceiling)


@dataclass
class DeliveryStats:
    """One exporter's counters; kept across a restart of the exporter (a reload that changes it)."""

    unit: str = "spans"  # what an item is: spans (trace exporters) or samples (remote_write)
    sent: int = 0
    failed: int = 0
    rejected: int = 0
    retries: int = 0
    resent: int = 0
    moved: int = 0  # a load-balancing router's: traces whose owner a membership change moved
    retired: bool = False  # a load-balancing backend that left the set: its own series are no longer exported
    failures: dict[str, int] = field(default_factory=dict)
    failing: bool = False
    last_error: str | None = None
    last_error_at: float | None = None
    _partial_messages: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def first_time(self, message: str) -> bool:
        """Whether ``message`` (a partial success's) is new; remembers a bounded number of them."""
        if message in self._partial_messages:
            self._partial_messages.move_to_end(message)
            return False
        self._partial_messages[message] = None
        if len(self._partial_messages) > _REMEMBERED_MESSAGES:
            self._partial_messages.popitem(last=False)
        return True


@dataclass
class _Part:
    """What one request carries: whole spool batches, or a piece of one batch after a split."""

    batches: list[Batch]
    items: int
    body: bytes | None = None  # None: the batches' bodies joined

    @classmethod
    def of(cls, batches: list[Batch]) -> _Part:
        return cls(batches, sum(b.items for b in batches))


class Delivery:
    """Delivers one spool reader's batches through ``sender`` until stopped (see module doc)."""

    def __init__(self, name: str, spool: Spool, queue: str, sender: Sender, payload: Payload, policy: Policy,
                 stats: DeliveryStats) -> None:
        self.name = name
        self.spool = spool
        self.queue = queue
        self.sender = sender
        self.payload = payload
        self.policy = policy
        self.stats = stats
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._sending = False
        self._unacknowledged = False  # a part was delivered and its batches are not yet acknowledged
        self._reading: list[Batch] = []  # the batches of the current step, until acknowledged
        self._unknown_through = 0  # highest batch id an attempt with an unknown outcome carried
        self.state = "created"

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"exporter-{self.name}")
        self.state = "running"

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop sending. A request in flight gets up to ``STOP_GRACE_SECONDS`` to be answered and acknowledged
        (or a reload that restarts the exporter would send it again); one cut short is marked so that the next
        start counts it as possibly resent."""
        self._stopping = True
        deadline = time.monotonic() + min(timeout, STOP_GRACE_SECONDS)
        while (self._sending or self._unacknowledged) and self._task is not None and not self._task.done() \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._sending or self._unacknowledged:
            # Cut short: the batches of this step may have reached the backend. Whoever reads them next (this
            # reader restarted by a reload, the backends a load-balancing exporter hands them to, or the next
            # run) counts them as resent.
            self.spool.mark_unsure(self.name, self._reading[-1].id if self._reading else 0)
        elif self._unknown_through:  # an attempt's outcome is unknown (timed out): those batches may have arrived
            self.spool.mark_unsure(self.name, self._unknown_through)
        if self._task is not None and not await finish(self._task, timeout):
            log.error("exporter %s did not stop within %.0f s", self.name, timeout)
        await self.sender.close()
        self.state = "stopped"

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                await self._step()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug or a disk error must not end delivery for good
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                self.stats.last_error_at = time.time()
                if failures == 0:
                    log.error("exporter %s: %s; retrying", self.name, self.stats.last_error,
                              exc_info=not isinstance(exc, SpoolError))
                failures += 1
                await asyncio.sleep(self.policy.backoff(failures, fault=True))

    async def _step(self) -> None:
        policy = self.policy
        batches = await self.spool.read(self.name, policy.max_items, policy.max_request_bytes)
        if not batches:
            await self.spool.wait_for_new(self.name, timeout=5.0)
            return
        linger = batches[0].received_at + policy.linger_seconds - time.time()
        if linger > 0 and sum(b.items for b in batches) < policy.max_items:
            # A partial request: let more items join it (one call and one ack instead of many), as the
            # Collector's batch processor does; the data is already safe on disk meanwhile.
            await asyncio.sleep(linger)
            batches = await self.spool.read(self.name, policy.max_items, policy.max_request_bytes)
        self.stats.resent += self.spool.possibly_resent(self.name, batches)
        self._reading = batches
        await self._deliver(batches)
        await self._ack(batches[-1].id)
        self._unacknowledged = False
        self._reading = []
        self._unknown_through = 0

    async def _ack(self, last_id: int) -> None:
        """Acknowledge until the spool takes it: reading on first would send the batches again."""
        attempt = 0
        while True:
            try:
                await self.spool.ack(self.name, last_id)
                return
            except SpoolError as exc:
                if attempt == 0:
                    log.error("exporter %s: %s; retrying the acknowledgement", self.name, exc)
                attempt += 1
                await asyncio.sleep(self.policy.backoff(attempt, fault=True))

    def _still_queued(self, part: _Part) -> _Part | None:
        """``part`` without the batches the spool dropped at its bound while we retried (counted there)."""
        dropped = self.spool.dropped_through.get(self.queue, 0)
        if part.batches[-1].id > dropped:
            if part.batches[0].id > dropped:
                return part
            if part.body is None:
                return _Part.of([b for b in part.batches if b.id > dropped])
        return None

    async def _deliver(self, batches: list[Batch]) -> None:
        """Send ``batches`` until every part is delivered or set aside."""
        work = [_Part.of(batches)]
        attempt = 0
        while work:
            part = self._still_queued(work[0])
            if part is None:
                work.pop(0)
                continue
            work[0] = part
            body = part.body if part.body is not None else self.payload.join([b.body for b in part.batches])
            if len(body) > self.policy.max_request_bytes:
                pieces = await self._divide(part, body, below_batch=True)
                if pieces is None:
                    work.pop(0)
                    continue
                if pieces:
                    work[0:1] = pieces
                    continue
            again = 0  # items an earlier attempt with an unknown outcome may have delivered
            if part.batches[0].id <= self._unknown_through:
                again = part.items if part.body is not None else \
                    sum(b.items for b in part.batches if b.id <= self._unknown_through)
            # Only a request in flight may have reached the backend: a stop during a backoff wait sent nothing.
            self._sending = True
            try:
                answer = await self.sender.send(body)
            finally:
                self._sending = False
            verdict = answer.verdict
            if again and (verdict is Verdict.DELIVERED or (answer.reason in UNKNOWN_OUTCOME_REASONS
                                                           and not answer.incomplete)):
                # This attempt may have reached the backend too: a possible duplicate. One it refused (a refused
                # connection, an error answer, a request cut off while written) cannot be.
                self.stats.resent += again
            if verdict is Verdict.DELIVERED:
                self._unacknowledged = True
                self._delivered(part, answer, attempt)
                work.pop(0)
                attempt = 0
                continue
            self._failed(part, answer)
            if answer.reason in UNKNOWN_OUTCOME_REASONS and not answer.incomplete:
                self._unknown_through = max(self._unknown_through, part.batches[-1].id)
            if verdict in (Verdict.TOO_LARGE, Verdict.BAD_DATA):
                pieces = await self._divide(part, body, below_batch=verdict is Verdict.TOO_LARGE)
                if pieces is None:
                    work.pop(0)
                    continue
                if pieces:
                    work[0:1] = pieces
                    continue
                if verdict is Verdict.BAD_DATA or answer.about_size:
                    await self._set_aside(part, body, "rejected" if verdict is Verdict.BAD_DATA else "too_large",
                                          answer.detail)
                    work.pop(0)
                    continue
                # A lone item refused with no word of its size: a backend that is overloaded, not data at fault.
                verdict = Verdict.FAULT
            delay = self.policy.backoff(attempt, fault=verdict is Verdict.FAULT,
                                        unreachable=answer.reason == "connection_refused")
            if answer.retry_after is not None:
                delay = max(MIN_RETRY_DELAY, answer.retry_after)
            attempt += 1
            self.stats.retries += 1
            await asyncio.sleep(min(delay, MAX_RETRY_AFTER))

    async def _divide(self, part: _Part, body: bytes, below_batch: bool) -> list[_Part] | None:
        """``_split``, or None once ``part`` was set aside because its body cannot be decoded."""
        try:
            return self._split(part, body, below_batch)
        except ValueError as exc:
            await self._set_aside(part, body, "undecodable", str(exc))
            return None

    def _split(self, part: _Part, body: bytes, below_batch: bool) -> list[_Part]:
        """Halves of ``part``: by batches while it has several, then (``below_batch``) by items."""
        if part.body is None and len(part.batches) > 1:
            middle = len(part.batches) // 2
            return [_Part.of(part.batches[:middle]), _Part.of(part.batches[middle:])]
        if not below_batch:
            return []
        return [_Part(part.batches, items, piece) for piece, items in self.payload.split(body)]

    def _delivered(self, part: _Part, answer: Answer, attempt: int) -> None:
        stats = self.stats
        stats.sent += part.items - answer.rejected
        if answer.rejected:
            stats.rejected += answer.rejected
            if stats.first_time(answer.detail):
                log.warning("exporter %s: the backend rejected %d of %d items: %s (each distinct message is logged "
                            "once; counted in sidetrace_exporter_rejected_spans_total)", self.name, answer.rejected,
                            part.items, answer.detail)
        if stats.failing:
            log.info("exporter %s: delivering again after %d retries", self.name, attempt)
        stats.failing = False

    def _failed(self, part: _Part, answer: Answer) -> None:
        stats = self.stats
        stats.failed += part.items
        stats.failures[answer.reason] = stats.failures.get(answer.reason, 0) + 1
        message = f"{answer.reason}: {answer.detail}" if answer.detail else answer.reason
        if not stats.failing or message != stats.last_error:
            log.warning("exporter %s: send failed (%s); the data stays in the spool", self.name, message)
        stats.failing = True
        stats.last_error = message
        stats.last_error_at = time.time()

    async def _set_aside(self, part: _Part, body: bytes, reason: str, detail: str) -> None:
        await self.spool.set_aside(self.name, part.batches[0].id, body, part.items, reason, detail)

    def status(self) -> dict[str, Any]:
        stats = self.stats
        state = "failing" if stats.failing and self.state == "running" else self.state
        return {"state": state, "sent": stats.sent, "last_error": stats.last_error,
                "last_error_at": stats.last_error_at,
                "oldest_unsent_age_seconds": round(self.spool.oldest_unsent_age(self.name), 1)}


def delivery_families(deliveries: list[tuple[str, DeliveryStats]]) -> Iterator[Metric]:
    """The per-exporter counters of trace exporters, one family each with an ``exporter`` label.

    A reader named ``exporter/backend`` (a load-balancing exporter's share for one backend) adds to its
    exporter's series, and has its own in the ``sidetrace_exporter_backend_*`` families.
    """
    per_exporter: dict[str, DeliveryStats] = {}
    backends = CounterMetricFamily("sidetrace_exporter_backend_sent_spans_total",
                                   "Spans a load-balancing exporter's backend accepted.",
                                   labels=["exporter", "backend"])
    backend_failed = CounterMetricFamily("sidetrace_exporter_backend_send_failed_spans_total",
                                         "Spans in send attempts to a load-balancing exporter's backend that failed.",
                                         labels=["exporter", "backend"])
    backend_failing = GaugeMetricFamily("sidetrace_exporter_backend_failing",
                                        "1 while the last send attempt to a load-balancing exporter's backend failed.",
                                        labels=["exporter", "backend"])
    samples = [(name, stats) for name, stats in deliveries if stats.unit == "samples"]
    deliveries = [(name, stats) for name, stats in deliveries if stats.unit != "samples"]
    for name, stats in deliveries:
        exporter, _, backend = name.partition("/")
        total = per_exporter.setdefault(exporter, DeliveryStats())
        total.sent += stats.sent
        total.failed += stats.failed
        total.rejected += stats.rejected
        total.retries += stats.retries
        total.resent += stats.resent
        total.failing = total.failing or stats.failing
        for reason, count in stats.failures.items():
            total.failures[reason] = total.failures.get(reason, 0) + count
        if backend and not stats.retired:
            backends.add_metric([exporter, backend], stats.sent)
            backend_failed.add_metric([exporter, backend], stats.failed)
            backend_failing.add_metric([exporter, backend], 1 if stats.failing else 0)
    sent = CounterMetricFamily("sidetrace_exporter_sent_spans_total", "Spans the backend accepted.",
                               labels=["exporter"])
    failed = CounterMetricFamily("sidetrace_exporter_send_failed_spans_total",
                                 "Spans in send attempts that failed (retried, split or set aside).",
                                 labels=["exporter"])
    rejected = CounterMetricFamily("sidetrace_exporter_rejected_spans_total",
                                   "Spans the backend reported as rejected in a partial success.", labels=["exporter"])
    retries = CounterMetricFamily("sidetrace_exporter_retries_total", "Send attempts retried.", labels=["exporter"])
    resent = CounterMetricFamily("sidetrace_exporter_resent_spans_total",
                                 "Spans sent again whose earlier delivery may have succeeded unconfirmed (a deadline "
                                 "exceeded, a connection lost, a stop or crash mid-send, a load-balancing hand-over "
                                 "after one): possible duplicates.", labels=["exporter"])
    failures = CounterMetricFamily("sidetrace_exporter_send_failures_total",
                                   "Send attempts that failed, by the backend's answer (http_503, grpc_unimplemented, "
                                   "connection_refused, timeout, tls, ...).",
                                   labels=["exporter", "reason"])
    failing = GaugeMetricFamily("sidetrace_exporter_failing", "1 while the exporter's last send attempt failed.",
                                labels=["exporter"])
    for name, stats in per_exporter.items():
        sent.add_metric([name], stats.sent)
        failed.add_metric([name], stats.failed)
        rejected.add_metric([name], stats.rejected)
        resent.add_metric([name], stats.resent)
    for name, stats in [*per_exporter.items(), *samples]:  # attempts and answers are the same for every kind
        retries.add_metric([name], stats.retries)
        failing.add_metric([name], 1 if stats.failing else 0)
        for reason, count in sorted({**dict.fromkeys(SEND_FAILURE_REASONS, 0), **stats.failures}.items()):
            failures.add_metric([name, reason], count)
    yield from (sent, failed, rejected, retries, resent, failures, failing, backends, backend_failed, backend_failing)
    yield from _sample_families(samples)


def _sample_families(deliveries: list[tuple[str, DeliveryStats]]) -> Iterator[Metric]:
    """The item counters of remote-write exporters, whose items are samples."""
    sent = CounterMetricFamily("sidetrace_exporter_sent_samples_total", "Samples the store accepted.",
                               labels=["exporter"])
    failed = CounterMetricFamily("sidetrace_exporter_send_failed_samples_total",
                                 "Samples in send attempts that failed (retried, split or set aside).",
                                 labels=["exporter"])
    resent = CounterMetricFamily("sidetrace_exporter_resent_samples_total",
                                 "Samples sent again whose earlier delivery may have succeeded unconfirmed (possible "
                                 "duplicates).",
                                 labels=["exporter"])
    for name, stats in deliveries:
        sent.add_metric([name], stats.sent)
        failed.add_metric([name], stats.failed)
        resent.add_metric([name], stats.resent)
    yield from (sent, failed, resent)
