"""The netsample source as root, inside network namespaces the tests create and delete."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from sidetrace.agent.sources.netsample.flows import error_bound_percent
from tests.conftest import Agent, http_get, wait_until
from tests.integration.netns import inside_new_netns, ip

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="packet tests need root (CI runs as root)")]


@pytest.fixture
def netns() -> Iterator[str]:
    with inside_new_netns() as name:
        yield name


def flows(agent: Agent, top: int = 1000) -> dict:
    status, text = http_get(f"{agent.url}/debug/flows?top={top}")
    assert status == 200, text
    return json.loads(text)


def settled(agent: Agent) -> dict:
    """The flow snapshot once sampling has caught up: two reads a moment apart differ by no more
    than what the reads themselves add (the test's HTTP requests cross lo too)."""
    def samples(snapshot: dict) -> int:
        return sum(i["samples"] for i in snapshot["interfaces"].values())

    def probe() -> dict | None:
        first = flows(agent)
        time.sleep(0.3)
        second = flows(agent)
        return second if samples(second) - samples(first) < 100 else None
    return wait_until(probe, 20, "sampling to settle")


def send_udp(port: int, packets: int, payload: int = 100) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        receiver.bind(("127.0.0.1", port))
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        receiver.setblocking(False)
        body = b"x" * payload
        for index in range(packets):
            sender.sendto(body, ("127.0.0.1", port))
            if index % 256 == 0:  # keep the receiver's buffer from overflowing
                try:
                    while receiver.recv(2048):
                        pass
                except BlockingIOError:
                    pass


def config(rate: int | str = 10, interfaces: str = '["lo"]', extra: str = "") -> str:
    rate_value = f'"{rate}"' if isinstance(rate, str) else rate
    return (f"[host]\ninterval_seconds = 0.5\n[sources.netsample]\nenabled = true\ninterfaces = {interfaces}\n"
            f"sampling_rate = {rate_value}\n{extra}")


def test_estimates_lie_within_their_bounds_and_match_the_interface_counters(
    netns: str, agent_factory: Callable[..., Agent]
) -> None:
    agent = agent_factory(config(rate=10)).start()
    before = settled(agent)
    lo_before = psutil.net_io_counters(pernic=True)["lo"].packets_recv
    estimated_before = sum(f["estimated_packets"] for f in before["flows"])
    sent = {41001: 10_000, 41002: 30_000, 41003: 60_000}
    for port, count in sent.items():
        send_udp(port, count)
    after = settled(agent)
    lo_delta = psutil.net_io_counters(pernic=True)["lo"].packets_recv - lo_before
    within = 0
    report = []
    for port, count in sent.items():
        (flow,) = [f for f in after["flows"] if f["protocol"] == "udp" and f["local_port"] == port]
        error = abs(flow["estimated_packets"] - count) / count * 100
        bound = flow["error_bound_percent"]
        assert bound == round(error_bound_percent(flow["samples"]), 1)
        assert flow["estimated_bytes"] == flow["estimated_packets"] * (100 + 42)  # UDP/IPv4/Ethernet headers
        assert error <= 2 * bound, (port, flow, error)  # a 4-sigma miss: a broken estimator, not bad luck
        within += error <= bound
        report.append(f"port {port}: {flow['estimated_packets']} estimated of {count}, error {error:.2f} % "
                      f"(bound {bound} %, {flow['samples']} samples)")
    # Each flow lies within its 95 % bound with about 96 % probability (1-in-10): at least 2 of 3 do.
    assert within >= 2, "; ".join(report)
    estimated_delta = sum(f["estimated_packets"] for f in after["flows"]) - estimated_before
    samples = sum(i["samples"] for i in after["interfaces"].values()) - \
        sum(i["samples"] for i in before["interfaces"].values())
    assert abs(estimated_delta - lo_delta) / lo_delta * 100 <= 2 * error_bound_percent(samples)
    assert sum(sent.values()) <= lo_delta < sum(sent.values()) * 1.02  # the test's own requests add a few
    assert after["interfaces"]["lo"]["sampling_rate"] == 10
    _, text = http_get(agent.url + "/metrics")
    assert 'sidetrace_network_sampling_rate{device="lo"} 10.0' in text
    assert 'sidetrace_network_packet_size_bytes_bucket{device="lo",direction="receive",le="256"}' in text


SENDER = textwrap.dedent('''
    import ctypes, socket, sys, time
    ctypes.CDLL(None).prctl(15, b"st-sender", 0, 0, 0)   # PR_SET_NAME: the name psutil reports
    sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    print(sock.getsockname()[1], flush=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and sys.stdin.readline().strip() != "stop":
        pass
''')


def test_flows_carry_the_name_of_the_process_that_owns_them(
    netns: str, agent_factory: Callable[..., Agent]
) -> None:
    agent = agent_factory(config(rate=1)).start()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server_port = server.getsockname()[1]
        child = subprocess.Popen([sys.executable, "-c", SENDER, str(server_port)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            port = int(child.stdout.readline())
            conn, _ = server.accept()
            with conn:
                def attributed() -> dict | None:
                    conn.sendall(b"y" * 1000)  # server -> sender: packets whose local end is the sender's
                    return next((f for f in flows(agent)["flows"] if f["local_port"] == port
                                 and f["process"] == "st-sender"), None)
                flow = wait_until(attributed, 20, "the sender's flow attributed to it", interval=0.5)
            assert flow["protocol"] == "tcp" and flow["remote_port"] == server_port
            listener = wait_until(lambda: [f for f in flows(agent)["flows"] if f["local_port"] == server_port
                                           and f["process"] != "unknown"], 20, "the listener's flows attributed")
            assert all(f["process"] == psutil.Process().name() for f in listener)
        finally:
            child.stdin.write("stop\n")
            child.stdin.close()
            child.wait(10)


def test_malformed_frames_are_counted_not_fatal(netns: str, agent_factory: Callable[..., Agent]) -> None:
    from scapy.all import IP, TCP, UDP, Ether, fuzz, raw

    agent = agent_factory(config(rate=1)).start()
    frames = [raw(fuzz(Ether(dst="00:00:00:00:00:00") / IP(dst="127.0.0.1") / TCP())) for _ in range(200)]
    frames += [raw(Ether() / IP(dst="127.0.0.1") / UDP(dport=9))[:length] for length in range(14, 42)]
    frames += [b"\x00" * 14 + b"\x45" + bytes(range(50)), b"\xff" * 60]
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw_socket:
        raw_socket.bind(("lo", 0))
        for frame in frames:
            if frame:
                raw_socket.send(frame)
    snapshot = settled(agent)
    assert agent.alive()
    _, text = http_get(agent.url + "/metrics")
    malformed = next(float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith('sidetrace_network_sampler_malformed_packets_total{device="lo"}'))
    assert malformed >= 28  # at least the truncated ones
    assert snapshot["interfaces"]["lo"]["state"] == "running"


def test_flow_table_bound_evicts_and_counts(netns: str, agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory(config(rate=1, extra="max_flows = 50\n")).start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for port in range(42000, 42200):
            sender.sendto(b"z", ("127.0.0.1", port))  # no listener: each also draws an ICMP unreachable
    snapshot = settled(agent)
    assert snapshot["flow_count"] == 50
    assert snapshot["evicted_flows"] >= 150
    _, text = http_get(agent.url + "/metrics")
    evicted = next(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith("sidetrace_network_evicted_flows_total "))
    assert evicted >= snapshot["evicted_flows"]  # the test's own requests keep opening new flows


def test_interface_deleted_while_sampled(netns: str, agent_factory: Callable[..., Agent]) -> None:
    ip("link", "add", "stv0", "type", "veth", "peer", "name", "stv1")
    ip("link", "set", "stv0", "up")
    ip("link", "set", "stv1", "up")
    agent = agent_factory(config(rate=1, interfaces='["lo", "stv0"]')).start()
    ip("link", "delete", "stv0")
    wait_until(lambda: flows(agent)["interfaces"]["stv0"]["state"] == "failed", 10, "the sampler to notice")
    send_udp(41500, 100)
    snapshot = settled(agent)
    assert snapshot["interfaces"]["lo"]["state"] == "running"
    assert any(f["local_port"] == 41500 for f in snapshot["flows"])
    assert agent.alive() and http_get(agent.url + "/readyz")[0] == 200
    _, text = http_get(agent.url + "/metrics")
    assert 'sidetrace_network_sampler_errors_total{device="stv0"} 1.0' in text
    # The interface comes back (a container restarted): sampling resumes on its own.
    ip("link", "add", "stv0", "type", "veth", "peer", "name", "stv1")
    ip("link", "set", "stv0", "up")
    ip("link", "set", "stv1", "up")
    wait_until(lambda: flows(agent)["interfaces"]["stv0"]["state"] == "running", 10, "the sampler to reopen")


def test_auto_rate_follows_the_target(netns: str, agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory(config(rate="auto", extra="target_samples_per_second = 200\n")).start()
    deadline = time.monotonic() + 8
    port = 43000
    while time.monotonic() < deadline:
        send_udp(port, 5000)  # several thousand packets a second
        port += 1
    rate = flows(agent)["interfaces"]["lo"]["sampling_rate"]
    assert rate > 4, rate  # the initial 16 moves toward offered / 200, away from 1


def test_without_cap_net_raw_it_says_so_and_the_rest_works(
    netns: str, agent_factory: Callable[..., Agent]
) -> None:
    # setpriv drops CAP_NET_RAW from the agent's capability sets: root without it, as a misconfigured unit.
    agent = agent_factory(config(rate=10)).start(wait_ready=False, prefix=("setpriv", "--bounding-set", "-net_raw",
                                                                           "--inh-caps", "-net_raw"))
    agent.wait_started()
    assert http_get(agent.url + "/readyz") == (503, "not ready: netsample no permission\n")
    status = json.loads(http_get(agent.url + "/debug/status")[1])["components"]["netsample"]
    assert status["state"] == "no permission"
    assert "needs CAP_NET_RAW" in status["last_error"]
    assert agent.log().count("needs CAP_NET_RAW") == 1
    _, text = http_get(agent.url + "/metrics")
    assert 'system_network_io_bytes_total{device="lo",direction="receive"}' in text


def test_capture_filter_runs_before_sampling_and_flows_command_shows_it(
    netns: str, agent_factory: Callable[..., Agent]
) -> None:
    agent = agent_factory(config(rate=1, extra='filter = "udp and dst port 41700"\n')).start()
    send_udp(41700, 300)
    send_udp(41701, 300)
    snapshot = settled(agent)
    ports = {f["local_port"] for f in snapshot["flows"]}
    assert ports == {41700}  # the agent's own HTTP and the other port never pass the filter
    (flow,) = snapshot["flows"]
    assert flow["estimated_packets"] == 300 and flow["error_bound_percent"] == round(error_bound_percent(300), 1)
    done = subprocess.run([sys.executable, "-m", "sidetrace", "flows", "--once", "--url", agent.url],
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "sampling lo 1:1 (drops 0); 1 flows, 0 evicted"
    assert lines[1].split() == ["DEVICE", "DIR", "PROTO", "LOCAL", "REMOTE", "RATE", "PACKETS", "BYTES", "+-95%",
                                "PROCESS"]
    cells = lines[2].split()
    assert cells[:4] == ["lo", "receive", "udp", "127.0.0.1:41700"] and cells[7:9] == ["300", "42600"]


def test_cap_net_raw_alone_is_enough(netns: str, agent_factory: Callable[..., Agent]) -> None:
    # Every capability but CAP_NET_RAW dropped (no NET_ADMIN, SYS_ADMIN, DAC override...): as the unit runs it.
    agent = agent_factory(config(rate=1)).start(prefix=("setpriv", "--bounding-set", "-all,+net_raw",
                                                        "--inh-caps", "-all,+net_raw"))
    status = Path(f"/proc/{agent.proc.pid}/status").read_text()
    capabilities = next(line for line in status.splitlines() if line.startswith("CapEff:"))
    assert int(capabilities.split()[1], 16) == 1 << 13  # CAP_NET_RAW only
    send_udp(41800, 50)
    snapshot = settled(agent)
    assert snapshot["interfaces"]["lo"]["state"] == "running"
    assert [f["estimated_packets"] for f in snapshot["flows"] if f["local_port"] == 41800] == [50]
