"""The OTLP receiver against bad, hostile and unusual input, on a real agent process."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import pytest
from google.rpc import status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from tests.conftest import Agent, http_get, scrape_clean, wait_until

TRACE_ID = "5b8efff798038103d269b633813fc60c"
SPAN_ID = "eee19b7ec3c1b174"


def one_span_request(name: str = "op") -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    kv = resource_spans.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", "fuzzed"
    span = resource_spans.scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name = bytes.fromhex(TRACE_ID), bytes.fromhex(SPAN_ID), name
    span.start_time_unix_nano, span.end_time_unix_nano = 1_000_000_000, 1_250_000_000
    return request


def post(url: str, body: bytes, content_type: str = "application/x-protobuf", timeout: float = 10,
         **headers: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type, **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def grpc_export(agent: Agent, body: bytes, metadata: tuple = ()) -> grpc.StatusCode:
    with grpc.insecure_channel(f"127.0.0.1:{agent.grpc_port}") as channel:
        export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                     request_serializer=None, response_deserializer=None)
        try:
            export(body, timeout=10, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


def refused_requests(agent: Agent, transport: str) -> dict[str, float]:
    """The reasons ``transport`` refused requests for, with their counts (the reasons still at 0 left out)."""
    _, text = http_get(agent.url + "/metrics")
    found = {}
    for line in text.splitlines():
        if line.startswith("sidetrace_receiver_refused_requests_total{") and f'transport="{transport}"' in line:
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            if count := float(line.rsplit(" ", 1)[1]):
                found[reason] = count
    return found


def refused(agent: Agent, reason: str) -> float:
    _, text = http_get(agent.url + "/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sidetrace_receiver_refused_spans_total") and f'reason="{reason}"' in line)


def test_malformed_requests_get_4xx_with_a_message_and_the_agent_keeps_serving(
    agent_factory: Callable[..., Agent]
) -> None:
    agent = agent_factory(env={"SIDETRACE_RECEIVERS__OTLP__MAX_REQUEST_BYTES": "65536"}).start()
    url = agent.otlp_http + "/v1/traces"
    good = one_span_request().SerializeToString()

    status, _, body = post(url, good[:-5])
    assert status == 400
    assert status_pb2.Status.FromString(body).message.startswith("invalid protobuf ExportTraceServiceRequest")

    status, _, body = post(url, good, content_type="text/plain")
    assert status == 415 and status_pb2.Status.FromString(body).message == \
        "Content-Type must be application/x-protobuf or application/json, got text/plain"

    status, _, body = post(url, b"\0" * 70_000)
    assert status == 413 and status_pb2.Status.FromString(body).message.startswith("request body larger than 65536")

    for _ in range(5):  # any client may send these: one log line a minute, no traceback
        status, _, body = post(url, good, **{"Content-Encoding": "br"})
        assert status == 415 and status_pb2.Status.FromString(body).message == \
            "Content-Encoding must be gzip, deflate or identity, got br"
        status, _, body = post(url, b"not deflate", **{"Content-Encoding": "deflate"})
        assert status == 400 and status_pb2.Status.FromString(body).message.startswith("invalid deflate body")

    deep = b"[" * 30_000 + b"]" * 30_000  # far past the recursion limit, within max_request_bytes
    status, _, body = post(url, b'{"resourceSpans": ' + deep + b"}", content_type="application/json")
    assert status == 400 and json.loads(body)["message"] == "invalid OTLP/JSON: nested deeper than 128 levels"
    nested = {"resourceSpans": [{"scopeSpans": [{"spans": [{"attributes": [{"key": "k", "value": {}}]}]}]}]}
    value = nested["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["attributes"][0]["value"]
    for _ in range(200):
        value["kvlistValue"] = {"values": [{"key": "k", "value": {}}]}
        value = value["kvlistValue"]["values"][0]["value"]
    status, _, body = post(url, json.dumps(nested).encode(), content_type="application/json")
    assert status == 400 and json.loads(body)["message"] == "invalid OTLP/JSON: nested deeper than 128 levels"

    status, _, body = post(url, b"x" * 10, **{"Content-Encoding": "gzip"})
    assert status == 400 and b"invalid gzip body" in status_pb2.Status.FromString(body).message.encode()

    bomb = gzip.compress(b"\0" * 10_000_000)  # 10 KB that inflate to 10 MB
    assert len(bomb) < 65536
    assert post(url, bomb, **{"Content-Encoding": "gzip"})[0] == 413

    status, _, body = post(url, b"{not json", content_type="application/json")
    assert status == 400 and json.loads(body)["message"].startswith("invalid JSON")

    status, _, body = post(url, json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]})
                           .encode(), content_type="application/json")
    assert status == 400 and json.loads(body)["message"].startswith("traceId: expected a hex string")

    status, _, body = post(agent.otlp_http + "/v1/logs", b"")  # an SDK exporting logs to the agent
    assert status == 404 and status_pb2.Status.FromString(body).message == \
        "no OTLP endpoint at /v1/logs: the agent takes /v1/traces and /v1/metrics"
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(url, timeout=10)
    assert answer.value.code == 405
    assert status_pb2.Status.FromString(answer.value.read()).message == "GET /v1/traces: OTLP/HTTP takes POST"

    assert grpc_export(agent, b"\xff\xff\xff garbage") == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_export(agent, good) == grpc.StatusCode.OK
    assert post(url, good)[0] == 200
    assert refused(agent, "invalid") == 0  # malformed requests carry no countable spans
    assert refused_requests(agent, "http") == {"invalid": 3, "unsupported_media_type": 1, "too_large": 2,
                                               "unsupported_encoding": 5, "bad_encoding": 6, "json_too_deep": 2,
                                               "not_found": 1, "method_not_allowed": 1}
    assert refused_requests(agent, "grpc") == {"invalid": 1}
    assert http_get(agent.url + "/healthz")[0] == 200
    log = agent.log()
    assert "Traceback" not in log
    assert log.count("refused an OTLP/http request (unsupported_encoding)") == 1
    assert log.count("refused an OTLP/http request (bad_encoding)") == 1


def test_otlp_json_with_hex_ids_is_accepted(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory().start()
    document = {"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "json-app"}}]},
        "scopeSpans": [{"spans": [{"traceId": TRACE_ID, "spanId": SPAN_ID, "name": "from json", "kind": 2,
                                   "startTimeUnixNano": "1000000000", "endTimeUnixNano": "1500000000",
                                   "status": {"code": 2}}]}]}]}
    status, headers, body = post(agent.otlp_http + "/v1/traces", json.dumps(document).encode(), "application/json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body) == {}
    status, text = http_get(f"{agent.url}/debug/traces/{TRACE_ID}")
    assert status == 200
    (span,) = json.loads(text)["spans"]
    assert (span["span_id"], span["name"], span["service"], span["kind"], span["duration_ms"], span["status_code"]) \
        == (SPAN_ID, "from json", "json-app", "SPAN_KIND_SERVER", 500.0, "STATUS_CODE_ERROR")


@pytest.mark.slow
def test_fuzzed_http_bodies_never_break_the_receiver(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory().start()
    url = agent.otlp_http + "/v1/traces"
    seen: set[int] = set()
    good = one_span_request().SerializeToString()

    @settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(
        body=st.one_of(st.binary(max_size=2048),
                       st.binary(max_size=64).map(lambda tail: good[: len(good) // 2] + tail),
                       st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                                    lambda children: st.lists(children, max_size=4)
                                    | st.dictionaries(st.sampled_from(["resourceSpans", "scopeSpans", "spans",
                                                                       "traceId", "spanId", "name", "kind"]),
                                                      children, max_size=4), max_leaves=20)
                       .map(lambda doc: json.dumps(doc).encode())),
        content_type=st.sampled_from(["application/x-protobuf", "application/json"]),
        gzipped=st.booleans(),
    )
    def fuzz(body: bytes, content_type: str, gzipped: bool) -> None:
        headers = {"Content-Encoding": "gzip"} if gzipped else {}
        status, _, _ = post(url, gzip.compress(body) if gzipped else body, content_type, **headers)
        seen.add(status)
        assert status in (200, 400), status

    fuzz()
    assert seen == {200, 400}
    assert agent.alive() and http_get(agent.url + "/healthz")[0] == 200
    assert post(url, good)[0] == 200


def test_spool_backpressure_refuses_with_retryable_errors(agent_factory: Callable[..., Agent]) -> None:
    body = one_span_request().SerializeToString()
    # The request fits both bounds as received; the host attributes the resource processor adds make it larger
    # than max_pending_bytes by the time it reaches the spool, which then refuses it as busy.
    agent = agent_factory('[[exporters.otlp]]\nname = "nowhere"\nendpoint = "http://127.0.0.1:9"\n',
                          env={"SIDETRACE_SPOOL__MAX_PENDING_BYTES": str(len(body)),
                               "SIDETRACE_RECEIVERS__OTLP__MAX_REQUEST_BYTES": str(len(body))}).start()
    status, headers, _ = post(agent.otlp_http + "/v1/traces", body)
    assert status == 429 and headers["Retry-After"] == "1"
    assert grpc_export(agent, body) == grpc.StatusCode.UNAVAILABLE
    assert refused(agent, "busy") == 2  # one span each


def test_bearer_token_guards_receivers_and_debug(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory(env={"SIDETRACE_RECEIVERS__OTLP__AUTH_TOKEN": "rcv", "SIDETRACE_SERVER__AUTH_TOKEN": "dbg"})
    agent.start()
    body = one_span_request().SerializeToString()
    assert post(agent.otlp_http + "/v1/traces", body)[0] == 401
    assert post(agent.otlp_http + "/v1/traces", body, Authorization="Bearer rcv")[0] == 200
    assert grpc_export(agent, body) == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_export(agent, body, (("authorization", "Bearer rcv"),)) == grpc.StatusCode.OK
    assert http_get(agent.url + "/debug/traces")[0] == 401
    assert http_get(agent.url + "/debug/traces", headers={"Authorization": "Bearer dbg"})[0] == 200
    assert http_get(agent.url + "/metrics")[0] == 200 and http_get(agent.url + "/readyz")[0] == 200
    without_token = {**os.environ, "SIDETRACE_SERVER__AUTH_TOKEN": ""}
    refused = subprocess.run([sys.executable, "-m", "sidetrace", "status", "--url", agent.url],
                             capture_output=True, text=True, timeout=20, env=without_token)
    assert refused.returncode == 4 and refused.stderr.startswith(f"{agent.url}/debug/status: HTTP 401: ")
    allowed = subprocess.run([sys.executable, "-m", "sidetrace", "status", "--url", agent.url, "--token", "dbg"],
                             capture_output=True, text=True, timeout=20)
    assert allowed.returncode == 0 and "otlp" in allowed.stdout


def test_sdk_metrics_appear_on_metrics_translated(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory().start()
    exporter = OTLPMetricExporter(endpoint=f"127.0.0.1:{agent.grpc_port}", insecure=True)
    provider = MeterProvider(
        resource=Resource.create({"service.name": "cart", "service.instance.id": "cart-1", "deployment": "prod"}),
        metric_readers=[PeriodicExportingMetricReader(exporter, export_interval_millis=60_000)],
    )
    meter = provider.get_meter("test")
    meter.create_counter("http.server.requests", unit="{request}").add(7, {"http.route": "/cart"})
    meter.create_histogram("http.server.request.duration", unit="s").record(0.3, {"http.route": "/cart"})
    meter.create_up_down_counter("queue.depth").add(4)
    assert provider.force_flush(10_000)
    provider.shutdown()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, text = http_get(agent.url + "/metrics")
        if "http_server_requests_total" in text:
            break
        time.sleep(0.1)
    lines = scrape_clean(agent)
    labels = 'http_route="/cart",instance="cart-1",job="cart",otel_scope_name="test",otel_scope_version=""'
    assert f'http_server_requests_total{{{labels}}} 7.0' in lines
    assert f'http_server_request_duration_seconds_count{{{labels}}} 1.0' in lines
    bucket = 'http_server_request_duration_seconds_bucket{http_route="/cart",instance="cart-1",job="cart",le="%s",' \
        'otel_scope_name="test",otel_scope_version=""} %s'
    assert {bucket % ("0.0", "0.0"), bucket % ("5.0", "1.0"), bucket % ("+Inf", "1.0")} <= lines
    assert 'queue_depth{instance="cart-1",job="cart",otel_scope_name="test",otel_scope_version=""} 4.0' in lines
    assert any(line.startswith("target_info{") and 'deployment="prod"' in line and 'job="cart"' in line
               for line in lines)


@pytest.mark.slow
def test_stalled_clients_cannot_starve_the_receivers(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory(env={"SIDETRACE_RECEIVERS__OTLP__READ_TIMEOUT_SECONDS": "2"}).start()
    good = one_span_request().SerializeToString()
    stalled_http = []
    for _ in range(64):  # headers and half a body, then nothing
        sock = socket.create_connection(("127.0.0.1", agent.http_port), timeout=10)
        sock.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b"\0" * 500)
        stalled_http.append(sock)
    channel = grpc.insecure_channel(f"127.0.0.1:{agent.grpc_port}")
    open_calls = channel.stream_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                      request_serializer=None, response_deserializer=None)
    silence = threading.Event()

    def nothing() -> Iterator[bytes]:
        silence.wait(30)
        return
        yield b""

    stalled_grpc = [open_calls.future(nothing(), timeout=30) for _ in range(64)]
    try:
        started = time.monotonic()
        for _ in range(20):  # valid requests go through meanwhile
            assert post(agent.otlp_http + "/v1/traces", good)[0] == 200
            assert grpc_export(agent, good) == grpc.StatusCode.OK
        assert time.monotonic() - started < 10
        for sock in stalled_http:  # cut after read_timeout_seconds with a 408
            sock.settimeout(10)
            assert sock.recv(4096).startswith(b"HTTP/1.1 408 ")
        for call in stalled_grpc:
            assert call.exception(10).code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        silence.set()
        for sock in stalled_http:
            sock.close()
        channel.close()
    assert refused_requests(agent, "http") == {"read_timeout": 64}
    assert refused_requests(agent, "grpc") == {"read_timeout": 64}


def test_connections_that_never_finish_their_headers_or_stay_idle_are_closed(
        agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory(env={"SIDETRACE_RECEIVERS__OTLP__IDLE_TIMEOUT_SECONDS": "1"}).start()
    half_headers = socket.create_connection(("127.0.0.1", agent.http_port), timeout=10)
    half_headers.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Ty")
    silent = socket.create_connection(("127.0.0.1", agent.http_port), timeout=10)
    try:
        started = time.monotonic()
        for sock in (half_headers, silent):
            assert sock.recv(4096) == b""  # closed by the agent, with nothing to say to a request never made
        assert time.monotonic() - started < 5
        assert post(agent.otlp_http + "/v1/traces", one_span_request().SerializeToString())[0] == 200
    finally:
        half_headers.close()
        silent.close()


@pytest.mark.slow
def test_metric_names_and_resources_past_max_series_leave_nothing_behind(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory(env={"SIDETRACE_APP_METRICS__MAX_SERIES": "10"}).start()
    url = agent.otlp_http + "/v1/metrics"

    def rss() -> float:
        _, text = http_get(agent.url + "/metrics")
        return next(float(line.split()[1]) for line in text.splitlines()
                    if line.startswith("process_resident_memory_bytes "))

    def batch(first: int) -> bytes:
        request = ExportMetricsServiceRequest()
        for n in range(first, first + 100):
            resource_metrics = request.resource_metrics.add()
            for key, value in (("service.name", f"svc-{n}"), ("host.name", f"host-{n}")):
                kv = resource_metrics.resource.attributes.add()
                kv.key, kv.value.string_value = key, value
            metric = resource_metrics.scope_metrics.add().metrics.add()
            metric.name, metric.description = f"metric.number.{n}", "x" * 200
            metric.gauge.data_points.add().as_double = n
        return request.SerializeToString()

    assert post(url, batch(0))[0] == 200
    before = rss()
    for first in range(100, 10_000, 100):
        assert post(url, batch(first))[0] == 200
    after = rss()
    lines = scrape_clean(agent)
    assert sum(line.startswith("metric_number_") for line in lines) == 10
    assert sum(line.startswith("target_info{") for line in lines) == 10
    assert after - before < 10 * 1024 * 1024, f"RSS grew {(after - before) / 2**20:.1f} MiB"


def gauge_request(name: str, value: int) -> bytes:
    """An encoded OTLP metrics request holding one gauge point, as an app sends it."""
    request = ExportMetricsServiceRequest()
    metric = request.resource_metrics.add().scope_metrics.add().metrics.add()
    metric.name = name
    point = metric.gauge.data_points.add()
    point.as_int, point.time_unix_nano = value, time.time_ns()
    return request.SerializeToString()


def test_stale_app_metrics_expire_on_a_timer_without_a_scrape(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory(env={"SIDETRACE_APP_METRICS__STALE_SECONDS": "1"}).start()
    assert post(agent.otlp_http + "/v1/metrics", gauge_request("queue.depth", 7))[0] == 200

    def series() -> str:  # read from /debug/status: a scrape of /metrics would expire on its own
        return json.loads(http_get(agent.url + "/debug/status")[1])["components"]["app_metrics"]["detail"]

    assert series() == "1 series from apps"
    wait_until(lambda: series() == "0 series from apps", 5, "the stale series to expire")
