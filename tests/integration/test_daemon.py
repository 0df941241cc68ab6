"""The daemon as a real process: readiness, systemd notify, signals, reload, exit codes."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Agent, assert_promtool_clean, free_port, http_get, wait_until
from tests.integration.otlp_servers import Sink, send_load


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    yield sock, path
    sock.close()


def receive_until(sock: socket.socket, wanted: str, timeout: float = 20.0) -> list[str]:
    """Datagrams received until one carries the line ``wanted``."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        message = sock.recv(4096).decode()
        seen.append(message)
        if wanted in message.splitlines():
            return seen
    raise AssertionError(f"no {wanted} within {timeout} s; got {seen}")


def metric_value(url: str, name: str) -> float | None:
    status, text = http_get(url + "/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def metric_total(url: str, name: str) -> float:
    """The sum of every series of ``name`` (the refusal counters have one per reason, from 0)."""
    text = http_get(url + "/metrics")[1]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def test_ready_on_notify_socket_then_sigterm_exits_zero_within_10s(
    agent_factory: Callable[..., Agent], notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    agent = agent_factory(env={"NOTIFY_SOCKET": path}).start(wait_ready=False)
    messages = receive_until(sock, "READY=1")
    assert any(f"MAINPID={agent.proc.pid}" in m for m in messages)
    # READY=1 means every listener is bound and every component started.
    assert http_get(agent.url + "/readyz")[0] == 200
    status, body = http_get(agent.url + "/metrics")
    assert 'system_network_io_bytes_total{device="lo",direction="receive"}' in body
    started = time.monotonic()
    agent.signal(signal.SIGTERM)
    assert agent.proc.wait(10) == 0
    assert time.monotonic() - started < 10
    receive_until(sock, "STOPPING=1", timeout=1)
    assert "stopped" in agent.log()


def test_sigint_exits_zero(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory().start()
    agent.signal(signal.SIGINT)
    assert agent.proc.wait(10) == 0


def test_watchdog_pings_at_half_the_interval(
    agent_factory: Callable[..., Agent], notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    agent_factory(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}).start(wait_ready=False)
    receive_until(sock, "READY=1")
    started = time.monotonic()
    receive_until(sock, "WATCHDOG=1", timeout=2)
    receive_until(sock, "WATCHDOG=1", timeout=2)
    receive_until(sock, "WATCHDOG=1", timeout=2)
    # Three pings at 0.2 s intervals (the first may come right at READY).
    assert 0.3 <= time.monotonic() - started < 1.5


def test_sighup_with_broken_config_keeps_serving_on_the_old_one(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory().start()
    agent.config_path.write_text('[server]\nlisten = "9464"\n')
    agent.signal(signal.SIGHUP)
    wait_until(lambda: metric_value(agent.url, "sidetrace_config_reload_failures_total") == 1.0, 10,
               "the reload failure to be counted")
    assert agent.alive()
    assert http_get(agent.url + "/readyz")[0] == 200
    assert metric_value(agent.url, "sidetrace_config_last_reload_successful") == 0.0
    assert f'{agent.config_path}: server.listen: expected HOST:PORT, got "9464"' in agent.log()
    assert "reload failed, still running on the previous config" in agent.log()


def test_sighup_applies_a_new_listen_address(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory().start()
    old_url = agent.url
    new_port = free_port()
    agent.write_config(listen=f"127.0.0.1:{new_port}")
    agent.signal(signal.SIGHUP)
    new_url = f"http://127.0.0.1:{new_port}"
    wait_until(lambda: http_get(new_url + "/readyz", 1)[0] == 200, 10, "the new listen address")
    assert metric_value(new_url, "sidetrace_config_reloads_total") == 1.0
    with pytest.raises(OSError):
        http_get(old_url + "/healthz", 1)


def test_sighup_rolls_back_when_a_changed_component_cannot_start(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory().start()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        agent.write_config(listen=f"127.0.0.1:{busy.getsockname()[1]}")
        agent.signal(signal.SIGHUP)
        wait_until(lambda: metric_value(agent.url, "sidetrace_config_reload_failures_total") == 1.0, 10,
                   "the failed reload to be counted on the old address")
    assert http_get(agent.url + "/readyz")[0] == 200
    assert "server failed to start: server.listen: cannot listen on" in agent.log()


def test_invalid_config_exits_2_before_binding(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory('[host]\ninterval_seconds = "often"\n')
    agent.start(wait_ready=False)
    assert agent.proc.wait(10) == 2
    assert agent.log().strip() == f'{agent.config_path}: host.interval_seconds: expected a number, got "often"'
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", agent.port), timeout=1):
        pass


def test_port_in_use_exits_1_and_says_which(agent_factory: Callable[..., Agent]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        agent = agent_factory()
        agent.write_config(listen=f"127.0.0.1:{port}")
        agent.start(wait_ready=False)
        assert agent.proc.wait(10) == 1
    assert f"server failed to start: server.listen: cannot listen on 127.0.0.1:{port}: " in agent.log()


def test_missing_ca_file_exits_2_with_the_check_config_line(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory('[[exporters.otlp]]\nname = "j"\nendpoint = "https://127.0.0.1:4317"\n'
                          'tls = { ca_file = "/nonexistent/ca.pem" }\n')
    agent.start(wait_ready=False)
    assert agent.proc.wait(10) == 2
    line = f'{agent.config_path}: exporters.otlp[0].tls.ca_file: cannot read "/nonexistent/ca.pem": ' \
        "No such file or directory"
    assert agent.log().strip() == line
    checked = subprocess.run([sys.executable, "-m", "sidetrace", "check-config", "--config", str(agent.config_path)],
                             capture_output=True, text=True, timeout=30, env=agent.env)
    assert (checked.returncode, checked.stderr.strip()) == (2, line)


def test_unwritable_data_dir_exits_2(agent_factory: Callable[..., Agent], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    agent = agent_factory(env={"SIDETRACE_AGENT__DATA_DIR": str(blocker / "sub")})
    agent.start(wait_ready=False)
    assert agent.proc.wait(10) == 2
    assert agent.log().strip() == (f"environment SIDETRACE_AGENT__DATA_DIR: agent.data_dir: cannot create "
                                   f"{blocker / 'sub'}: {blocker} is not a directory")


def test_a_disabled_section_with_keys_is_named_in_a_warning_at_start(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory('[sources.netsample]\ninterfaces = ["eth0"]\n').start()
    assert (f"{agent.config_path}: sources.netsample: enabled = false, so interfaces has no effect; set enabled = "
            "true to use it, or remove it") in agent.log()


def test_a_bound_another_bound_makes_unreachable_is_warned_of_at_start_and_at_a_reload(
        agent_factory: Callable[..., Agent]) -> None:
    warning = (" recent_traces.max_spans_per_trace: 1000 is more than recent_traces.max_spans (100), so no trace shows "
               "more than 100 spans")
    agent = agent_factory("[recent_traces]\nmax_spans = 100\n").start()
    assert f"{agent.config_path}:{warning}" in agent.log()
    agent.write_config("[recent_traces]\nmax_spans = 200\nmax_spans_per_trace = 150\n")
    agent.signal(signal.SIGHUP)
    wait_until(lambda: metric_value(agent.url, "sidetrace_config_reloads_total") == 1.0, 10, "the reload")
    assert agent.log().count(warning) == 1
    agent.write_config("[recent_traces]\nmax_spans = 100\n")
    agent.signal(signal.SIGHUP)
    wait_until(lambda: metric_value(agent.url, "sidetrace_config_reloads_total") == 2.0, 10, "the second reload")
    assert agent.log().count(warning) == 2


def test_status_command_renders_components(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory().start()
    done = subprocess.run([sys.executable, "-m", "sidetrace", "status", "--url", agent.url],
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("sidetrace 0.1.0 (Python ") and lines[0].endswith(", ready")
    assert lines[1] == f"config: {agent.config_path}"
    header = next(i for i, line in enumerate(lines) if line.startswith("COMPONENT"))
    rows = {line.split()[0]: line.split()[1] for line in lines[header + 1:]}
    running = {"server", "host", "app_metrics", "pipeline", "otlp"}
    assert {name for name, state in rows.items() if state == "running"} == running
    assert {state for name, state in rows.items() if name not in running} == {"disabled"}  # sources off by default
    assert {"netsample", "nats_trace"} <= set(rows)


def test_status_command_when_agent_is_down() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run([sys.executable, "-m", "sidetrace", "status", "--url", url],
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 1
    assert done.stderr.startswith(f"cannot reach the agent at {url}/debug/status: ")


def test_a_second_agent_on_the_same_data_dir_exits_2_naming_the_first(agent_factory: Callable[..., Agent]) -> None:
    first = agent_factory().start()
    second = agent_factory(env={"SIDETRACE_AGENT__DATA_DIR": str(first.data_dir)})
    second.start(wait_ready=False)
    assert second.proc.wait(10) == 2
    assert (f"agent.data_dir: {first.data_dir} is in use by another sidetrace agent (pid {first.proc.pid}); give "
            "each agent its own agent.data_dir") in second.log()
    assert first.alive()
    assert first.stop() == 0
    second.start()  # the lock went with the first agent
    assert (first.data_dir / "sidetrace.lock").read_text().strip() == str(second.proc.pid)


def test_directories_the_agent_creates_are_private(agent_factory: Callable[..., Agent], tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "state" / "sidetrace"
    agent = agent_factory(env={"SIDETRACE_AGENT__DATA_DIR": str(data_dir)}).start()
    for directory in (data_dir, data_dir.parent, data_dir.parent.parent):
        assert directory.stat().st_mode & 0o777 == 0o700, directory
    agent.stop()


def test_a_reload_that_changes_nothing_says_so(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory().start()
    agent.signal(signal.SIGHUP)
    wait_until(lambda: metric_value(agent.url, "sidetrace_config_reloads_total") == 1.0, 10, "the reload")
    assert f"reloaded {agent.config_path}: nothing changed" in agent.log()


def test_sigterm_right_after_a_sighup_always_stops_the_agent(
    agent_factory: Callable[..., Agent], notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    for trial, gap in enumerate((0.0, 0.001, 0.002, 0.005, 0.005, 0.01, 0.02, 0.05)):  # SIGHUP to SIGTERM
        agent = agent_factory(env={"NOTIFY_SOCKET": path})
        agent.start(wait_ready=False)
        receive_until(sock, "READY=1")
        wait_until(lambda agent=agent: http_get(agent.url + "/readyz", 1)[0] == 200, 10, "ready")
        agent.grpc_port = free_port()  # the reload restarts the receivers
        agent.write_config()
        agent.signal(signal.SIGHUP)
        time.sleep(gap)  # the scenario itself: SIGTERM lands at a different point of the reload each trial
        agent.signal(signal.SIGTERM)
        assert agent.proc.wait(10) == 0, f"trial {trial}: {agent.log()}"
        seen = []
        sock.setblocking(False)  # the agent has exited: every datagram it sent is already queued here
        try:
            while True:
                seen.append(sock.recv(4096).decode())
        except BlockingIOError:
            pass
        stopping = [i for i, message in enumerate(seen) if "STOPPING=1" in message]
        assert stopping, f"trial {trial}: {seen}"
        assert not any("READY=1" in message for message in seen[stopping[0]:]), f"trial {trial}: {seen}"
        sock.settimeout(20)


@pytest.mark.slow
def test_sighup_changing_data_dir_and_an_exporter_under_load_completes_quickly(
    agent_factory: Callable[..., Agent], tmp_path: Path
) -> None:
    sink = Sink()
    exporter = f'[[exporters.otlp]]\nname = "sink"\nendpoint = "http://127.0.0.1:{sink.port}"\n'
    agent = agent_factory(exporter).start()
    stop = threading.Event()
    load = threading.Thread(target=send_load, args=(agent, stop), daemon=True)
    load.start()
    try:
        for reload in range(1, 7):
            other_dir = tmp_path / f"elsewhere{reload}"
            agent.write_config(exporter + f"timeout_seconds = {5 + reload}\n")
            agent.config_path.write_text(agent.config_path.read_text().replace(
                f'data_dir = "{agent.data_dir}"', f'data_dir = "{other_dir}"'))
            started = time.monotonic()
            agent.signal(signal.SIGHUP)
            wait_until(lambda reload=reload: metric_value(agent.url, "sidetrace_config_reloads_total") == reload, 10,
                       f"reload {reload}", interval=0.02)
            assert time.monotonic() - started < 2.0, f"reload {reload} took {time.monotonic() - started:.2f} s"
            assert not other_dir.exists()  # data_dir takes effect at the next start, as the log says
    finally:
        stop.set()
        load.join(20)
    assert "agent.data_dir changed from" in agent.log() and "it takes effect when the agent restarts" in agent.log()
    assert metric_total(agent.url, "sidetrace_receiver_refused_spans_total") == 0  # never refused a request
    wait_until(lambda: metric_value(agent.url, "sidetrace_spool_size_bytes") == 0, 30, "the spool to drain")
    assert agent.stop() == 0
    sink.stop()


def test_a_reload_restarts_only_the_exporter_that_changed(agent_factory: Callable[..., Agent]) -> None:
    kept, changed = Sink(), Sink()
    exporters = (f'[[exporters.otlp]]\nname = "kept"\nendpoint = "http://127.0.0.1:{kept.port}"\n'
                 f'[[exporters.otlp]]\nname = "changed"\nendpoint = "http://127.0.0.1:{changed.port}"\n')
    agent = agent_factory(exporters).start()
    stop = threading.Event()
    load = threading.Thread(target=send_load, args=(agent, stop), daemon=True)
    load.start()
    try:
        wait_until(lambda: (metric_value(agent.url, 'sidetrace_exporter_sent_spans_total{exporter="kept"}') or 0)
                   >= 500, 30, "spans delivered before the reload")
        before = metric_value(agent.url, "sidetrace_receiver_accepted_spans_total")
        changed_exporter = exporters.replace('name = "changed"\n', 'name = "changed"\ntimeout_seconds = 3\n')
        agent.write_config(changed_exporter)
        agent.signal(signal.SIGHUP)
        wait_until(lambda: metric_value(agent.url, "sidetrace_config_reloads_total") == 1.0, 10, "the reload")
        assert metric_value(agent.url, "sidetrace_receiver_accepted_spans_total") >= before  # counters kept
        assert_promtool_clean(http_get(agent.url + "/metrics")[1])
        # A processor's setting alone: swapped between two requests, no exporter restarted.
        agent.write_config(changed_exporter + "[processors.span_metrics]\nmax_series = 500\n")
        agent.signal(signal.SIGHUP)
        wait_until(lambda: metric_value(agent.url, "sidetrace_config_reloads_total") == 2.0, 10, "the second reload")
        reloaded = metric_value(agent.url, "sidetrace_receiver_accepted_spans_total")
        wait_until(lambda: metric_value(agent.url, "sidetrace_receiver_accepted_spans_total") > reloaded + 500, 30,
                   "traffic after it")
    finally:
        stop.set()
        load.join(20)
    accepted = metric_value(agent.url, "sidetrace_receiver_accepted_spans_total")
    wait_until(lambda: kept.collected.unique() == accepted and changed.collected.unique() == accepted, 30,
               "every span at both sinks")
    assert kept.collected.duplicates() == 0  # its export was never cut
    assert changed.collected.duplicates() <= metric_value(
        agent.url, 'sidetrace_exporter_resent_spans_total{exporter="changed"}')
    assert agent.log().count("exporters restarted:") == 1
    assert "exporters restarted: changed; exporting to kept, changed" in agent.log()
    assert metric_total(agent.url, "sidetrace_receiver_refused_spans_total") == 0
    # An exporter added and one removed are said to be, not "restarted".
    agent.write_config(changed_exporter.replace('name = "changed"', 'name = "renamed"'))
    agent.signal(signal.SIGHUP)
    wait_until(lambda: metric_value(agent.url, "sidetrace_config_reloads_total") == 3.0, 10, "the third reload")
    assert "exporters added: renamed; exporters removed: changed; exporting to kept, renamed" in agent.log()
    agent.stop()
    kept.stop()
    changed.stop()
