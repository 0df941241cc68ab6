"""The trace pipeline end to end: a stock OpenTelemetry SDK app -> agent -> rotel -> sink.

The app side uses only the OpenTelemetry SDK and its OTLP exporters, no sidetrace code.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from tests.conftest import Agent, http_get, wait_until
from tests.filesystems import needs_root, tmpfs
from tests.integration.otlp_servers import Rotel, Sink, send_load, span_request

pytestmark = pytest.mark.slow


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.stop()


@pytest.fixture
def rotel_factory(tmp_path: Path, sink: Sink) -> Iterator[Callable[..., Rotel]]:
    started: list[Rotel] = []

    def make(**kwargs: object) -> Rotel:
        r = Rotel(tmp_path, sink.port, **kwargs)
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


def exporter_config(rotel: Rotel, protocol: str = "grpc", extra: str = "") -> str:
    port = rotel.grpc_port if protocol == "grpc" else rotel.http_port
    return (f'[[exporters.otlp]]\nname = "rotel"\nendpoint = "http://127.0.0.1:{port}"\n'
            f'protocol = "{protocol}"\n{extra}')


def send_spans(agent: Agent, traces: int, protocol: str = "grpc", service: str = "checkout",
               attributes: dict[str, str] | None = None, batch: int = 512) -> list[trace.Span]:
    """Create ``traces`` traces of 3 spans with the stock SDK and flush them; return the spans acknowledged."""
    exporter = (GrpcSpanExporter(endpoint=f"127.0.0.1:{agent.grpc_port}", insecure=True, timeout=10)
                if protocol == "grpc" else HttpSpanExporter(endpoint=f"{agent.otlp_http}/v1/traces", timeout=10))
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=100_000, max_export_batch_size=batch))
    tracer = provider.get_tracer("test")
    spans = []
    for i in range(traces):
        with tracer.start_as_current_span("GET /cart", kind=trace.SpanKind.SERVER,
                                          attributes={"i": i, **(attributes or {})}) as root:
            with tracer.start_as_current_span("SELECT cart", kind=trace.SpanKind.CLIENT) as child:
                spans.append(child)
            with tracer.start_as_current_span("charge", kind=trace.SpanKind.CLIENT) as failed:
                failed.set_status(trace.Status(trace.StatusCode.ERROR, "declined"))
                spans.append(failed)
            spans.append(root)
    assert provider.force_flush(60_000), "the agent did not acknowledge every span"
    provider.shutdown()
    return spans


def metric(agent: Agent, name: str, **labels: str) -> float:
    _, text = http_get(agent.url + "/metrics")
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        series_name, _, label_text = series.partition("{")
        if series_name != name:
            continue
        if all(f"{k}=\"{v}\"" in label_text for k, v in labels.items()):
            total += float(value)
            found = True
    assert found, f"no {name}{{{wanted}}} on /metrics"
    return total


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_sdk_spans_arrive_with_parents_enrichment_and_redaction(
    agent_factory: Callable[..., Agent], rotel_factory: Callable[..., Rotel], sink: Sink, protocol: str
) -> None:
    rotel = rotel_factory().start()
    agent = agent_factory(exporter_config(rotel, protocol)).start()
    sent = send_spans(agent, 20, protocol, attributes={"authorization": "Bearer s3cret", "db.user.password": "pw"})
    wait_until(lambda: sink.collected.unique() == len(sent), 30, "every span at the sink")
    assert sink.collected.duplicates() == 0
    for span in sent:
        ((service, received, resource),) = sink.collected.spans[span.context.span_id.to_bytes(8, "big")]
        assert service == "checkout"
        assert received.trace_id == span.context.trace_id.to_bytes(16, "big")
        expected_parent = span.parent.span_id.to_bytes(8, "big") if span.parent else b""
        assert received.parent_span_id == expected_parent
        resource_attributes = {kv.key: kv.value.string_value for kv in resource.attributes}
        assert resource_attributes["host.name"] and resource_attributes["os.type"] == "linux"
        attributes = {kv.key: kv.value for kv in received.attributes}
        if received.name == "GET /cart":
            assert attributes["authorization"].string_value == "[REDACTED]"
            assert attributes["db.user.password"].string_value == "[REDACTED]"
            assert attributes["i"].int_value >= 0
    assert metric(agent, "sidetrace_receiver_accepted_spans_total", transport=protocol) == 60
    assert metric(agent, "sidetrace_exporter_sent_spans_total", exporter="rotel") == 60
    assert metric(agent, "traces_span_metrics_calls_total", service_name="checkout", span_name="charge",
                  span_kind="SPAN_KIND_CLIENT", status_code="STATUS_CODE_ERROR") == 20
    assert metric(agent, "traces_span_metrics_duration_milliseconds_count", service_name="checkout",
                  span_name="GET /cart", span_kind="SPAN_KIND_SERVER", status_code="STATUS_CODE_UNSET") == 20


def test_backend_down_then_up_every_acknowledged_span_arrives(
    agent_factory: Callable[..., Agent], rotel_factory: Callable[..., Rotel], sink: Sink
) -> None:
    rotel = rotel_factory()  # not started: the backend is down for the whole send phase
    agent = agent_factory(exporter_config(rotel)).start()
    sent = send_spans(agent, 700)
    assert metric(agent, "sidetrace_receiver_accepted_spans_total") == 2100
    wait_until(lambda: metric(agent, "sidetrace_exporter_retries_total", exporter="rotel") >= 1, 20,
               "the exporter to retry")
    assert sink.collected.unique() == 0
    assert metric(agent, "sidetrace_exporter_send_failures_total", exporter="rotel", reason="connection_refused") >= 1
    assert metric(agent, "sidetrace_exporter_failing", exporter="rotel") == 1
    status = subprocess.run([sys.executable, "-m", "sidetrace", "status", "--url", agent.url],
                            capture_output=True, text=True, timeout=30)
    row = next(line for line in status.stdout.splitlines() if line.strip().startswith("exporter rotel"))
    assert row.split()[2] == "failing" and "connection_refused" in row, status.stdout
    rotel.start()
    wait_until(lambda: sink.collected.unique() == len(sent), 90, "every acknowledged span at the sink")
    assert sink.collected.duplicates() == 0
    wait_until(lambda: metric(agent, "sidetrace_spool_size_bytes") == 0, 10, "the spool to drain")
    assert metric(agent, "sidetrace_exporter_failing", exporter="rotel") == 0


def test_sigkill_with_spans_queued_then_restart_delivers_everything(
    agent_factory: Callable[..., Agent], rotel_factory: Callable[..., Rotel], sink: Sink
) -> None:
    rotel = rotel_factory()
    agent = agent_factory(exporter_config(rotel)).start()
    sent = send_spans(agent, 500)
    agent.signal(signal.SIGKILL)
    agent.proc.wait(10)
    agent.start()
    rotel.start()
    wait_until(lambda: sink.collected.unique() == len(sent), 90, "every acknowledged span after the kill")
    resent = metric(agent, "sidetrace_exporter_resent_spans_total", exporter="rotel")
    # Duplicates can only come from the batch that was in flight at the kill: bounded and counted.
    assert sink.collected.duplicates() <= resent <= 8192


def test_spool_full_drops_oldest_counts_them_and_keeps_serving(
    agent_factory: Callable[..., Agent], rotel_factory: Callable[..., Rotel], sink: Sink
) -> None:
    rotel = rotel_factory()
    agent = agent_factory(exporter_config(rotel) + "[spool]\nmax_bytes = 65536\n",
                          env={"SIDETRACE_RECEIVERS__OTLP__MAX_REQUEST_BYTES": "32768"}).start()
    sent = send_spans(agent, 600, batch=60)
    dropped = metric(agent, "sidetrace_spool_dropped_spans_total", reason="spool_full")
    assert 0 < dropped < len(sent)
    assert metric(agent, "sidetrace_spool_size_bytes") <= 65536
    assert http_get(agent.url + "/healthz")[0] == 200
    rotel.start()
    wait_until(lambda: sink.collected.unique() == len(sent) - dropped, 60, "the spans the spool kept")
    newest = {s.context.span_id.to_bytes(8, "big") for s in sent[-30:]}
    assert newest <= set(sink.collected.spans), "the newest spans are kept, the oldest dropped"


def test_corrupt_spool_entry_is_set_aside_and_counted_without_crash_loop(
    agent_factory: Callable[..., Agent], rotel_factory: Callable[..., Rotel], sink: Sink
) -> None:
    rotel = rotel_factory()
    agent = agent_factory(exporter_config(rotel)).start()
    first = send_spans(agent, 10)
    second = send_spans(agent, 10)
    third = send_spans(agent, 10)
    assert agent.stop() == 0
    with sqlite3.connect(agent.data_dir / "spool.db") as db:
        rows = db.execute("SELECT id, items FROM batches ORDER BY id").fetchall()
        assert [spans for _, spans in rows] == [30, 30, 30]
        db.execute("UPDATE batches SET body = substr(body, 1, 40) || x'00ff' WHERE id = ?", (rows[1][0],))
    agent.start()
    rotel.start()
    expected = {s.context.span_id.to_bytes(8, "big") for s in first + third}
    wait_until(lambda: set(sink.collected.spans) == expected, 60, "the intact batches")
    wait_until(lambda: metric(agent, "sidetrace_spool_set_aside_spans_total", exporter="rotel",
                              reason="corrupt") == 30, 10, "the corrupt batch counted")
    assert not expected & {s.context.span_id.to_bytes(8, "big") for s in second}
    assert agent.alive() and http_get(agent.url + "/readyz")[0] == 200


def test_traces_command_prints_the_tree(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory().start()  # no exporter: recent traces still work
    send_spans(agent, 1)
    _, listing = http_get(agent.url + "/debug/traces?service=checkout")
    (summary,) = json.loads(listing)["traces"]
    assert summary["root_name"] == "GET /cart" and summary["span_count"] == 3 and summary["error"] is True
    done = subprocess.run([sys.executable, "-m", "sidetrace", "traces", "--url", agent.url],
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"trace {summary['trace_id']}  checkout: GET /cart  3 spans  ")
    assert lines[0].endswith("ERROR")
    names = [line.strip().split("  ")[0] for line in lines[1:4]]
    assert names == ["GET /cart", "SELECT cart", "charge"]
    assert lines[1].startswith("  GET /cart") and lines[2].startswith("    SELECT cart")
    assert "|" in lines[1] and "#" in lines[1]


def test_sigkill_while_sending_to_a_slow_backend_duplicates_no_more_than_it_counts(
    agent_factory: Callable[..., Agent]
) -> None:
    slow = Sink(delay_seconds=0.5)
    agent = agent_factory(f'[[exporters.otlp]]\nname = "slow"\nendpoint = "http://127.0.0.1:{slow.port}"\n'
                          "max_batch_spans = 600\n").start()
    sent = send_spans(agent, 500)  # 1,500 spans: three requests of 600 spans or less
    wait_until(lambda: slow.servicer.arrivals >= 2, 30, "a request in flight after one delivered")
    agent.signal(signal.SIGKILL)  # while the backend holds a request the agent has not seen answered
    agent.proc.wait(10)
    agent.start()
    wait_until(lambda: slow.collected.unique() == len(sent), 60, "every acknowledged span after the kill")
    resent = metric(agent, "sidetrace_exporter_resent_spans_total", exporter="slow")
    assert 0 < resent <= 600
    assert slow.collected.duplicates() <= resent
    agent.stop()
    slow.stop()


@needs_root
@pytest.mark.slow
def test_a_full_disk_costs_nothing_acknowledged(
    agent_factory: Callable[..., Agent], rotel_factory: Callable[..., Rotel], sink: Sink, tmp_path: Path
) -> None:
    rotel = rotel_factory()  # down while the disk fills
    with tmpfs(tmp_path / "small", 8 * 1024) as mount:
        agent = agent_factory(exporter_config(rotel), env={"SIDETRACE_AGENT__DATA_DIR": str(mount / "data")}).start()
        stop = threading.Event()
        load = threading.Thread(target=send_load, args=(agent, stop), kwargs={"spans_per_request": 200}, daemon=True)
        load.start()
        try:
            wait_until(lambda: metric(agent, "sidetrace_spool_failed_writes_total", cause="full") >= 3, 60,
                       "the disk to fill")
            with grpc.insecure_channel(f"127.0.0.1:{agent.grpc_port}") as channel:
                export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                             request_serializer=None, response_deserializer=None)
                with pytest.raises(grpc.RpcError) as refusal:
                    export(span_request(200), timeout=10)
            assert refusal.value.code() == grpc.StatusCode.UNAVAILABLE
            assert refusal.value.details().startswith("disk full: cannot write")
        finally:
            stop.set()
            load.join(30)
        accepted = metric(agent, "sidetrace_receiver_accepted_spans_total")
        assert metric(agent, "sidetrace_spool_size_bytes") <= 8 * 1024 * 1024
        rotel.start()
        wait_until(lambda: sink.collected.unique() == accepted, 120, "every acknowledged span at the sink")
        assert sink.collected.duplicates() == 0
        assert metric(agent, "sidetrace_spool_dropped_spans_total") == 0
        wait_until(lambda: metric(agent, "sidetrace_spool_size_bytes") == 0, 30, "the spool accounting to empty")
        send_spans(agent, 10)  # accepted again once delivery gave the disk back
        agent.stop()


def test_traces_command_shows_a_span_received_twice_once_and_escapes_control_characters(
    agent_factory: Callable[..., Agent]
) -> None:
    agent = agent_factory().start()
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    kv = resource_spans.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", "evil\x1b]0;owned\x07"
    scope = resource_spans.scope_spans.add()
    for span_id, parent, name in ((b"\x01" * 8, b"", "root\x1b[2J"), (b"\x02" * 8, b"\x01" * 8, "child\r\nfake")):
        span = scope.spans.add()
        span.trace_id, span.span_id, span.parent_span_id, span.name = b"\x07" * 16, span_id, parent, name
        span.start_time_unix_nano, span.end_time_unix_nano = 10**18, 10**18 + 10**6
    with grpc.insecure_channel(f"127.0.0.1:{agent.grpc_port}") as channel:
        export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                     request_serializer=None, response_deserializer=None)
        for _ in range(3):  # an SDK retrying
            export(request.SerializeToString(), timeout=10)
    done = subprocess.run([sys.executable, "-m", "sidetrace", "traces", "--url", agent.url],
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and " 2 spans " in lines[0]
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout and "\r" not in done.stdout
    assert lines[0].startswith("trace " + "07" * 16 + "  evil\\x1b]0;owned\\x07: root\\x1b[2J  2 spans")
    assert lines[2].strip().startswith("child\\r\\nfake")
