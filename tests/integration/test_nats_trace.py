"""The nats_trace source against a real nats-server with account message tracing (ADR-41)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sidetrace.instrumentors.nats import NatsInstrumentor
from tests.conftest import Agent, http_get, wait_until
from tests.integration.nats_server import NatsServer

ACCOUNT = """
accounts {
  APP { users: [{user: app, password: app}], jetstream: enabled,
        msg_trace { dest: "sidetrace.msgtrace", sampling: 100 } }
}
no_auth_user: app
"""


@pytest.fixture
def traced_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats", ACCOUNT)
    yield server
    server.stop()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    NatsInstrumentor().instrument(tracer_provider=provider)
    yield exporter
    NatsInstrumentor().uninstrument()


def metric(agent: Agent, name: str) -> float | None:
    _, text = http_get(agent.url + "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def trace_spans(agent: Agent, trace_id: int) -> list[dict]:
    status, text = http_get(f"{agent.url}/debug/traces/{trace_id:032x}")
    return json.loads(text)["spans"] if status == 200 else []


async def test_server_hops_join_the_publishers_trace(
    agent_factory: Callable[..., Agent], traced_server: NatsServer, spans: InMemorySpanExporter
) -> None:
    agent = agent_factory(f'[sources.nats_trace]\nenabled = true\nservers = ["{traced_server.url}"]\n').start()
    wait_until(lambda: metric(agent, "sidetrace_nats_trace_connected") == 1.0, 20, "the source subscribed")
    nc = await nats.connect(traced_server.url)
    js = nc.jetstream()
    await js.add_stream(name="ORDERS", subjects=["orders.>"])
    got = []

    async def handler(msg) -> None:  # noqa: ANN001
        got.append(msg)

    await nc.subscribe("orders.>", queue="billing", cb=handler)
    await nc.flush()
    await js.publish("orders.created", b"o-1")
    publish = next(s for s in spans.get_finished_spans() if s.name == "publish orders.created")
    hop = wait_until(lambda: next((s for s in trace_spans(agent, publish.context.trace_id)
                                   if s["name"] == "nats-server orders.created"), None), 20, "the server hop span")
    assert hop["parent_span_id"] == f"{publish.context.span_id:016x}"
    assert hop["service"] == "nats-server" and hop["kind"] == "SPAN_KIND_SERVER"
    children = {s["name"]: s for s in trace_spans(agent, publish.context.trace_id)
                if s["parent_span_id"] == hop["span_id"]}
    assert set(children) == {"deliver orders.>", "store ORDERS"}
    assert publish.start_time <= hop["start_unix_nano"] <= publish.end_time
    assert metric(agent, "sidetrace_nats_trace_malformed_events_total") == 0
    await nc.publish("sidetrace.msgtrace", b"not a trace event")
    await nc.flush()
    wait_until(lambda: metric(agent, "sidetrace_nats_trace_malformed_events_total") == 1.0, 10,
               "the malformed event counted")
    assert agent.alive()
    await nc.close()


def test_source_keeps_trying_while_the_server_is_away_and_the_agent_is_not_ready(
    agent_factory: Callable[..., Agent], tmp_path: Path
) -> None:
    agent = agent_factory('[sources.nats_trace]\nenabled = true\nservers = ["nats://127.0.0.1:1"]\n')
    agent.start(wait_ready=False)
    agent.wait_started()
    status = json.loads(http_get(agent.url + "/debug/status")[1])["components"]["nats_trace"]
    assert status["state"] == "connecting"
    wait_until(lambda: "cannot connect to nats://127.0.0.1:1" in (json.loads(http_get(
        agent.url + "/debug/status")[1])["components"]["nats_trace"]["last_error"] or ""), 10, "the reason shown")
    assert http_get(agent.url + "/readyz") == (503, "not ready: nats_trace connecting\n")
    done = subprocess.run([sys.executable, "-m", "sidetrace", "status", "--config", str(agent.config_path)],
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 3, done.stderr
    assert done.stdout.splitlines()[2] == "not ready: nats_trace connecting"
