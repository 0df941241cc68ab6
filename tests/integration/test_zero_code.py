"""`sidetrace instrument` on apps with no tracing code: contrib instrumentations found through their entry
points, context carried into threads, OTEL_* settings honoured, exported through a real collector (rotel), and
nothing printed on the app's stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import threading
import time
import zipfile
from collections.abc import Iterator
from concurrent import futures
from importlib import metadata
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.conftest import free_port, wait_until
from tests.integration.otlp_servers import Rotel, Sink

APPS = Path(__file__).with_name("apps") / "zero_code.py"


class Collector:
    """rotel receiving OTLP from the apps and forwarding to a sink the tests read."""

    def __init__(self, tmp: Path) -> None:
        self.sink = Sink()
        self.rotel = Rotel(tmp, self.sink.port).start()
        self.endpoint = f"http://127.0.0.1:{self.rotel.grpc_port}"

    def spans(self, service: str) -> list:
        with self.sink.collected.lock:
            return [span for copies in self.sink.collected.spans.values() for (svc, span, _) in copies
                    if svc == service]

    def stop(self) -> None:
        self.rotel.stop()
        self.sink.stop()


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collector]:
    c = Collector(tmp_path_factory.mktemp("collector"))
    yield c
    c.stop()


class SlowAgent(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    """A real OTLP/gRPC receiver (traces and metrics) that answers every export ``answer_after`` seconds after it
    arrived, as an agent on a loaded host would, or never (``None``: it stalls until stopped). It keeps the span
    names of the trace exports whose caller was still waiting when the answer went out: an export the app gave
    up on (its exporter stopped, its channel closed) is not counted as delivered."""

    def __init__(self, answer_after: float | None) -> None:
        self.answer_after = answer_after
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.arrived: list[str] = []  # "traces" or "metrics", in arrival order
        self.delivered: list[str] = []  # span names
        self.stopping = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    def _answer(self, signal: str, context: grpc.ServicerContext) -> bool:
        with self.lock:
            self.arrived.append(signal)
        self.stopping.wait(self.answer_after)
        return context.is_active()

    def Export(self, request, context):  # noqa: N802 - the gRPC method name, shared by both services
        if isinstance(request, metrics_service_pb2.ExportMetricsServiceRequest):
            self._answer("metrics", context)
            return metrics_service_pb2.ExportMetricsServiceResponse()
        if self._answer("traces", context):
            with self.lock:
                self.delivered += [span.name for resource in request.resource_spans for scope in resource.scope_spans
                                   for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def stop(self) -> None:
        self.stopping.set()
        self.server.stop(grace=None)


def exit_times(endpoint: str) -> tuple[float, float, str]:
    """Run the last_spans app toward ``endpoint``, its spans and metrics left for the exit to send; return the
    seconds from its last line to the end of the SDK's final export, and to the end of the process, and its
    stderr."""
    env = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "60000", "OTEL_METRIC_EXPORT_INTERVAL": "60000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidetrace", "instrument", "--endpoint", endpoint, "--",
         sys.executable, str(APPS), "last_spans"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout, stderr = proc.communicate(timeout=60)
    exited = time.time()
    assert proc.returncode == 0
    marks = dict(line.split() for line in stdout.splitlines())
    return float(marks["flushed"]) - float(marks["last"]), exited - float(marks["last"]), stderr


def launch(kind: str, service: str, endpoint: str, env: dict[str, str] | None = None) -> None:
    """Run one of the apps under `sidetrace instrument`; it must succeed and print nothing on stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "sidetrace", "instrument", "--service", service, "--endpoint", endpoint, "--",
         sys.executable, str(APPS), kind],
        capture_output=True, text=True, timeout=60, env=env)
    assert (done.returncode, done.stderr) == (0, "")


def by_name(spans: list) -> dict[str, object]:
    named = {span.name: span for span in spans}
    assert len(named) == len(spans), sorted(span.name for span in spans)
    return named


def test_flask_route_and_requests_call_are_traced_with_no_tracing_code(collector: Collector) -> None:
    launch("flask", "zc-flask", collector.endpoint)
    spans = by_name(wait_until(lambda: len(collector.spans("zc-flask")) == 2 and collector.spans("zc-flask"), 20,
                               "the client and server spans"))
    assert sorted(spans) == ["GET", "GET /hello/<name>"]
    client, server = spans["GET"], spans["GET /hello/<name>"]
    assert (client.kind, server.kind) == (3, 2)  # CLIENT, SERVER
    assert server.trace_id == client.trace_id and server.parent_span_id == client.span_id


def test_fastapi_route_and_httpx_call_are_traced_with_no_tracing_code(collector: Collector) -> None:
    launch("fastapi", "zc-fastapi", collector.endpoint)
    spans = wait_until(lambda: len(collector.spans("zc-fastapi")) == 4 and collector.spans("zc-fastapi"), 20,
                       "the client and server spans, and the server's two sends")
    assert sorted((span.name, span.kind) for span in spans) == [
        ("GET", 3), ("GET /items/{item_id}", 2), ("GET /items/{item_id} http send", 1),
        ("GET /items/{item_id} http send", 1)]
    (client,) = [span for span in spans if span.kind == 3]
    (server,) = [span for span in spans if span.kind == 2]
    assert server.trace_id == client.trace_id and server.parent_span_id == client.span_id


def test_grpc_call_is_traced_on_both_sides_with_no_tracing_code(collector: Collector) -> None:
    launch("grpc", "zc-grpc", collector.endpoint)
    spans = wait_until(lambda: len(collector.spans("zc-grpc")) == 2 and collector.spans("zc-grpc"), 20,
                       "the client and server spans")
    client, server = sorted(spans, key=lambda span: span.kind, reverse=True)
    assert [(s.name, s.kind) for s in (client, server)] == [("/demo.Greeter/SayHello", 3),
                                                              ("/demo.Greeter/SayHello", 2)]
    assert server.trace_id == client.trace_id and server.parent_span_id == client.span_id


def test_disabled_instrumentation_is_left_off(collector: Collector) -> None:
    launch("flask", "zc-noflask", collector.endpoint,
           env={**os.environ, "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "flask"})
    spans = wait_until(lambda: collector.spans("zc-noflask"), 20, "the client span")
    assert [span.name for span in spans] == ["GET"]


def test_trace_continues_into_threads_executors_and_to_thread(collector: Collector) -> None:
    launch("threads", "zc-threads", collector.endpoint)
    spans = by_name(wait_until(lambda: len(collector.spans("zc-threads")) == 6 and collector.spans("zc-threads"),
                               20, "the caller's span and five spans made in threads"))
    caller = spans.pop("caller")
    assert sorted(spans) == ["work in Thread", "work in Thread subclass", "work in ThreadPoolExecutor",
                             "work in run_in_executor", "work in to_thread"]
    assert {(span.trace_id, span.parent_span_id) for span in spans.values()} == {(caller.trace_id, caller.span_id)}


def test_with_the_threading_instrumentation_off_threads_start_new_traces(collector: Collector) -> None:
    launch("threads", "zc-nothreads", collector.endpoint,
           env={**os.environ, "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "threading"})
    spans = by_name(wait_until(lambda: len(collector.spans("zc-nothreads")) == 6 and collector.spans("zc-nothreads"),
                               20, "the caller's span and five spans made in threads"))
    assert (spans["work in Thread"].parent_span_id, spans["work in Thread subclass"].parent_span_id) == (b"", b"")


def test_spans_made_in_child_processes_arrive_before_the_children_exit(collector: Collector) -> None:
    launch("processes", "zc-processes", collector.endpoint)
    names = sorted(span.name for span in wait_until(
        lambda: len(collector.spans("zc-processes")) == 5 and collector.spans("zc-processes"), 20,
        "a span from each child process"))
    assert names == ["work in ProcessPoolExecutor 1", "work in ProcessPoolExecutor 2", "work in fork Process",
                     "work in forkserver Process", "work in spawn Process"]


def child_exit_seconds(endpoint: str, *methods: str) -> dict[str, float]:
    """Run the child_exit app toward ``endpoint``; return, per start method, the seconds from the end of the
    child's work to its exit (as its parent saw it)."""
    # Spans wait in the batch processor until the child leaves (no scheduled export first).
    env = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "60000"}
    done = subprocess.run(
        [sys.executable, "-m", "sidetrace", "instrument", "--endpoint", endpoint, "--",
         sys.executable, str(APPS), "child_exit", *methods], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    ended: dict[str, float] = {}
    exit_seconds: dict[str, float] = {}
    for line in done.stdout.splitlines():
        event, method, when = line.split()
        if event == "done":
            ended[method] = float(when)
        else:
            exit_seconds[method] = float(when) - ended[method]
    return exit_seconds


def test_spans_made_in_pool_workers_arrive_when_the_pool_is_terminated(collector: Collector) -> None:
    # A `with Pool()` block ends with terminate(): SIGTERM to every worker, at once. Each worker sends its spans
    # first, then dies of the signal.
    launch("pool", "zc-pool", collector.endpoint)
    names = sorted(span.name for span in wait_until(
        lambda: len(collector.spans("zc-pool")) == 12 and collector.spans("zc-pool"), 20, "a span per task"))
    assert names == sorted(f"work in {method} Pool {number}" for method in ("fork", "spawn", "forkserver")
                           for number in (1, 2, 3, 4))


def test_a_terminated_pool_ends_within_a_second_and_a_half_when_the_agent_is_down() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sidetrace", "instrument", "--endpoint", "http://127.0.0.1:9", "--",
         sys.executable, str(APPS), "pool"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ending_seconds = {method: float(seconds) for method, seconds in (line.split() for line in done.stdout.splitlines())}
    assert sorted(ending_seconds) == ["fork", "forkserver", "spawn"]
    # The workers flush at once, side by side, each stopped after CHILD_FLUSH_MILLIS (1 s) with the agent down.
    assert max(ending_seconds.values()) < 2.5, ending_seconds


def test_a_pool_worker_keeps_the_sigterm_handler_the_app_gave_it() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sidetrace", "instrument", "--endpoint", "http://127.0.0.1:9", "--",
         sys.executable, str(APPS), "pool_own_handler"], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "apps_own_handler\n"), done.stderr


def test_a_child_process_spends_at_most_a_second_sending_its_spans_when_the_agent_is_down() -> None:
    exit_seconds = child_exit_seconds("http://127.0.0.1:9")
    assert sorted(exit_seconds) == ["fork", "forkserver", "spawn"]
    # CHILD_FLUSH_MILLIS is 1 s; the rest of the margin is a busy machine. Without the bound, a child would wait
    # out the exporter's 10 s timeout. Fork and forkserver children leave through os._exit right after the flush.
    assert max(exit_seconds["fork"], exit_seconds["forkserver"]) < 2.5, exit_seconds
    # A spawn child leaves through sys.exit, so the interpreter's teardown of every library the instrumentations
    # imported follows the flush: 0.4-0.8 s more at load 7, 1.5 s more seen once at load 10 (not ours).
    assert exit_seconds["spawn"] < 5.0, exit_seconds


def test_a_child_process_waits_for_an_agent_answering_slowly_and_3_seconds_at_most_for_one_that_never_does() -> None:
    # A child's flush gets a second, then up to 3 s in all while no export problem shows (the exit budget): an
    # export answered after 1.5 s is waited for; one never answered is cut off at 3 s, not at the exporter's 10 s.
    slow = SlowAgent(answer_after=1.5)
    try:
        (slow_exit,) = child_exit_seconds(slow.endpoint, "fork").values()
    finally:
        slow.stop()
    assert slow.delivered == ["work in fork"]
    stalled = SlowAgent(answer_after=None)
    try:
        (stalled_exit,) = child_exit_seconds(stalled.endpoint, "fork").values()
    finally:
        stalled.stop()
    assert (stalled.arrived, stalled.delivered) == (["traces"], [])
    # A child leaves through os._exit: no interpreter teardown follows, so the margins are small.
    assert 1.5 <= slow_exit < 3.0
    assert 3.0 <= stalled_exit < 3.0 + 1.0


def test_agent_down_slows_the_app_by_under_5_percent_and_exit_by_under_a_second(tmp_path: Path) -> None:
    # Exports every 100 ms, so the exporter meets the dead agent while the app runs, not only at exit.
    env = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    plain = subprocess.run([sys.executable, str(APPS), "timed"], capture_output=True, text=True, timeout=60)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidetrace", "instrument", "--endpoint", "http://127.0.0.1:9", "--",
         sys.executable, str(APPS), "timed"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stdout, stderr = proc.communicate(timeout=60)
    exited = time.time()
    plain_seconds = float(plain.stdout.split()[0])
    timing, flushed = stdout.splitlines()
    seconds, last_line = (float(field) for field in timing.split())
    assert proc.returncode == 0
    assert seconds < plain_seconds * 1.05
    # What the exit budget bounds: from the app's last line to the end of the SDK's final export (0.3 s, as an
    # export problem was seen). Without the budget the exporters would retry for their 10 s timeout.
    assert float(flushed.split()[1]) - last_line < 1.0
    # The whole exit adds the interpreter's teardown of every library the instrumentations imported, which is
    # not ours and which a loaded machine stretches (0.8-1.2 s at load 5 with no exporter at all, 2 s at load 11).
    assert exited - last_line < 5.0
    (warning,) = stderr.splitlines()
    assert warning.startswith("sidetrace: Transient error StatusCode.UNAVAILABLE encountered while exporting")
    assert warning.endswith("(further export problems are not printed)")


def test_an_agent_answering_slowly_still_gets_the_last_spans_at_exit() -> None:
    # Each export is answered 1 s after it arrives: the exit's metric export and span export, one after the
    # other, take 2 s of the 3 s an agent that answers gets (LIVE_AGENT_BUDGET_SECONDS). With the 0.3 s of an
    # agent that is down, the span export would be cut off and its spans lost.
    agent = SlowAgent(answer_after=1.0)
    try:
        flushed, exited, stderr = exit_times(agent.endpoint)
    finally:
        agent.stop()
    assert stderr == ""
    assert agent.arrived == ["metrics", "traces"]
    assert sorted(agent.delivered) == [f"request {number}" for number in range(5)]
    assert 2.0 <= flushed < 3.0
    # The rest is the interpreter's own teardown, which a loaded machine stretches (about 1 s at load 5).
    assert exited < 3.0 + 3.0


def test_an_agent_that_never_answers_holds_the_exit_for_the_3_second_budget_only() -> None:
    # No error comes back, so nothing says the agent is down: the exporters get the whole 3 s and are then
    # stopped, where the stock exporters would wait out their 10 s timeout, once for metrics and once for spans.
    agent = SlowAgent(answer_after=None)
    try:
        flushed, exited, stderr = exit_times(agent.endpoint)
    finally:
        agent.stop()
    assert stderr == (f"sidetrace: Failed to export metrics to 127.0.0.1:{agent.port}, error code: StatusCode."
                      "CANCELLED, error details: Channel closed! (further export problems are not printed)\n")
    assert agent.arrived == ["metrics"]  # the span export found its exporter already stopped
    assert agent.delivered == []
    assert 3.0 <= flushed < 3.0 + 1.0
    assert exited < 3.0 + 3.0


def test_spans_dropped_with_the_agent_down_are_counted_where_the_app_sees_them() -> None:
    # A 1 s export timeout: the exporter gives up on the dead agent within the app's run.
    env = {**os.environ, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "1", "OTEL_METRICS_EXPORTER": "console"}
    done = subprocess.run(
        [sys.executable, "-m", "sidetrace", "instrument", "--endpoint", "http://127.0.0.1:9", "--",
         sys.executable, str(APPS), "dropping"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0
    first_line, metrics_json = done.stdout.split("\n", 1)
    assert first_line == "5"  # dropped_spans(), in the app
    points, rest = [], metrics_json.strip()
    while rest:  # the console exporter prints one JSON document per export
        document, end = json.JSONDecoder().raw_decode(rest)
        rest = rest[end:].strip()
        points += [point["value"] for resource in document["resource_metrics"] for scope in resource["scope_metrics"]
                   for metric in scope["metrics"] if metric["name"] == "sidetrace.exporter.dropped_spans"
                   for point in metric["data"]["data_points"]]
    assert points[-1] == 5  # and on the app's own MeterProvider


def test_an_existing_sitecustomize_still_runs(collector: Collector, tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text("print('the user sitecustomize ran')\n")
    done = subprocess.run(  # -I: the launcher's own Python ignores PYTHONPATH, so only the app's runs it
        [sys.executable, "-I", "-m", "sidetrace", "instrument", "--endpoint", collector.endpoint, "--",
         sys.executable, "-c", "print('app ran')"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert (done.returncode, done.stdout, done.stderr) == (0, "the user sitecustomize ran\napp ran\n", "")


def test_a_python_without_sidetrace_gets_one_line_naming_the_fix(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True, timeout=60)
    bare = tmp_path / "bare" / "bin" / "python"
    done = subprocess.run(
        [sys.executable, "-m", "sidetrace", "instrument", "--", str(bare), "-c", "print('app ran')"],
        capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "app ran\n")
    assert done.stderr == (f"sidetrace: not instrumenting: this Python ({bare}) cannot import sidetrace; install it "
                           f"there ({bare} -m pip install 'sidetrace[sdk]') or run the app with the Python sidetrace "
                           "is installed in\n")


def test_list_says_what_is_switched_on_and_why_the_rest_is_skipped() -> None:
    done = subprocess.run([sys.executable, "-m", "sidetrace", "instrument", "--list"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "flask"})
    assert (done.returncode, done.stderr) == (0, "")
    lines = {line.split()[1]: " ".join(line.split()) for line in done.stdout.splitlines()}
    version = metadata.version("opentelemetry-instrumentation-flask")
    assert lines["flask"] == (f"skipped flask opentelemetry-instrumentation-flask {version}: disabled by "
                              "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS")
    assert lines["threading"] == (f"on threading opentelemetry-instrumentation-threading {version}: instruments "
                                  "no particular library")
    assert lines["nats"] == f"on nats sidetrace {metadata.version('sidetrace')}: instruments nats-py >= 2.2"
    assert lines["httpx2"] == (f"skipped httpx2 opentelemetry-instrumentation-httpx {version}: httpx2 >= 2.0.0 is "
                               "not installed")


def test_bootstrap_prints_the_contrib_packages_for_the_installed_libraries() -> None:
    done = subprocess.run([sys.executable, "-m", "sidetrace", "bootstrap"], capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    version = metadata.version("opentelemetry-instrumentation")
    wanted = done.stdout.splitlines()
    for package in ("flask", "fastapi", "grpc", "requests", "httpx", "threading"):
        assert f"opentelemetry-instrumentation-{package}=={version}" in wanted
    assert "opentelemetry-instrumentation-django" not in " ".join(wanted)  # django is not installed


def fake_wheel(directory: Path, name: str, version: str) -> None:
    """A wheel of ``name`` holding nothing but its metadata."""
    dist_info = f"{name.replace('-', '_')}-{version}.dist-info"
    files = {f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist_info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{dist_info}/RECORD,,\n"
    with zipfile.ZipFile(directory / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


def test_bootstrap_install_installs_what_it_can_and_names_each_pin_pip_could_not_install(tmp_path: Path) -> None:
    # A venv that sees this one's packages (through a .pth) but installs into its own site-packages, offline:
    # pip finds only the wheels in `wheels`. It has redis and pika (their metadata only): redis's instrumentation
    # is among the wheels, pika's is not, so that one pin fails; the pins already installed here are satisfied.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True, timeout=60)
    python = tmp_path / "venv" / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True, timeout=60).stdout.strip())
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for library, version in (("redis", "5.0.0"), ("pika", "1.3.2")):
        (site / f"{library}-{version}.dist-info").mkdir()
        (site / f"{library}-{version}.dist-info" / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {library}\nVersion: {version}\n")
    pin = f"=={metadata.version('opentelemetry-instrumentation')}"
    (tmp_path / "wheels").mkdir()
    fake_wheel(tmp_path / "wheels", "opentelemetry-instrumentation-redis", pin[2:])
    env = {**{key: value for key, value in os.environ.items() if not key.startswith("PIP_")},
           "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path / "wheels"),
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    wanted = subprocess.run([str(python), "-m", "sidetrace", "bootstrap"], capture_output=True, text=True,
                            check=True, timeout=60, env=env).stdout.split()
    assert {"opentelemetry-instrumentation-redis" + pin, "opentelemetry-instrumentation-pika" + pin} <= set(wanted)

    def installed(requirement: str) -> bool:
        name, version = requirement.split("==")
        try:
            return metadata.version(name) == version
        except metadata.PackageNotFoundError:
            return False

    unavailable = [requirement for requirement in wanted
                   if not installed(requirement) and requirement != "opentelemetry-instrumentation-redis" + pin]
    done = subprocess.run([str(python), "-m", "sidetrace", "bootstrap", "--install"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 1
    ours = [line for line in done.stderr.splitlines() if line.startswith("sidetrace bootstrap:")]
    assert ours == ["sidetrace bootstrap: pip could not install them together; installing each alone"] + [
        f"sidetrace bootstrap: not installed: {requirement} (pip's reason is above)" for requirement in unavailable] + [
        f"sidetrace bootstrap: {len(wanted) - len(unavailable)} of {len(wanted)} installed"]
    assert (site / f"opentelemetry_instrumentation_redis-{pin[2:]}.dist-info").is_dir()
