"""The component model: what the daemon runs, and the registry it builds them from.

A component is a small class with ``async start()``, ``async stop()``, ``status() -> dict`` and,
when it has metrics, ``collect()`` (prometheus_client's collector interface; the daemon gathers
every running component's, so a component never registers itself and one left behind by a stop
that timed out is never exported twice). A component that can take a changed config section
without stopping has ``async reconfigure(section)``; the daemon calls it instead of restarting it.

Components are built by ``Class(section, context)`` from their config section. Adding a source or
exporter is one module plus one line in ``REGISTRY``; the daemon is not edited. Modules are imported
only when their component is enabled, so a disabled source costs no memory.

Components reach each other through typed links in the context (``context.traces`` is the trace
sink receivers hand requests to), bound by the component that serves them while it runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry

from sidetrace.config import Config

if TYPE_CHECKING:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

T = TypeVar("T")


class Component(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


class TraceSink(Protocol):
    """Where trace requests go: the trace pipeline (``sidetrace.agent.pipeline``)."""

    async def accept_traces(self, request: ExportTraceServiceRequest, raw: bytes | None = None) -> int: ...


class MetricSink(Protocol):
    """Where OTLP metric requests from apps go: the app-metrics store (``sidetrace.agent.app_metrics``)."""

    def accept_metrics(self, request: ExportMetricsServiceRequest) -> int: ...


class Link(Generic[T]):
    """A typed reference to the component serving one interface; empty while it is off or restarting."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._target: T | None = None

    def bind(self, target: T) -> None:
        self._target = target

    def unbind(self, target: T) -> None:
        if self._target is target:
            self._target = None

    def get(self) -> T | None:
        return self._target


@dataclass(frozen=True)
class Links:
    """Every link between components; the daemon owns one set for its whole life."""

    traces: Link[TraceSink] = field(default_factory=lambda: Link("the trace pipeline"))
    metrics: Link[MetricSink] = field(default_factory=lambda: Link("the app-metrics store"))
    recent: Link[Any] = field(default_factory=lambda: Link("the recent-traces index"))
    flows: Link[Any] = field(default_factory=lambda: Link("the netsample source"))


@dataclass(frozen=True)
class Context:
    """What the daemon hands every component besides its own config section."""

    config: Config
    registry: CollectorRegistry
    daemon_status: Callable[[], dict[str, Any]]
    not_ready: Callable[[], list[str]]  # why the agent is not ready; empty when it is
    links: Links = field(default_factory=Links)


@dataclass(frozen=True)
class Registration:
    name: str
    section: Callable[[Config], Any]
    target: str  # "module:Class", imported lazily

    def enabled(self, config: Config) -> bool:
        return getattr(self.section(config), "enabled", True)

    def build(self, config: Config, context: Context) -> Component:
        module_name, class_name = self.target.split(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        return cls(self.section(config), context)


# Started in this order and stopped in reverse: the HTTP server first, so /healthz answers
# and /readyz says 503 while the rest start; the receivers last, once everything they feed runs.
REGISTRY: tuple[Registration, ...] = (
    Registration("server", lambda c: c.server, "sidetrace.agent.http:HttpServer"),
    Registration("host", lambda c: c.host, "sidetrace.agent.sources.host:HostSource"),
    Registration("app_metrics", lambda c: c.app_metrics, "sidetrace.agent.app_metrics:AppMetrics"),
    Registration("pipeline", lambda c: (c.agent.data_dir, c.spool, c.exporters, c.processors, c.recent_traces),
                 "sidetrace.agent.pipeline:TracePipeline"),
    Registration("netsample", lambda c: c.sources.netsample, "sidetrace.agent.sources.netsample:NetsampleSource"),
    Registration("nats_trace", lambda c: c.sources.nats_trace, "sidetrace.agent.sources.nats_trace:NatsTraceSource"),
    Registration("otlp", lambda c: c.receivers.otlp, "sidetrace.agent.receivers.otlp:OtlpReceiver"),
)
