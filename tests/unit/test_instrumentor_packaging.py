"""What importing an instrumentor costs an app, and how tools find it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path


def test_instrumentors_import_nothing_of_the_agent() -> None:
    code = ("import sys, json; import sidetrace.instrumentors.nats, sidetrace.instrumentors.dapr; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('aiohttp', 'grpc', 'psutil', 'prometheus_client', 'scapy') or m.startswith('sidetrace.agent'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(done.stdout) == []


def test_entry_point_is_registered_for_opentelemetry_instrument() -> None:
    (found,) = [ep for ep in entry_points(group="opentelemetry_instrumentor") if ep.name == "nats"
                and ep.value.startswith("sidetrace.")]
    assert found.value == "sidetrace.instrumentors.nats:NatsInstrumentor"
    assert found.load().__name__ == "NatsInstrumentor"


def test_opentelemetry_instrument_loads_it_without_code_changes() -> None:
    code = "import nats.aio.client as c; print(c.Client.publish.__globals__['__name__'])"
    done = subprocess.run([str(Path(sys.executable).with_name("opentelemetry-instrument")), sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60,
                          env={"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none",
                               "OTEL_LOGS_EXPORTER": "none", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "sidetrace.instrumentors.nats._publish"


def test_dapr_instrumentor_is_found_and_needs_no_library_of_its_own() -> None:
    """No instrumentation dependency, so `opentelemetry-instrument` loads it even without the dapr
    SDK, and raw HTTP to the sidecar with requests is traced with no other instrumentation."""
    (found,) = [ep for ep in entry_points(group="opentelemetry_instrumentor") if ep.name == "dapr"]
    assert found.value == "sidetrace.instrumentors.dapr:DaprInstrumentor"
    assert tuple(found.load()().instrumentation_dependencies()) == ()
    code = "import requests.sessions as s; print(s.Session.send._self_wrapper.__module__)"
    done = subprocess.run([str(Path(sys.executable).with_name("opentelemetry-instrument")), sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60,
                          env={"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none",
                               "OTEL_LOGS_EXPORTER": "none", "PATH": "/usr/bin:/bin",
                               "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "requests"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "sidetrace.instrumentors.dapr._http_client"


def test_the_launcher_points_each_signal_at_the_agents_port_for_its_protocol() -> None:
    code = ("import json, os; from sidetrace.instrumentors.bootstrap import _default_environment; "
            "_default_environment(); print(json.dumps({k: v for k, v in os.environ.items() if 'ENDPOINT' in k}))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SIDETRACE_"))}
    env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                          check=True)
    assert json.loads(done.stdout) == {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces",
                                       "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://127.0.0.1:4317"}
