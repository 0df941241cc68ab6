"""TLS between an app-side agent's exporter and a receiving agent, and on the HTTP endpoint."""

from __future__ import annotations

import json
import ssl
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.certificates import make_certificate
from tests.conftest import Agent, http_get, wait_until
from tests.integration.test_traces import send_spans


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_exporter_reaches_a_tls_receiver_that_refuses_plaintext(
    agent_factory: Callable[..., Agent], tmp_path: Path, protocol: str
) -> None:
    cert, key = make_certificate(tmp_path)
    receiving = agent_factory(f'[receivers.otlp.tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n').start()
    port = receiving.grpc_port if protocol == "grpc" else receiving.http_port
    sending = agent_factory(f'[[exporters.otlp]]\nname = "secure"\nendpoint = "https://127.0.0.1:{port}"\n'
                            f'protocol = "{protocol}"\ntls = {{ ca_file = "{cert}" }}\n').start()
    sent = send_spans(sending, 2)
    trace_id = f"{sent[0].context.trace_id:032x}"
    wait_until(lambda: http_get(f"{receiving.url}/debug/traces/{trace_id}")[0] == 200, 20,
               "the trace at the TLS receiver")
    spans = json.loads(http_get(f"{receiving.url}/debug/traces/{trace_id}")[1])["spans"]
    assert len(spans) == 3
    with pytest.raises(OSError):  # plaintext HTTP to the TLS listener gets no HTTP answer
        urllib.request.urlopen(f"http://127.0.0.1:{receiving.http_port}/v1/traces", data=b"", timeout=5)


def test_http_endpoint_serves_tls(agent_factory: Callable[..., Agent], tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    agent = agent_factory(f'[server.tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n')
    agent.start(wait_ready=False)
    context = ssl.create_default_context(cafile=str(cert))

    def ready() -> bool:
        with urllib.request.urlopen(f"https://127.0.0.1:{agent.port}/readyz", timeout=2, context=context) as r:
            return r.status == 200

    wait_until(ready, 20, "the agent ready over https")
    assert f"serving /metrics on https://127.0.0.1:{agent.port}/metrics" in agent.log()
    with pytest.raises(OSError):  # plaintext to the TLS endpoint gets no HTTP answer
        http_get(f"{agent.url}/readyz", 2)
