"""The SDK core's own metrics, bridged into the OpenTelemetry MeterProvider."""

from __future__ import annotations

import asyncio
from typing import Any

import temporalio
from opentelemetry import metrics

from sidetrace.instrumentors.temporal._telemetry import log


class CoreMetricsBridge:
    """Brings the SDK core's own metrics (the Rust core's ``temporal_*`` series) into the OpenTelemetry
    MeterProvider, so a worker needs no Prometheus port of its own: they travel with everything else.

    It installs a default Runtime whose metrics go to a buffer, and drains that buffer with
    ``temporalio.contrib.opentelemetry.MetricsExporter`` from the first client connect on. A default
    runtime that already exists is left alone (the bridge then does nothing, and says so).
    """

    def __init__(self) -> None:
        self.exporter: Any = None
        self.task: Any = None

    def install(self, meter_provider: metrics.MeterProvider | None = None) -> bool:
        try:
            from temporalio.contrib.opentelemetry import MetricsExporter
            from temporalio.runtime import MetricBuffer, Runtime, TelemetryConfig
        except ImportError:
            log.warning("sidetrace: temporalio %s has no MetricsExporter; core metrics are not bridged",
                        getattr(temporalio, "__version__", "?"))
            return False
        buffer = MetricBuffer(10_000)
        try:
            Runtime.set_default(Runtime(telemetry=TelemetryConfig(metrics=buffer)), error_if_already_set=True)
        except RuntimeError:
            log.warning("sidetrace: a Temporal runtime already exists; its core metrics are not bridged "
                        "(instrument before the first client connects)")
            return False
        self.exporter = MetricsExporter(buffer, meter_provider)
        return True

    def start(self) -> None:
        """Begin draining, in the running event loop (called from a client connect)."""
        if self.exporter is not None and self.task is None:
            self.task = asyncio.ensure_future(self.exporter.run())
