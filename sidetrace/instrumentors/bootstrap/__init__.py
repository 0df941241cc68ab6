"""Zero-code start-up for apps: `sidetrace instrument -- python app.py` puts this package's directory
on PYTHONPATH, so Python imports its ``sitecustomize`` before the app, which calls :func:`start`.

``start`` sets up the OpenTelemetry SDK (unless the app or another tool already did) to send traces
and metrics over OTLP to the sidetrace agent on this host, then runs every sidetrace instrumentor
whose library is installed. It never raises: a failure is logged once and the app starts as usual.
"""

from __future__ import annotations

import atexit
import logging
import os
from importlib.metadata import entry_points

from opentelemetry.instrumentation.dependencies import get_dependency_conflicts

log = logging.getLogger("sidetrace.bootstrap")

DEFAULT_ENDPOINT = "http://127.0.0.1:4317"
ENDPOINT_VARIABLE = "SIDETRACE_AGENT_ENDPOINT"


def _configure_sdk(endpoint: str) -> None:
    from opentelemetry import metrics, trace
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES apply
    insecure = endpoint.startswith("http://")
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure)))
        trace.set_tracer_provider(tracer_provider)
        atexit.register(tracer_provider.shutdown)
    if type(metrics.get_meter_provider()).__name__ == "_ProxyMeterProvider":
        reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint, insecure=insecure))
        meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
        metrics.set_meter_provider(meter_provider)
        atexit.register(meter_provider.shutdown)


def _instrument_installed() -> list[str]:
    instrumented = []
    for entry_point in entry_points(group="opentelemetry_instrumentor"):
        if not entry_point.value.startswith("sidetrace."):
            continue
        try:
            instrumentor = entry_point.load()()
            if get_dependency_conflicts(instrumentor.instrumentation_dependencies()) is not None:
                continue  # the library is not installed (or not a supported version): nothing to trace
            instrumentor.instrument()
            instrumented.append(entry_point.name)
        except Exception as exc:  # one instrumentor failing must not keep the others or the app from starting
            log.warning("sidetrace: could not instrument %s: %s", entry_point.name, exc)
    return instrumented


def start() -> list[str]:
    """Configure the SDK toward the agent and instrument what is installed; return what was instrumented."""
    try:
        _configure_sdk(os.environ.get(ENDPOINT_VARIABLE) or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                       or DEFAULT_ENDPOINT)
    except ImportError as exc:
        log.warning("sidetrace: the OpenTelemetry SDK is not installed (pip install 'sidetrace[sdk]'); "
                    "spans are not exported: %s", exc)
    except Exception as exc:
        log.warning("sidetrace: could not configure the OpenTelemetry SDK: %s", exc)
    return _instrument_installed()
