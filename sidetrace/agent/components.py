"""The component model: what the daemon runs, and the registry it builds them from.

A component is a small class with ``async start()``, ``async stop()`` and ``status() -> dict``,
built by ``Class(section, context)`` from its config section. Adding a source or exporter is
one module plus one line in ``REGISTRY``; the daemon is not edited. Modules are imported only
when their component is enabled, so a disabled source costs no memory.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from sidetrace.config import Config


class Component(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Context:
    """What the daemon hands every component besides its own config section."""

    config: Config
    registry: CollectorRegistry
    daemon_status: Callable[[], dict[str, Any]]
    ready: Callable[[], bool]
    # The running component of that name, or None (between a reload's stop and start, say).
    lookup: Callable[[str], Any] = lambda name: None


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
# and /readyz says 503 while the rest start.
REGISTRY: tuple[Registration, ...] = (
    Registration("server", lambda c: c.server, "sidetrace.agent.http:HttpServer"),
    Registration("host", lambda c: c.host, "sidetrace.agent.sources.host:HostSource"),
    Registration(
        "pipeline",
        lambda c: (c.agent.data_dir, c.spool, c.exporters, c.processors, c.recent_traces, c.app_metrics),
        "sidetrace.agent.pipeline:TracePipeline",
    ),
    Registration("netsample", lambda c: c.sources.netsample, "sidetrace.agent.sources.netsample:NetsampleSource"),
    Registration("nats_trace", lambda c: c.sources.nats_trace, "sidetrace.agent.sources.nats_trace:NatsTraceSource"),
    Registration("otlp", lambda c: c.receivers.otlp, "sidetrace.agent.receivers.otlp:OtlpReceiver"),
)
