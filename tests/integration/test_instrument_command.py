"""`sidetrace instrument -- python app.py`: an unmodified app's NATS and Dapr calls traced into the agent."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Agent, http_get, wait_until
from tests.integration.nats_server import NatsServer

APP = textwrap.dedent('''
    import asyncio, sys
    import nats

    async def main():
        nc = await nats.connect(sys.argv[1])
        done = asyncio.Event()
        async def handler(msg):
            done.set()
        await nc.subscribe("greetings", cb=handler)
        await nc.publish("greetings", b"hello")
        await asyncio.wait_for(done.wait(), 10)
        await nc.close()

    asyncio.run(main())
''')


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    s = NatsServer(tmp_path / "nats")
    yield s
    s.stop()


@pytest.mark.parametrize("scheme", ["http://", ""])  # HOST:PORT alone is the agent's plain OTLP too
def test_unmodified_app_is_traced_into_the_agent(
    agent_factory: Callable[..., Agent], server: NatsServer, scheme: str
) -> None:
    agent = agent_factory().start()
    done = subprocess.run(
        [sys.executable, "-m", "sidetrace", "instrument", "--service", "greeter", "--endpoint",
         f"{scheme}127.0.0.1:{agent.grpc_port}", "--", sys.executable, "-c", APP, server.url],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    summary = wait_until(lambda: json.loads(http_get(agent.url + "/debug/traces?service=greeter")[1])["traces"], 20,
                         "the app's trace at the agent")
    trace = json.loads(http_get(f"{agent.url}/debug/traces/{summary[0]['trace_id']}")[1])
    assert [(s["name"], s["kind"]) for s in trace["spans"]] == [("publish greetings", "SPAN_KIND_PRODUCER"),
                                                                 ("process greetings", "SPAN_KIND_CONSUMER")]
    assert trace["spans"][1]["parent_span_id"] == trace["spans"][0]["span_id"]


def test_instrument_without_a_command_says_how() -> None:
    done = subprocess.run([sys.executable, "-m", "sidetrace", "instrument"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2
    assert "give the command to run" in done.stderr


def test_a_broken_environment_never_stops_the_app(tmp_path: Path) -> None:
    # An unreachable agent and a bogus exporter setting: the app still runs and exits 0.
    done = subprocess.run(
        [sys.executable, "-m", "sidetrace", "instrument", "--endpoint", "http://127.0.0.1:9", "--",
         sys.executable, "-c", "print('app ran')"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "app ran"


DAPR_APP = textwrap.dedent('''
    import sys
    import requests

    sidecar = f"http://127.0.0.1:{sys.argv[1]}"
    requests.post(f"{sidecar}/v1.0/state/statestore", json=[{"key": "a", "value": 1}], timeout=5).raise_for_status()
    assert requests.get(f"{sidecar}/v1.0/state/statestore/a", timeout=5).json() == 1
''')


def test_unmodified_app_calling_the_dapr_sidecar_is_traced_into_the_agent(
    agent_factory: Callable[..., Agent]
) -> None:
    from tests.integration.dapr_apps import StandInDaprd

    agent = agent_factory().start()
    daprd = StandInDaprd()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sidetrace", "instrument", "--service", "saver", "--endpoint",
             f"http://127.0.0.1:{agent.grpc_port}", "--", sys.executable, "-c", DAPR_APP, str(daprd.http_port)],
            capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        seen = daprd.seen()
    finally:
        daprd.stop()
    summaries = wait_until(lambda: len(json.loads(http_get(agent.url + "/debug/traces?service=saver")[1])["traces"])
                           == 2 and json.loads(http_get(agent.url + "/debug/traces?service=saver")[1])["traces"], 20,
                           "the app's two traces at the agent")
    spans = [s for summary in summaries
             for s in json.loads(http_get(f"{agent.url}/debug/traces/{summary['trace_id']}")[1])["spans"]]
    assert sorted((s["name"], s["kind"]) for s in spans) == [("state.get statestore", "SPAN_KIND_CLIENT"),
                                                            ("state.save statestore", "SPAN_KIND_CLIENT")]
    # the context went to the sidecar with each call
    assert sorted(e["headers"]["traceparent"].split("-")[2] for e in seen if e["target"].startswith(("POST", "GET"))
                  and "/v1.0/state" in e["target"]) == sorted(s["span_id"] for s in spans)
