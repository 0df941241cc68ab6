"""The receiver's slot bound: a client that holds every body-reading slot gets the next request refused
with a retryable 429 (counted as too_many_requests), and the slots come back when those clients go."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
from google.rpc import status_pb2

from sidetrace.agent.receivers.otlp import MAX_READING_REQUESTS
from tests.conftest import Agent, wait_until
from tests.integration.test_otlp_input import one_span_request, post, refused_requests


@pytest.mark.slow
def test_a_request_past_the_reading_slots_is_refused_retryably_and_counted(
        agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory(env={"SIDETRACE_RECEIVERS__OTLP__READ_TIMEOUT_SECONDS": "60"}).start()
    good = one_span_request().SerializeToString()
    stalled = []
    try:
        for _ in range(MAX_READING_REQUESTS):  # headers and half a body, then nothing
            sock = socket.create_connection(("127.0.0.1", agent.http_port), timeout=10)
            sock.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                         b"Content-Length: 1000\r\n\r\n" + b"\0" * 500)
            stalled.append(sock)
        # The handlers of the stalled requests start as the agent gets to them: wait for the first refusal.
        answers: list[tuple[int, dict[str, str], bytes]] = []

        def refused_once() -> bool:
            answers.append(post(agent.otlp_http + "/v1/traces", good))
            return answers[-1][0] == 429

        wait_until(refused_once, 20, "a request refused for lack of reading slots")
        status, headers, body = answers[-1]
        assert headers.get("Content-Type") == "application/x-protobuf"
        refusal = status_pb2.Status.FromString(body)
        assert f"{MAX_READING_REQUESTS} request bodies being read" in refusal.message
        assert all(code == 200 for code, _, _ in answers[:-1])
        assert refused_requests(agent, "http") == {"too_many_requests": 1}
    finally:
        for sock in stalled:
            sock.close()
    # The slots are given back when the stalled clients leave: requests flow again, and every refusal
    # seen until then (the agent may not have noticed every close yet) is counted, nothing else.
    after: list[int] = []
    wait_until(lambda: after.append(post(agent.otlp_http + "/v1/traces", good)[0]) or after[-1] == 200, 20,
               "slots given back")
    assert set(after[:-1]) <= {429}
    assert refused_requests(agent, "http") == {"too_many_requests": 1 + len(after) - 1}
