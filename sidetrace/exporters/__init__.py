"""Exporters: where the agent sends what it collected, one module per kind.

``KINDS`` is the registry, one line per kind: the ``[exporters]`` key its tables live under and the
class that serves each table. Every exporter runs the shared delivery loop (``delivery.py``) over
its reader of the spool (``spool.py``); adding a kind is one module and one line here.
"""

from __future__ import annotations

import importlib
from typing import Any

# [exporters] key -> "module:Class"; the class takes (section, spool, stats_for), and also metrics= (the agent's
# metric families) when it sets NEEDS_METRICS; modules load lazily.
KINDS: dict[str, str] = {
    "otlp": "sidetrace.exporters.otlp:OtlpExporter",
    "loadbalancing": "sidetrace.exporters.loadbalancing:LoadBalancingExporter",
    "remote_write": "sidetrace.exporters.remote_write:RemoteWriteExporter",
}


def configured(exporters: Any) -> list[tuple[str, Any]]:
    """Every exporter table in an ``[exporters]`` config section, as (kind, section), in registry order."""
    return [(kind, section) for kind in KINDS for section in getattr(exporters, kind)]


def exporter_class(kind: str) -> type:
    module_name, class_name = KINDS[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)
