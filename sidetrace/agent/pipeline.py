"""The trace pipeline: the trace sink receivers and sources hand requests to.

A request goes through the processors in order (resource enrichment, redaction), is written to the
spool, and only then is acknowledged; span metrics and the recent-traces index see it after the
write, so a request the spool refused (and the app will retry) is not counted twice. It is written
once to the trace queue when an exporter reads it (``[[exporters.otlp]]``), and split by each
load-balancing exporter into its backends' queues, all in one spool transaction. With no trace
exporter (none configured, or the last one removed by a reload) nothing is written: requests are
kept only in the recent traces, counted as dropped (reason ``no_exporter``), and the log says so. The
exporters read the spool on their own (``sidetrace.exporters``).

A reload changes only what changed: processors are swapped between two requests, the spool's
bounds are applied in place, and only the exporters whose tables changed are restarted, so traffic
is never refused, other exports are never cut, and no counter starts over. What a request is queued
for changes only once the new exporters' readers are registered, and a leaving exporter's readers go
only after the requests queued for it are committed, so a request is never acknowledged with nobody
to read it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.core import Metric

from sidetrace.agent.components import Context
from sidetrace.agent.processors.redaction import RedactionProcessor
from sidetrace.agent.processors.resource import ResourceProcessor
from sidetrace.agent.processors.span_metrics import SpanMetricsProcessor
from sidetrace.agent.recent import RecentTraces
from sidetrace.config import Config
from sidetrace.exporters import configured, exporter_class
from sidetrace.exporters.delivery import DeliveryStats, delivery_families
from sidetrace.exporters.spool import TRACES, Spool, SpoolBusy, SpoolError, SpoolFull, dropped_spans_family

log = logging.getLogger("sidetrace.pipeline")

SPOOL_FILE = "spool.db"


class SinkBusy(Exception):
    """The pipeline cannot take a request now; the sender should retry. ``reason`` is a metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _reads_traces(exporter: Any) -> bool:
    return any(queue == TRACES for _, queue in exporter.readers())


def span_count(request: ExportTraceServiceRequest) -> int:
    return sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)


class _Processors:
    """The processors of one config, applied in order; replaced whole at a reload."""

    def __init__(self, config: Config, redacted: int) -> None:
        section = config.processors
        self.resource = ResourceProcessor(section.resource) if section.resource.enabled else None
        self.redaction = RedactionProcessor(section.redaction, redacted)
        # The byte prefilter looks at what the app sent: added attributes with a sensitive key need the walk.
        self.prefilter = not (self.resource and any(map(self.redaction.sensitive, self.resource.attributes)))

    def apply(self, request: ExportTraceServiceRequest, raw: bytes | None) -> bytes:
        """Process ``request`` (``raw`` its encoding, when the receiver has it); return the encoding to queue."""
        if raw is not None and self.prefilter and not self.redaction.may_contain(raw):
            # Nothing to redact: only the resources change, on the wire bytes, without re-encoding the spans.
            self.redaction.skipped_requests += 1
            if self.resource is None:
                return raw
            body = self.resource.enrich_encoded(raw)
            if body is not None:
                return body
        if self.resource is not None:
            self.resource.apply(request)
        self.redaction.apply(request)
        return request.SerializeToString()


class TracePipeline:
    """The ``pipeline`` component (see module doc)."""

    def __init__(self, section: Any, context: Context) -> None:
        config = context.config
        self._links = context.links
        self._registry = context.registry
        self._config = config
        self._processors = _Processors(config, 0)
        self.span_metrics = SpanMetricsProcessor(config.processors.span_metrics) \
            if config.processors.span_metrics.enabled else None
        self.recent = RecentTraces(config.recent_traces)
        self.spool: Spool | None = None
        self.exporters: dict[str, Any] = {}
        self._sections: dict[str, tuple[str, Any]] = {}
        self._stats: dict[str, DeliveryStats] = {}
        # What accept_traces queues a request for: changed by a reload only once the new readers are registered
        # and before the leaving ones are removed, so a request is never acknowledged with nobody to read it.
        self._routers: dict[str, Any] = {}  # load-balancing exporters: each splits a request into its queues
        self._trace_readers: set[str] = set()  # exporters reading the trace queue
        self.unspooled = 0  # spans accepted while no exporter took spans: kept in the recent traces only
        self._state = "created"

    # lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self._state = "starting"
        wanted = configured(self._config.exporters)
        if wanted:
            spool = self._new_spool(self._config)
            built = self._build(wanted, spool)  # before anything starts: a missing CA file fails here
            await self._open(spool, built)
            await self._start_exporters(built, wanted)
            self._accept_for(self.exporters)
            log.info("spool %s holds %d bytes; exporting to %s", self.spool.path, self.spool.size_bytes,
                     ", ".join(f"{name} ({exporter.status()['endpoint']})"
                               for name, exporter in self.exporters.items()))
        if not self._trace_exporters():
            log.info("no trace exporter configured: traces are kept in memory only (/debug/traces, "
                     "`sidetrace traces`), nothing is spooled or sent (counted in "
                     "sidetrace_spool_dropped_spans_total{reason=\"no_exporter\"})")
        self._links.traces.bind(self)
        self._links.recent.bind(self.recent)
        self._state = "running"

    async def stop(self) -> None:
        self._state = "stopping"
        self._links.traces.unbind(self)
        self._links.recent.unbind(self.recent)
        for exporter in self.exporters.values():
            await exporter.stop()
        if self.spool is not None:
            await self.spool.close()
        self._state = "stopped"

    def _new_spool(self, config: Config) -> Spool:
        return Spool(config.data_path / SPOOL_FILE, config.spool.max_bytes, config.spool.sync,
                     config.spool.max_pending_bytes)

    async def _open(self, spool: Spool, built: dict[str, Any]) -> None:
        for exporter in built.values():
            for reader, queue in exporter.readers():
                spool.add_reader_at_open(reader, queue)
            for reader, queue in getattr(exporter, "resumed_readers", list)():
                spool.add_reader_at_open(reader, queue, resume_only=True, sub_readers=True)
        await spool.open()
        self.spool = spool

    def _stats_for(self, reader: str) -> DeliveryStats:
        return self._stats.setdefault(reader, DeliveryStats())

    def _build(self, wanted: list[tuple[str, Any]], spool: Spool) -> dict[str, Any]:
        """The exporters of ``wanted`` that are new or changed, built (not started)."""
        built = {}
        for kind, section in wanted:
            if (kind, section) == self._sections.get(section.name) or self._in_place(kind, section):
                continue
            cls = exporter_class(kind)
            extra = {"metrics": self._registry.collect} if getattr(cls, "NEEDS_METRICS", False) else {}
            built[section.name] = cls(section, spool, self._stats_for, **extra)
        return built

    def _in_place(self, kind: str, section: Any) -> bool:
        """Whether the running exporter of ``section``'s name takes this change without a restart."""
        current, exporter = self._sections.get(section.name), self.exporters.get(section.name)
        return current is not None and current[0] == kind and hasattr(exporter, "accepts") and exporter.accepts(section)

    async def _start_exporters(self, built: dict[str, Any], wanted: list[tuple[str, Any]]) -> None:
        sections = {section.name: (kind, section) for kind, section in wanted}
        for name, exporter in built.items():
            if name in self.exporters and hasattr(exporter, "adopt"):
                exporter.adopt(self.exporters[name])  # the one it replaces routes requests until it starts
            await exporter.start()
            self.exporters[name] = exporter
            self._sections[name] = sections[name]

    def _accept_for(self, exporters: dict[str, Any]) -> None:
        """Make ``exporters`` the ones accepted requests are queued for: the trace queue's readers, the routers."""
        self._routers = {name: e for name, e in exporters.items() if hasattr(e, "routing")}
        self._trace_readers = {name for name, e in exporters.items() if _reads_traces(e)}

    def _forget_stats(self, exporter: Any) -> None:
        for reader, _ in exporter.readers():
            self._stats.pop(reader, None)

    async def _remove(self, removed: list[str]) -> None:
        """Forget the readers of the ``removed`` exporters (stopped), once nothing is queued for them any more: what
        they had not delivered goes, counted as exporter_removed (with their sub-readers, what their queues held; in
        the trace queue what they alone still needed, or all it holds if they were its last readers)."""
        for name in removed:
            self._routers.pop(name, None)
            self._trace_readers.discard(name)
        if not removed or self.spool is None:
            return
        await self.spool.committed()  # appends already queued for them are on disk: counted below, not stranded
        for name in removed:
            await self.spool.remove_reader(name)

    async def reconfigure(self, section: Any, context: Context) -> None:
        """Apply a reload's config, restarting only the exporters whose tables changed (see module doc)."""
        new = context.config
        old = self._config
        wanted = configured(new.exporters)
        spool = self.spool or self._new_spool(new)  # opened below, if an exporter needs it
        built = self._build(wanted, spool)  # may raise: nothing has changed yet
        if new.processors.resource != old.processors.resource or new.processors.redaction != old.processors.redaction:
            self._processors = _Processors(new, self._processors.redaction.redacted)
        if new.processors.span_metrics != old.processors.span_metrics:
            if not new.processors.span_metrics.enabled:
                self.span_metrics = None
            elif self.span_metrics is None:
                self.span_metrics = SpanMetricsProcessor(new.processors.span_metrics)
            else:
                self.span_metrics.max_series = new.processors.span_metrics.max_series
        self.recent.configure(new.recent_traces)
        if self.spool is not None:
            self.spool.max_bytes = new.spool.max_bytes
            self.spool.max_pending_bytes = new.spool.max_pending_bytes
            if new.spool.sync != old.spool.sync:
                self.spool.set_sync(new.spool.sync)
        before = set(self.exporters)
        names = {s.name for _, s in wanted}
        kinds = {s.name: kind for kind, s in wanted}
        changed_in_place = [(kind, s) for kind, s in wanted if (kind, s) != self._sections.get(s.name)
                            and s.name not in built and s.name in self.exporters]
        for kind, section in changed_in_place:
            await self.exporters[section.name].reconfigure(section)
            self._sections[section.name] = (kind, section)
        leaving = [n for n in self.exporters if n not in names or n in built]
        removed = [n for n in leaving if n not in names]
        new_readers = {n for n, exporter in built.items() if _reads_traces(exporter)}
        # Whether the trace queue keeps a reader other than the removed ones: then those go before the new exporters
        # start, so one that replaces it (a rename) starts in the trace queue no later than it was and never sends
        # beside it; if not, they keep taking requests until the new ones (a load-balancing exporter, say) do.
        handed_over = bool((self._trace_readers | new_readers) - set(removed))
        other_kind: list[Any] = []  # replaced by an exporter of another kind under the same name
        stopping = [n for n in leaving if n in built or handed_over]
        for name in stopping:
            # One being replaced keeps taking requests (into the queues its successor reads) until then.
            exporter = self.exporters[name] if name in built else self.exporters.pop(name)
            await exporter.stop()
            old_kind, _ = self._sections.pop(name)
            if name in names and old_kind != kinds[name]:
                other_kind.append(exporter)
            if name not in names:
                self._forget_stats(exporter)
        if built and self.spool is None:
            await self._open(spool, built)
        else:
            for exporter in built.values():
                for reader, queue in exporter.readers():
                    await spool.add_reader(reader, queue)
        # They read what is queued for them once started; but a name whose load-balancing exporter routes requests
        # until its successor starts gets trace-queue writes only then, so no request goes both ways.
        self._trace_readers |= new_readers - set(self._routers)
        if handed_over:
            await self._remove(removed)
        await self._start_exporters(built, wanted)
        self._accept_for({name: e for name, e in self.exporters.items() if name not in removed})
        if not handed_over:
            for name in removed:
                exporter = self.exporters.pop(name)
                await exporter.stop()
                self._sections.pop(name)
                self._forget_stats(exporter)
            await self._remove(removed)
        for exporter in other_kind:
            # Another kind by the same name (loadbalancing to otlp, say): once the old one routes nothing more,
            # its own queues have no reader, so they go as a removed exporter's do (counted). The name's cursor on
            # the trace queue stays for the new one (a loadbalancing exporter routes what it still holds).
            if hasattr(exporter, "settled"):
                await exporter.settled()
            # the successor's own sub-readers (a load-balancing exporter replacing an otlp one: its backends' queues,
            # just added) stay: only those it does not read go
            successor = self.exporters.get(exporter.name)
            keep = {reader for reader, _ in successor.readers()} if successor is not None else set()
            for reader in [r for r in self.spool.readers() if r.startswith(f"{exporter.name}/") and r not in keep]:
                self._stats.pop(reader, None)
                await self.spool.remove_reader(reader)
        self._config = new
        if built or leaving:
            changes = [(what, sorted(names_)) for what, names_ in (
                ("added", [n for n in built if n not in before]), ("restarted", [n for n in built if n in before]),
                ("removed", removed)) if names_]
            log.info("%s; exporting to %s", "; ".join(f"exporters {what}: {', '.join(n)}" for what, n in changes),
                     ", ".join(self.exporters) or "nothing")
        if (built or leaving) and not self._trace_exporters():
            log.info("no trace exporter left: traces are kept in memory only (/debug/traces, `sidetrace traces`), "
                     "nothing is spooled or sent (counted in "
                     "sidetrace_spool_dropped_spans_total{reason=\"no_exporter\"})")
        if changed_in_place:
            log.info("exporters reconfigured in place: %s", ", ".join(s.name for _, s in changed_in_place))

    # the trace sink ----------------------------------------------------------------------------

    async def accept_traces(self, request: ExportTraceServiceRequest, raw: bytes | None = None) -> int:
        """Process and durably queue ``request``; return its span count.

        ``raw`` is the request's protobuf encoding when the receiver has it (a fast path for redaction).
        Raises SinkBusy when the spool cannot take it now (busy, disk full, failing); the receiver
        refuses the request then, so the app retries.
        """
        spans = span_count(request)
        if not spans:
            return 0
        body = self._processors.apply(request, raw)
        routers, read = list(self._routers.values()), bool(self._trace_readers)
        if self.spool is not None and (routers or read):
            with ExitStack() as routed:
                parts: list[tuple[str, bytes, int]] = []
                for exporter in routers:
                    parts += routed.enter_context(exporter.routing(body, spans))
                if read:
                    parts.append((TRACES, body, spans))
                try:
                    await self.spool.append_all(parts)
                except SpoolBusy as exc:
                    raise SinkBusy("busy", str(exc)) from None
                except SpoolFull as exc:
                    raise SinkBusy("disk_full", str(exc)) from None
                except SpoolError as exc:
                    raise SinkBusy("spool_error", str(exc)) from None
        else:
            self.unspooled += spans
        if self.span_metrics is not None:
            self.span_metrics.apply(request)
        self.recent.add(body, spans)
        return spans

    def _trace_exporters(self) -> list[str]:
        """The exporters that take spans: those reading the trace queue, and the load-balancing ones."""
        return [*self._routers, *self._trace_readers]

    # observability -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        exporters = {name: exporter.status() for name, exporter in self.exporters.items()}
        detail = f"{len(self.exporters)} exporter(s), spool {self.spool.size_bytes} bytes" if self.spool \
            else "no exporter: recent traces only"
        errors = [f"{name}: {e['last_error']}" for name, e in exporters.items() if e["state"] == "failing"]
        return {"state": self._state, "detail": detail, "last_error": "; ".join(errors) or None,
                "exporters": exporters, "recent_traces": self.recent.span_count}

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's Collector interface: each part's own metrics."""
        yield from self._processors.redaction.families()
        if self.span_metrics is not None:
            yield from self.span_metrics.families()
        yield from self.recent.families()
        unspooled = self.unspooled or not self._trace_exporters()  # pre-exported while nothing takes spans
        if self.spool is not None:
            for family in self.spool.families():
                if family.name == "sidetrace_spool_dropped_spans" and unspooled:
                    family.add_metric([TRACES, "no_exporter"], self.unspooled)
                yield family
            yield from delivery_families(list(self._stats.items()))
            for exporter in list(self.exporters.values()):
                if hasattr(exporter, "families"):
                    yield from exporter.families()
        else:
            dropped = dropped_spans_family()  # sidetrace_spool_dropped_spans_total
            dropped.add_metric([TRACES, "no_exporter"], self.unspooled)
            yield dropped

