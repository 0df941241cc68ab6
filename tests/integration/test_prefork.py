"""Pre-fork servers under `sidetrace instrument`: every worker exports after the fork, a worker recycled by
max_requests flushes before it exits, and nothing is exported twice."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, port_open, stop_process, wait_until
from tests.integration.test_zero_code import Collector

pytestmark = pytest.mark.slow

APPS = Path(__file__).with_name("apps")
BIN = Path(sys.executable).parent
MAX_REQUESTS = 3  # each worker is recycled after 3 requests
WORKERS_SEEN = 3  # requests go on until this many workers have answered: at least one was recycled
SEND_SECONDS = 30.0  # uWSGI's master checks max_requests about once a second, so recycling may take a while
# uWSGI recycles no worker younger than its min-worker-lifetime (10 s unless set): 1 s, so the requests
# sent until a worker is recycled are a few hundred, not thousands over 10 s.
UWSGI_MIN_WORKER_LIFETIME = 1
# The live workers' spans leave on the SDK's schedule (5 s unless set), which the last wait sat out. 1 s still
# needs the exit flush: a worker answers until it is recycled, so its spans of its last second leave only then.
EXPORT_DELAY_MILLIS = "1000"


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collector]:
    c = Collector(tmp_path_factory.mktemp("collector"))
    yield c
    c.stop()


def serve(server: list[str], service: str, collector: Collector, port: int, tmp: Path) -> dict[str, int]:
    """Run ``server`` under the launcher, send it requests, each starting its own trace, until
    :data:`WORKERS_SEEN` workers have answered, and return each trace id with the pid of the worker that
    answered it."""
    log = tmp / f"{service}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidetrace", "instrument", "--service", service, "--endpoint", collector.endpoint,
             "--", *server], cwd=APPS, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "OTEL_BSP_SCHEDULE_DELAY": EXPORT_DELAY_MILLIS})
    try:
        wait_until(lambda: proc.poll() is None and port_open(port), 30, f"{server[0]} listening")
        answered: dict[str, int] = {}
        deadline = time.monotonic() + SEND_SECONDS
        while len(set(answered.values()) - {UNKNOWN}) < WORKERS_SEEN and time.monotonic() < deadline:
            trace_id = os.urandom(16).hex()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/pid", headers={
                "traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-01", "connection": "close"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    answered[trace_id] = int(response.read().decode().strip('"'))
            except (ConnectionResetError, http.client.RemoteDisconnected, urllib.error.URLError) as exc:
                if isinstance(exc, urllib.error.URLError) and not isinstance(exc.reason, ConnectionResetError):
                    raise
                # A worker being recycled may reset a request it had taken (the server's doing, not ours): whether
                # it made that request's span is unknown, so the span may arrive once, and need not.
                answered[trace_id] = UNKNOWN
                assert sum(pid == UNKNOWN for pid in answered.values()) <= MAX_RESETS, exc
        wait_until(lambda: {span.trace_id.hex() for span in server_spans(collector, service)} >= answers(answered), 30,
                   "a server span for every request")
    finally:
        stop_process(proc)
    return answered


def server_spans(collector: Collector, service: str) -> list:
    return [span for span in collector.spans(service) if span.kind == 2]


UNKNOWN = -1  # the pid of a request reset before its answer
MAX_RESETS = 5


def answers(answered: dict[str, int]) -> set[str]:
    """The trace ids of the requests that were answered."""
    return {trace_id for trace_id, pid in answered.items() if pid != UNKNOWN}


def assert_every_worker_exported_each_span_once(collector: Collector, service: str, answered: dict[str, int]) -> None:
    traces = [span.trace_id.hex() for span in server_spans(collector, service)]
    assert len(traces) == len(set(traces))  # none twice
    # none lost: every answered request's span arrived, and no span of a request never sent
    assert answers(answered) <= set(traces) <= set(answered)
    assert collector.sink.collected.duplicates() == 0
    # workers were recycled, and each one's spans arrived
    assert len({pid for pid in answered.values() if pid != UNKNOWN}) == WORKERS_SEEN


def test_gunicorn_sync_workers_each_export_and_recycled_ones_flush(collector: Collector, tmp_path: Path) -> None:
    port = free_port()
    answered = serve([str(BIN / "gunicorn"), "--workers", "2", "--max-requests", str(MAX_REQUESTS),
                      "--bind", f"127.0.0.1:{port}", "prefork_app:app"], "pf-gunicorn", collector, port, tmp_path)
    assert_every_worker_exported_each_span_once(collector, "pf-gunicorn", answered)


def test_gunicorn_uvicorn_workers_each_export_and_recycled_ones_flush(collector: Collector, tmp_path: Path) -> None:
    port = free_port()
    answered = serve([str(BIN / "gunicorn"), "--workers", "2", "--worker-class", "uvicorn.workers.UvicornWorker",
                      "--max-requests", str(MAX_REQUESTS), "--bind", f"127.0.0.1:{port}", "prefork_app:asgi_app"],
                     "pf-uvicorn", collector, port, tmp_path)
    assert_every_worker_exported_each_span_once(collector, "pf-uvicorn", answered)


@pytest.mark.parametrize("lazy", [False, True], ids=["preloaded", "lazy-apps"])
def test_uwsgi_workers_each_export_and_recycled_ones_flush(collector: Collector, tmp_path: Path, lazy: bool) -> None:
    port = free_port()
    service = f"pf-uwsgi-{'lazy' if lazy else 'preloaded'}"
    answered = serve([str(BIN / "uwsgi"), "--master", "--processes", "2", "--http-socket", f"127.0.0.1:{port}",
                      "--module", "prefork_app:app", "--max-requests", str(MAX_REQUESTS),
                      "--min-worker-lifetime", str(UWSGI_MIN_WORKER_LIFETIME), "--die-on-term",
                      "--virtualenv", sys.prefix, *(["--lazy-apps"] if lazy else [])],
                     service, collector, port, tmp_path)
    assert_every_worker_exported_each_span_once(collector, service, answered)


# No span leaves before a process's exit flush: not on the SDK's schedule (too long for a test), and not for a
# full batch (512 spans unless set), which a worker reaches while it answers every request alone until the other
# (a spawn child importing the app) is up.
EXIT_ONLY_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "60000", "OTEL_BSP_MAX_QUEUE_SIZE": "1000000",
                 "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "1000000"}
EXIT_WAIT_SECONDS = 15.0  # a worker's flush at its exit is bounded by a few seconds
# A UvicornWorker does not stop on the SIGQUIT of gunicorn's fast stop: its arbiter kills it after this long.
GRACEFUL_TIMEOUT_SECONDS = 5


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT], ids=lambda s: s.name)
@pytest.mark.parametrize("worker_class", ["sync", "uvicorn.workers.UvicornWorker"], ids=["sync", "uvicorn"])
def test_gunicorn_stopped_every_live_worker_flushes_at_exit(collector: Collector, tmp_path: Path, worker_class: str,
                                                             stop: signal.Signals) -> None:
    """The live workers' spans, still waiting for the SDK's schedule, leave when the server is stopped: gracefully
    (SIGTERM: a UvicornWorker dies of the signal it raises again after its graceful shutdown) or fast (SIGINT,
    SIGQUIT: the arbiter sends its workers SIGQUIT, which a UvicornWorker takes without stopping until the arbiter
    kills it)."""
    service = f"pf-stop-{worker_class.rsplit('.', 1)[-1].lower()}-{stop.name.lower()}"
    app = "prefork_app:app" if worker_class == "sync" else "prefork_app:asgi_app"
    stop_and_check_every_span_left(
        [str(BIN / "gunicorn"), "--workers", "2", "--worker-class", worker_class,
         "--graceful-timeout", str(GRACEFUL_TIMEOUT_SECONDS), "--bind", "127.0.0.1:{port}", app],
        service, collector, tmp_path, stop, pids=2, status=0)


@pytest.mark.parametrize("workers", [0, 2], ids=["one-process", "workers"])
def test_uvicorn_stopped_by_sigterm_flushes_at_exit(collector: Collector, tmp_path: Path, workers: int) -> None:
    """Plain uvicorn re-raises the SIGTERM it shut down on too, with the default action Python leaves for it: it
    still dies of it, as it does without the launcher. With ``--workers`` its supervisor sends each worker (a
    multiprocessing spawn child) SIGTERM and exits 0."""
    stop_and_check_every_span_left(
        [str(BIN / "uvicorn"), "--port", "{port}", *(["--workers", str(workers)] if workers else []),
         "prefork_app:asgi_app"], f"pf-stop-uvicorn-plain-{workers}", collector, tmp_path, signal.SIGTERM,
        pids=max(workers, 1), status=0 if workers else -signal.SIGTERM)


def stop_and_check_every_span_left(server: list[str], service: str, collector: Collector, tmp: Path,
                                   stop: signal.Signals, pids: int, status: int) -> None:
    """Run ``server`` (``{port}`` in its arguments replaced) under the launcher with spans held for the exit flush,
    send requests until ``pids`` processes have answered, send ``stop`` to it, and check every request's server
    span arrives, once, and the server ends with ``status`` (a returncode)."""
    port = free_port()
    with open(tmp / f"{service}.log", "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidetrace", "instrument", "--service", service, "--endpoint", collector.endpoint,
             "--", *(arg.format(port=port) for arg in server)], cwd=APPS, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, **EXIT_ONLY_ENV})
    try:
        wait_until(lambda: proc.poll() is None and port_open(port), 30, f"{server[0]} listening")
        answered = {}
        deadline = time.monotonic() + SEND_SECONDS
        # Every serving process answers (the kernel hands connections to either) and keeps its spans until it exits.
        while (len(answered) < 6 or len(set(answered.values())) < pids) and time.monotonic() < deadline:
            trace_id = os.urandom(16).hex()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/pid", headers={
                "traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-01", "connection": "close"})
            with urllib.request.urlopen(request, timeout=10) as response:
                answered[trace_id] = int(response.read().decode().strip('"'))
        assert len(set(answered.values())) == pids
        assert not server_spans(collector, service)  # nothing left before the stop: the test needs the exit flush
        proc.send_signal(stop)
        wait_until(lambda: {span.trace_id.hex() for span in server_spans(collector, service)} >= set(answered),
                   EXIT_WAIT_SECONDS, f"a server span for every request after {stop.name}")
        assert proc.wait(GRACEFUL_TIMEOUT_SECONDS + EXIT_WAIT_SECONDS) == status
    finally:
        stop_process(proc)
    assert sorted(span.trace_id.hex() for span in server_spans(collector, service)) == sorted(answered)


def test_uvicorn_stopped_with_the_agent_down_spends_a_second_at_most_flushing(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "uvicorn.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidetrace", "instrument", "--endpoint", f"http://127.0.0.1:{free_port()}", "--",
             str(BIN / "uvicorn"), "--port", str(port), "prefork_app:asgi_app"], cwd=APPS, stdout=out,
            stderr=subprocess.STDOUT, env={**os.environ, **EXIT_ONLY_ENV})
    try:
        wait_until(lambda: proc.poll() is None and port_open(port), 30, "uvicorn listening")
        for _ in range(3):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/pid", timeout=10) as response:
                response.read()
        proc.send_signal(signal.SIGTERM)
        # uvicorn logs this line as its shutdown ends, right before it raises the SIGTERM again.
        wait_until(lambda: b"Finished server process" in log.read_bytes(), EXIT_WAIT_SECONDS, "uvicorn's shutdown")
        finished = time.monotonic()
        assert proc.wait(EXIT_WAIT_SECONDS) == -signal.SIGTERM
        # CHILD_FLUSH_MILLIS is 1 s; the rest of the margin is a busy machine. Without the bound the flush would
        # wait out the exporter's 10 s timeout, cut at TERMINATED_FLUSH_SECONDS (3.5 s).
        assert time.monotonic() - finished < 2.5
    finally:
        stop_process(proc)
