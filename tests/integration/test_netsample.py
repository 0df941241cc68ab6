"""The netsample source as root, inside network namespaces the tests create and delete."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidetrace.agent.sources.netsample import UNKNOWN
from sidetrace.agent.sources.netsample.flows import error_bound_percent
from tests.conftest import Agent, assert_promtool_clean, http_get, wait_until
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
                   if line.startswith('sidetrace_network_evicted_flows_total{reason="max_flows"} '))
    assert evicted >= snapshot["evicted_flows"]  # the test's own requests keep opening new flows
    assert 'sidetrace_network_evicted_flows_total{reason="interface_gone"} 0.0' in text


def test_interface_deleted_while_sampled(netns: str, agent_factory: Callable[..., Agent]) -> None:
    from scapy.all import IP, UDP, Ether, raw

    ip("link", "add", "stv0", "type", "veth", "peer", "name", "stv1")
    ip("link", "set", "stv0", "up")
    ip("link", "set", "stv1", "up")
    agent = agent_factory(config(rate=1, interfaces='["lo", "stv0"]', extra="gone_interface_grace_seconds = 0\n")
                          ).start()
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as injector:
        injector.bind(("stv1", 0))
        injector.send(raw(Ether(src=PEER_MAC) / IP(src=PEER, dst="10.77.0.9") / UDP(sport=7, dport=9)))  # to stv0

    def stv0_count(samples: dict) -> float | None:
        return sum(v for k, v in samples.get("sidetrace_network_packet_size_bytes_count", {}).items()
                   if k[0] == "stv0") or None
    before = wait_until(lambda: stv0_count(scrape(agent)), 10, "stv0 with a packet size series")
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
    # A listed interface is never forgotten: its series outlived the (zero) grace and go on from where they were.
    assert (stv0_count(scrape(agent)) or 0) >= before


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


# Per-process traffic. The agent samples one end of a veth pair whose other end drops everything (no
# address, frames sent to a MAC it does not have) and IPv6 is off: the only packets on stv0 are the
# ones a test makes, and the agent's own HTTP stays on lo, which it does not sample.
PEER, PEER_MAC = "10.77.0.2", "02:00:00:00:77:02"


@pytest.fixture
def veth(netns: str) -> str:
    return make_veth()


def make_veth() -> str:
    subprocess.run(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"],
                   check=True, timeout=20)
    ip("link", "add", "stv0", "type", "veth", "peer", "name", "stv1")
    ip("addr", "add", "10.77.0.1/24", "dev", "stv0")
    ip("link", "set", "stv0", "up")
    ip("link", "set", "stv1", "up")
    ip("neigh", "replace", PEER, "lladdr", PEER_MAC, "dev", "stv0", "nud", "permanent")
    return "stv0"


TALKER = textwrap.dedent('''
    import ctypes, socket, sys, time
    name, count, seconds, payload = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)   # PR_SET_NAME: the name psutil reports
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def talk():
        start = time.monotonic()
        for index in range(count):
            sock.sendto(b"t" * payload, (sys.argv[5], 9 + index % int(sys.argv[6])))
            time.sleep(max(0.0, start + seconds * (index + 1) / count - time.monotonic()))
        print(time.monotonic() - start, flush=True)
    talk()
    deadline = time.monotonic() + 60
    while sys.argv[7] == "stay" and time.monotonic() < deadline:
        line = sys.stdin.readline().strip()
        if line == "again":   # the same datagrams again, from the same socket
            talk()
        elif line in ("stop", ""):
            break
''')


class Talker:
    """A process named ``name`` that sends ``count`` UDP datagrams to the peer over ``seconds`` (to ``ports``
    ports in turn), then keeps its socket open until stopped, or exits at once with ``stay=False``."""

    def __init__(self, name: str, count: int, seconds: float = 1.0, payload: int = 100, ports: int = 1,
                 stay: bool = True, python: tuple[str, ...] = (sys.executable,)) -> None:
        self.proc = subprocess.Popen([*python, "-c", TALKER, name, str(count), str(seconds), str(payload),
                                      PEER, str(ports), "stay" if stay else "exit"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        took = float(self.proc.stdout.readline())  # the script's own deadline bounds this read
        assert took < seconds + 2, took

    def again(self, seconds: float = 1.0) -> None:
        """Send the same datagrams again, from the same socket (so on the same flows)."""
        self.proc.stdin.write("again\n")
        self.proc.stdin.flush()
        took = float(self.proc.stdout.readline())
        assert took < seconds + 2, took

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
        self.proc.wait(10)


def scrape(agent: Agent) -> dict[str, dict[tuple[str, ...], float]]:
    """Every sample on /metrics: name -> label values (in label name order) -> value."""
    status, text = http_get(agent.url + "/metrics")
    assert status == 200, text
    samples: dict[str, dict[tuple[str, ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(v for _, v in sorted(sample.labels.items()))] = sample.value
    return samples


def per_process(samples: dict, what: str = "packets") -> dict[tuple[str, ...], float]:
    """(device, direction, process) -> value of sidetrace_network_process_{what}_total."""
    return samples.get(f"sidetrace_network_process_{what}_total", {})


def scrape_with(agent: Agent, key: tuple[str, str, str]) -> dict[str, dict[tuple[str, ...], float]]:
    """The first scrape (within 20 s) that has the per-process series ``key``."""
    def probe() -> dict | None:
        samples = scrape(agent)
        return samples if key in per_process(samples) else None
    return wait_until(probe, 20, f"a series for {key} on /metrics")


def device_totals_disagree(samples: dict) -> list[str]:
    """Where the per-process series do not add up to the device totals (histogram count and sum, and the
    top-flow estimate series summed by device and direction); empty when they all agree."""
    disagree = []
    for what, histogram, flows in (("packets", "sidetrace_network_packet_size_bytes_count",
                                    "sidetrace_network_estimated_packets_total"),
                                   ("bytes", "sidetrace_network_packet_size_bytes_sum",
                                    "sidetrace_network_estimated_bytes_total")):
        # label values in name order: device, direction, process / (device, direction, process, protocol,
        # remote, remote_port)
        for (device, direction), total in samples.get(histogram, {}).items():
            processes = sum(v for (d, r, _), v in per_process(samples, what).items() if (d, r) == (device, direction))
            estimated = sum(v for key, v in samples.get(flows, {}).items() if key[:2] == (device, direction))
            if not processes == estimated == total:
                disagree.append(f"{device} {direction} {what}: processes {processes}, top flows {estimated}, "
                                f"histogram {total}")
    return disagree


def agreeing(agent: Agent) -> dict | None:
    """A scrape whose per-process series add up to the device totals, or None."""
    samples = scrape(agent)
    return samples if not device_totals_disagree(samples) else None


def test_a_short_burst_is_counted_for_its_process_from_the_first_packet(
    veth: str, agent_factory: Callable[..., Agent]
) -> None:
    agent = agent_factory(config(rate=1, interfaces='["stv0"]')).start()
    burst = Talker("st-burst", 300, seconds=1.5)
    try:
        # The first packets of the burst cannot be attributed when sampled (no read of the process table
        # has seen its socket yet): they wait on the flow until the next read, then go to the process.
        samples = scrape_with(agent, ("stv0", "transmit", "st-burst"))
    finally:
        burst.stop()
    assert per_process(samples) == {("stv0", "transmit", "st-burst"): 300}
    assert per_process(samples, "bytes") == {("stv0", "transmit", "st-burst"): 300 * (100 + 42)}
    assert device_totals_disagree(samples) == []
    assert samples["sidetrace_network_process_overflow_samples_total"] == {(): 0}


def test_per_process_series_add_up_to_the_device_totals(veth: str, agent_factory: Callable[..., Agent]) -> None:
    from scapy.all import IP, UDP, Ether, raw

    agent = agent_factory(config(rate=1, interfaces='["stv0"]', extra="max_flows = 20\ntop_flows = 2\n")).start()
    with ExitStack() as stack:
        kept = Talker("st-kept", 200, seconds=1.0)
        stack.callback(kept.stop)
        scrape_with(agent, ("stv0", "transmit", "st-kept"))  # a read of the process table has just run
        # Gone before the next read (at least 5 s after that one), over 60 ports: the table of 20 evicts most
        # of its flows while they still wait for their process; the next read gives up on the rest.
        Talker("st-gone", 120, seconds=0.1, ports=60, stay=False).stop()
        # Received for an address that is not this host's (forwarding is off): dropped, no local socket.
        mac = json.loads(subprocess.run(["ip", "-j", "link", "show", "stv0"], capture_output=True, text=True,
                                        check=True, timeout=20).stdout)[0]["address"]
        frame = raw(Ether(dst=mac, src=PEER_MAC) / IP(src=PEER, dst="10.77.0.9") / UDP(sport=7, dport=40999) /
                    (b"r" * 58))
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as injector:
            injector.bind(("stv1", 0))
            for _ in range(50):
                injector.send(frame)

        def settled() -> dict | None:
            samples = scrape(agent)
            return samples if not device_totals_disagree(samples) else None
        samples = wait_until(settled, 20, "every held sample moved to a process or to unknown")
    assert per_process(samples) == {("stv0", "transmit", "st-kept"): 200, ("stv0", "transmit", "unknown"): 120,
                                    ("stv0", "receive", "unknown"): 50}
    assert per_process(samples, "bytes") == {("stv0", "transmit", "st-kept"): 200 * 142,
                                             ("stv0", "transmit", "unknown"): 120 * 142,
                                             ("stv0", "receive", "unknown"): 50 * 100}
    # 60 ports in turn through a table of 20: each of st-gone's samples makes a flow (evicted before its
    # port comes round again); with st-kept's and the received one, all but the last 20 were evicted.
    assert samples["sidetrace_network_evicted_flows_total"] == {("max_flows",): 1 + 120 + 1 - 20,
                                                               ("interface_gone",): 0}
    # Nothing moves once the traffic is over: the sums still hold at later scrapes.
    assert device_totals_disagree(scrape(agent)) == []
    assert per_process(scrape(agent)) == per_process(samples)


def test_another_users_process_is_named_only_with_cap_sys_ptrace_and_cap_dac_read_search(
    veth: str, agent_factory: Callable[..., Agent]
) -> None:
    # The shipped unit's agent runs as its own (dynamic) user with CAP_NET_RAW alone: an app's /proc/PID/fd, where
    # psutil finds which process owns a socket, is closed to it. Here root with only the unit's capability, and a
    # sender of another uid (Debian's Python: the test's own interpreter may live where that uid cannot reach).
    other_user = ("setpriv", "--reuid=61235", "--regid=61235", "--clear-groups", "/usr/bin/python3")
    names = {}
    for caps in ("-all,+net_raw", "-all,+net_raw,+sys_ptrace,+dac_read_search"):
        agent = agent_factory(config(rate=1, interfaces='["stv0"]')).start(
            prefix=("setpriv", "--bounding-set", caps, "--inh-caps", caps))
        talker = Talker("st-other-user", 40, seconds=0.4, python=other_user)
        try:
            samples = wait_until(lambda agent=agent: s if (s := agreeing(agent)) and per_process(s) else None, 20,
                                 "the talker's samples moved to a process")
        finally:
            talker.stop()
            agent.stop()
        (names[caps],) = per_process(samples).items()
    # Without them its socket's owner, from the kernel's socket table, stands for it: uid 61235 has no passwd entry.
    assert names == {"-all,+net_raw": (("stv0", "transmit", "user:61235"), 40),
                     "-all,+net_raw,+sys_ptrace,+dac_read_search": (("stv0", "transmit", "st-other-user"), 40)}


def as_uid(uid: int, caps: str = "-all") -> tuple[str, ...]:
    """Run as ``uid`` (no groups) with ``caps`` alone, under Debian's Python: the test's own interpreter lives under
    /root, closed to other uids, but is the same 3.11, so the venv's packages load in it."""
    return ("setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", f"--inh-caps={caps}",
            f"--ambient-caps={caps}", f"--bounding-set={caps}", "/usr/bin/python3")


# For Agent.start's prefix: drops the interpreter path Agent.start passes, loads the venv's packages, runs sidetrace.
AGENT_UNDER_DEBIAN_PYTHON = ("-c", "import runpy, site, sys; site.addsitedir(sys.argv[1]); "
                                   "sys.argv = ['sidetrace', *sys.argv[5:]]; "
                                   "runpy.run_module('sidetrace', run_name='__main__', alter_sys=True)",
                             str(next(Path(sys.prefix).glob("lib/python3*/site-packages"))))


def test_under_the_units_user_other_users_traffic_is_their_users_not_unknown(veth: str, readable_tmp: Path) -> None:
    # As the shipped unit runs it: a uid of its own (DynamicUser's range, no passwd entry) with CAP_NET_RAW alone.
    # Its own uid's processes are named; another user's /proc/PID/fd is closed to it, and the kernel's socket table
    # names the user instead: "user:" and the passwd name, or the uid when it has none. Users count towards
    # max_processes like names (the fourth goes to "other") and give their places up when idle like names.
    agent = Agent(readable_tmp / "agent", config(rate=1, interfaces='["stv0"]', extra="max_processes = 3\n"
                                                 "process_idle_seconds = 10\n"), env={"HOME": "/"})
    agent.data_dir.mkdir(mode=0o700)
    os.chown(agent.data_dir, 61236, 61236)
    agent.start(prefix=(*as_uid(61236, "-all,+net_raw"), *AGENT_UNDER_DEBIAN_PYTHON))
    with ExitStack() as stack:
        stack.callback(agent.stop)
        status = dict(line.split(":\t", 1) for line in
                      Path(f"/proc/{agent.proc.pid}/status").read_text().splitlines() if ":\t" in line)
        assert (status["Uid"].split(), status["CapEff"].strip()) == (["61236"] * 4, f"{1 << 13:016x}")  # CAP_NET_RAW
        talkers = {}
        for name, uid, count in (("st-own", 61236, 30), ("st-nobody", 65534, 40), ("st-dynamic", 61235, 50),
                                 ("st-fourth", 61237, 60)):  # one after the other: their flows are found in order
            talkers[name] = Talker(name, count, seconds=0.3, python=as_uid(uid))
            stack.callback(talkers[name].stop)
        expected = {("stv0", "transmit", "st-own"): 30, ("stv0", "transmit", "user:nobody"): 40,
                    ("stv0", "transmit", "user:61235"): 50, ("stv0", "transmit", "other"): 60}
        # Once the last talker's samples are in (at most two table reads, 5 s apart) and before the first names are
        # found idle (10 s after the tick that saw them grow).
        samples = wait_until(lambda: s if (s := agreeing(agent)) and per_process(s) == expected else None, 20,
                             "every talker's samples under its process, its user, or other")
        assert samples["sidetrace_network_process_overflow_samples_total"] == {(): 60}
        assert {f["process"] for f in flows(agent)["flows"] if f["remote"] == PEER} == {
            "st-own", "user:nobody", "user:61235", "user:61237"}
        # Idle: their series leave /metrics; nobody's comes back with its counts when it sends again.
        wait_until(lambda: set(per_process(scrape(agent))) == {("stv0", "transmit", "other")}, 30,
                   "the idle names' and users' series gone from /metrics")
        talkers["st-nobody"].again(seconds=0.3)
        samples = wait_until(lambda: s if per_process(s := scrape(agent)).get(("stv0", "transmit", "user:nobody"))
                             == 80 else None, 20, "nobody's series back, carrying on from its counts")
        assert per_process(samples) == {("stv0", "transmit", "user:nobody"): 80, ("stv0", "transmit", "other"): 60}
        assert_promtool_clean(http_get(agent.url + "/metrics")[1])


HANDED = textwrap.dedent('''
    import os, socket, sys, time
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # made by root
    os.setgroups([])
    os.setgid(61235)
    os.setuid(61235)  # then used by another user, as a daemon's workers use what it bound as root
    for _ in range(20):
        sock.sendto(b"h" * 100, (sys.argv[1], 9))
        time.sleep(0.01)
    print(os.getuid(), flush=True)
    sys.stdin.readline()
''')


def test_a_socket_counts_for_the_user_that_made_it_and_a_process_named_like_a_user_shares_its_series(
    veth: str, agent_factory: Callable[..., Agent]
) -> None:
    caps = "-all,+net_raw"  # the shipped unit's: another user's /proc/PID/fd is closed to the agent
    agent = agent_factory(config(rate=1, interfaces='["stv0"]')).start(
        prefix=("setpriv", "--bounding-set", caps, "--inh-caps", caps))
    handed = subprocess.Popen(["/usr/bin/python3", "-c", HANDED, PEER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    with ExitStack() as stack:
        stack.callback(handed.communicate, "", 20)
        assert handed.stdout.readline() == "61235\n"
        # Root's, without capabilities (so the agent may read its descriptors), named like nobody's label.
        stack.callback(Talker("user:nobody", 20, seconds=0.2, python=(
            "setpriv", "--inh-caps=-all", "--bounding-set=-all", "/usr/bin/python3")).stop)
        stack.callback(Talker("st-nobody", 30, seconds=0.2, python=as_uid(65534)).stop)
        samples = wait_until(lambda: s if (s := agreeing(agent)) and per_process(s) else None, 20,
                             "the samples moved at a table read")
    assert per_process(samples) == {("stv0", "transmit", "user:root"): 20, ("stv0", "transmit", "user:nobody"): 50}


def test_a_users_name_is_looked_up_again_at_each_table_read(
    veth: str, agent_factory: Callable[..., Agent], tmp_path: Path
) -> None:
    # A dynamic user's uid is given to another service once the first stops: a later read names the new user.
    # The agent sees its own copy of the user database (bind-mounted in its mount namespace), rewritten in place.
    passwd = tmp_path / "passwd"
    system = Path("/etc/passwd").read_text()
    passwd.write_text(system + "st-first:x:61235:61235::/:/usr/sbin/nologin\n")
    own_passwd = ("unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/passwd && exec "$@"', str(passwd))
    caps = "-all,+net_raw"
    agent = agent_factory(config(rate=1, interfaces='["stv0"]')).start(
        prefix=(*own_passwd, "setpriv", "--bounding-set", caps, "--inh-caps", caps))
    with ExitStack() as stack:
        stack.callback(Talker("st-a", 20, seconds=0.2, python=as_uid(61235)).stop)
        scrape_with(agent, ("stv0", "transmit", "user:st-first"))
        passwd.write_text(system + "st-second:x:61235:61235::/:/usr/sbin/nologin\n")
        stack.callback(Talker("st-b", 30, seconds=0.2, python=as_uid(61235)).stop)  # a new socket: a new flow
        samples = scrape_with(agent, ("stv0", "transmit", "user:st-second"))
    assert per_process(samples) == {("stv0", "transmit", "user:st-first"): 20,
                                    ("stv0", "transmit", "user:st-second"): 30}


def test_a_tcp_end_closed_before_the_table_read_is_unknown_not_roots(
    netns: str, agent_factory: Callable[..., Agent]
) -> None:
    # The kernel's socket table keeps a TCP end its process closed (TIME_WAIT, or FIN_WAIT2 with no process) with
    # inode 0, and TIME_WAIT's with uid 0 whoever made it: no user owns it now, so it is "unknown", not "user:root".
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        agent = agent_factory(config(rate=1, extra=f'filter = "tcp port {port}"\n')).start()
        me = psutil.Process().name()
        with socket.create_connection(("127.0.0.1", port)) as warm, server.accept()[0]:
            warm.sendall(b"w")
            scrape_with(agent, ("lo", "receive", me))  # a table read has just run: the next is 5 s away
            client = subprocess.run([*as_uid(61235), "-c", "import socket, sys; c = socket.create_connection(("
                                     "'127.0.0.1', int(sys.argv[1]))); c.sendall(b'x' * 100); "
                                     "print(c.getsockname()[1]); c.close()", str(port)],
                                    capture_output=True, text=True, timeout=20, check=True)
            accepted, _ = server.accept()
            with accepted:
                while accepted.recv(4096):
                    pass
            gone = int(client.stdout)
            samples = wait_until(lambda: s if (s := agreeing(agent)) and len(per_process(s)) == 2 else None, 20,
                                 "the closed end's samples moved at the next table read")
    assert set(per_process(samples)) == {("lo", "receive", me), ("lo", "receive", UNKNOWN)}
    assert {f["process"] for f in flows(agent)["flows"] if f["local_port"] == gone} == {UNKNOWN}


def test_processes_past_max_processes_are_counted_under_other(
    veth: str, agent_factory: Callable[..., Agent]
) -> None:
    agent = agent_factory(config(rate=1, interfaces='["stv0"]', extra="max_processes = 2\n")).start()
    with ExitStack() as stack:
        for name, count in (("st-one", 50), ("st-two", 60)):
            stack.callback(Talker(name, count, seconds=0.3).stop)
            scrape_with(agent, ("stv0", "transmit", name))
        stack.callback(Talker("st-three", 70, seconds=0.3).stop)
        stack.callback(Talker("st-four", 80, seconds=0.3).stop)
        samples = scrape_with(agent, ("stv0", "transmit", "other"))
    assert per_process(samples) == {("stv0", "transmit", "st-one"): 50, ("stv0", "transmit", "st-two"): 60,
                                    ("stv0", "transmit", "other"): 70 + 80}
    assert samples["sidetrace_network_process_overflow_samples_total"] == {(): 150}
    assert device_totals_disagree(samples) == []
    assert_promtool_clean(http_get(agent.url + "/metrics")[1])


def test_idle_process_names_free_their_places_and_carry_on_from_their_counts_when_back(
    veth: str, agent_factory: Callable[..., Agent]
) -> None:
    agent = agent_factory(config(rate=1, interfaces='["stv0"]', extra="max_processes = 1\nprocess_idle_seconds = 1\n")
                          ).start()
    me = psutil.Process().name()
    with ExitStack() as stack:
        sender = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sender.bind(("10.77.0.1", 0))
        sent = 0

        def send(count: int) -> None:  # from the test's own process, all on one flow
            nonlocal sent
            for _ in range(count):
                sender.sendto(b"m" * 100, (PEER, 9))
            sent += count
        send(20)
        scrape_with(agent, ("stv0", "transmit", me))
        late = Talker("st-late", 40, seconds=0.3)  # the one place is taken (and in use): "other"
        stack.callback(late.stop)

        def counted_under_other() -> dict | None:
            send(1)  # keeps the test's name from going idle
            samples = scrape(agent)
            return samples if per_process(samples).get(("stv0", "transmit", "other")) == 40 else None
        wait_until(counted_under_other, 20, "st-late counted under other", interval=0.3)
        wait_until(lambda: s if (s := agreeing(agent)) and per_process(s) == {
            ("stv0", "transmit", me): sent, ("stv0", "transmit", "other"): 40} else None, 20,
            "every sample counted for its process")
        # Idle for a second: its series leaves /metrics at a housekeeping tick (every 5 s); "other" stays.
        wait_until(lambda: set(per_process(scrape(agent))) == {("stv0", "transmit", "other")}, 20,
                   "the idle name's series gone from /metrics")
        late.again(seconds=0.3)  # its flow, under "other" until now, takes the freed place
        samples = scrape_with(agent, ("stv0", "transmit", "st-late"))
        assert per_process(samples) == {("stv0", "transmit", "st-late"): 40, ("stv0", "transmit", "other"): 40}
        wait_until(lambda: set(per_process(scrape(agent))) == {("stv0", "transmit", "other")}, 20,
                   "st-late idle in turn, its series gone from /metrics")
        send(20)  # the same flow as before: its name comes back with the counts it had
        samples = wait_until(lambda: s if per_process(s := scrape(agent)).get(("stv0", "transmit", me)) == sent
                             else None, 20, "the test's own name back, carrying on from its counts")
    assert per_process(samples) == {("stv0", "transmit", me): sent, ("stv0", "transmit", "other"): 40}
    assert samples["sidetrace_network_process_overflow_samples_total"] == {(): 40}
    # st-late's second 40 left /metrics with its series (kept, should it come back); every other sample is there.
    assert samples["sidetrace_network_packet_size_bytes_count"] == {("stv0", "transmit"): sent + 40 + 40}
    assert_promtool_clean(http_get(agent.url + "/metrics")[1])


FLOOD = textwrap.dedent('''
    import ctypes, socket, sys, time
    ctypes.CDLL(None).prctl(15, b"st-flood", 0, 0, 0)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    deadline, body = time.monotonic() + float(sys.argv[2]), b"f" * 100
    for index in range(int(sys.argv[3])):   # bounded in count and in time
        sock.sendto(body, (sys.argv[1], 9))
        if index % 1000 == 0 and time.monotonic() > deadline:
            break
    print(index + 1, flush=True)
    deadline = time.monotonic() + 60   # keeps its socket until told to stop, for the process table to see it
    while time.monotonic() < deadline and sys.stdin.readline().strip() != "stop":
        pass
''')


def test_default_auto_rate_attributes_processes_and_scrapes_stay_quick(
    veth: str, agent_factory: Callable[..., Agent]
) -> None:
    # sampling_rate left at its default, "auto": each rate change reads what the old filter queued.
    agent = agent_factory("[host]\ninterval_seconds = 0.5\n[sources.netsample]\nenabled = true\n"
                          'interfaces = ["stv0"]\n').start()
    # Nothing crosses stv0: the rate falls from 16 to 1 at the first housekeeping tick.
    wait_until(lambda: flows(agent)["interfaces"]["stv0"]["sampling_rate"] == 1, 10, "the auto rate to fall to 1")
    burst = Talker("st-burst", 300, seconds=1.5)
    try:
        samples = scrape_with(agent, ("stv0", "transmit", "st-burst"))
    finally:
        burst.stop()
    assert per_process(samples) == {("stv0", "transmit", "st-burst"): 300}
    # Steady traffic far above the target: the rate goes up, each change drains the queue under the lock,
    # and a scrape taken meanwhile waits at most for one bounded drain.
    flood = subprocess.Popen([sys.executable, "-c", FLOOD, PEER, "6", "3000000"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        finished = threading.Event()
        sent: list[int] = []
        threading.Thread(target=lambda: (sent.append(int(flood.stdout.readline() or 0)), finished.set()),
                         daemon=True).start()
        slowest = 0.0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not finished.is_set():  # scrapes while the flood lasts
            started = time.monotonic()
            assert http_get(agent.url + "/metrics")[0] == 200
            slowest = max(slowest, time.monotonic() - started)
        rate = flows(agent)["interfaces"]["stv0"]["sampling_rate"]
        assert finished.wait(10) and sent[0] > 50_000, sent
        assert rate > 1, rate
        assert slowest < 2.0, slowest
        samples = wait_until(lambda: agreeing(agent) if ("stv0", "transmit", "st-flood") in
                             per_process(scrape(agent)) else None, 20, "the flood's samples moved to its process")
    finally:
        flood.communicate("stop\n", timeout=20)
    assert samples["sidetrace_network_housekeeping_errors_total"] == {(): 0}
    assert "housekeeping failed" not in agent.log()


def test_a_housekeeping_step_that_fails_fails_alone(veth: str, agent_factory: Callable[..., Agent]) -> None:
    # systemd's ProcSubset=pid (a hardening a drop-in can add) leaves /proc/net out of the agent's /proc, so
    # psutil cannot read the process connection table: mounted here the same way, in the agent's own mount namespace.
    proc_subset_pid = ("unshare", "--mount", "sh", "-c", 'mount -t proc -o subset=pid proc /proc && exec "$@"', "sh")
    agent = agent_factory("[host]\nenabled = false\n[sources.netsample]\nenabled = true\ninterfaces = [\"stv0\"]\n"
                          'filter = "udp"\n').start(prefix=proc_subset_pid)
    errors = "sidetrace_network_housekeeping_errors_total"
    # The rate step works (nothing crosses stv0: from 16 to 1); the table is not read while no flow waits for it.
    wait_until(lambda: flows(agent)["interfaces"]["stv0"]["sampling_rate"] == 1, 10, "the auto rate to fall to 1")
    assert scrape(agent)[errors] == {(): 0}
    held = Talker("st-held", 100, seconds=0.5)
    flood = None
    try:
        wait_until(lambda: scrape(agent)[errors][()] >= 1, 20, "a read of the process table to fail")
        # Every later tick still changes rates, exports top flows and tries the table again (every 5 s).
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, PEER, "4", "400000"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        rate = wait_until(lambda: r if (r := flows(agent)["interfaces"]["stv0"]["sampling_rate"]) > 1 else None, 20,
                          "the auto rate to go up under the flood")
        assert int(flood.stdout.readline()) > 0  # the flood is over (its own deadline bounds it)

        def tried_again() -> dict | None:  # and a sample of the flood's flow after it entered the top set
            sender.sendto(b"p" * 100, (PEER, 9))
            samples = scrape(agent)
            exported = {key[5] for key in samples["sidetrace_network_estimated_packets_total"] if key[4] == PEER}
            return samples if samples[errors][()] >= 3 and exported else None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            samples = wait_until(tried_again, 20, "the table read tried and failed again", interval=0.5)
    finally:
        held.stop()
        if flood is not None:
            flood.communicate("stop\n", timeout=20)
    assert rate > 1
    top = {key[5] for key in samples["sidetrace_network_estimated_packets_total"] if key[4] == PEER}
    assert top == {"9"}  # flows to the peer's port 9 entered the top set and have top-flow series of their own
    # Nothing is lost: every sample is in the device totals, and waits on its flow for a table that can be read.
    assert per_process(samples) == {}
    total = samples["sidetrace_network_packet_size_bytes_count"][("stv0", "transmit")]
    assert sum(samples["sidetrace_network_estimated_packets_total"].values()) == total > 100
    status = json.loads(http_get(agent.url + "/debug/status")[1])["components"]["netsample"]
    assert status["last_error"] == ("housekeeping (process table): FileNotFoundError: [Errno 2] No such file or "
                                    "directory: '/proc/net/tcp'")
    # Logged once while it fails the same way, with what failed and where it is counted.
    failures = [line for line in agent.log().splitlines() if "housekeeping failed" in line]
    assert len(failures) == 1, failures
    assert ("netsample housekeeping failed (process table): FileNotFoundError: [Errno 2] No such file or directory: "
            "'/proc/net/tcp' (counted in sidetrace_network_housekeeping_errors_total; logged again only if the reason "
            "changes or after it has worked)") in failures[0]


def size_buckets(samples: dict, device: str, direction: str) -> dict[str, float]:
    """le -> cumulative count of sidetrace_network_packet_size_bytes for one device and direction."""
    return {key[2]: value for key, value in samples["sidetrace_network_packet_size_bytes_bucket"].items()
            if key[:2] == (device, direction)}


def test_large_packets_count_their_whole_length_not_the_captured_part(
    netns: str, agent_factory: Callable[..., Agent]
) -> None:
    # The kernel keeps 256 bytes of each sample (the filter's accept) and recv reports 256: the IP header
    # has the length. On lo: ten 5000-byte UDP datagrams are ten 5042-byte frames (one each, lo's MTU is 64k).
    agent = agent_factory(config(rate=1, extra='filter = "udp and dst port 41900"\n')).start()
    send_udp(41900, 10, payload=5000)
    snapshot = settled(agent)
    (flow,) = snapshot["flows"]
    assert (flow["estimated_packets"], flow["estimated_bytes"]) == (10, 50420)
    samples = wait_until(lambda: agreeing(agent), 20, "the flow's samples moved to its process")
    # (the receiving socket is closed before the next read of the process table: "unknown")
    assert per_process(samples, "bytes") == {("lo", "receive", "unknown"): 50420}
    assert samples["sidetrace_network_packet_size_bytes_sum"][("lo", "receive")] == 50420
    buckets = size_buckets(samples, "lo", "receive")
    assert (buckets["4096"], buckets["9000"]) == (0, 10)


def test_veth_frames_of_1400_bytes_count_1400_bytes(veth: str, agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory(config(rate=1, interfaces='["stv0"]')).start()
    talker = Talker("st-large", 40, seconds=0.4, payload=1400 - 42)
    try:
        samples = scrape_with(agent, ("stv0", "transmit", "st-large"))
    finally:
        talker.stop()
    assert per_process(samples) == {("stv0", "transmit", "st-large"): 40}
    assert per_process(samples, "bytes") == {("stv0", "transmit", "st-large"): 40 * 1400}
    assert samples["sidetrace_network_packet_size_bytes_sum"][("stv0", "transmit")] == 40 * 1400
    buckets = size_buckets(samples, "stv0", "transmit")
    assert (buckets["1024"], buckets["1518"]) == (0, 40)
    assert device_totals_disagree(samples) == []


DUAL_STACK_SERVER = textwrap.dedent('''
    import ctypes, socket, sys
    ctypes.CDLL(None).prctl(15, b"st-dual", 0, 0, 0)
    server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)   # IPv4 clients too, as ::ffff:a.b.c.d
    server.bind(("::", 0))
    server.listen()
    server.settimeout(20)
    print(server.getsockname()[1], flush=True)
    conn, _ = server.accept()
    server.close()   # only the connection is left: its local address is ::ffff:127.0.0.1, no wildcard
    conn.settimeout(20)
    received = 0
    while chunk := conn.recv(65536):
        received += len(chunk)
    print(received, flush=True)
''')


def test_ipv4_traffic_of_a_dual_stack_socket_is_its_process(netns: str, agent_factory: Callable[..., Agent]) -> None:
    server = subprocess.Popen([sys.executable, "-c", DUAL_STACK_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        agent = agent_factory(config(rate=1, extra=f'filter = "tcp port {port}"\n')).start()
        # A dual-stack client too (as Java and Go make them): IPv4 on the wire, ::ffff:127.0.0.1 in the table.
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as client:
            client.settimeout(20)
            client.connect(("::ffff:127.0.0.1", port))

            def attributed() -> dict | None:
                client.sendall(b"d" * 1000)
                return next((f for f in flows(agent)["flows"] if f["local_port"] == port
                             and f["process"] != "unknown"), None)
            flow = wait_until(attributed, 20, "the server's flow attributed", interval=0.5)
            assert flow["process"] == "st-dual"
            samples = wait_until(lambda: agreeing(agent), 20, "every held sample moved to a process")
            snapshot = flows(agent)
        assert server.stdout.readline().strip() != ""
    finally:
        server.kill()
        server.wait(10)
    server_side = sum(f["estimated_packets"] for f in snapshot["flows"] if f["local_port"] == port)
    client_side = sum(f["estimated_packets"] for f in snapshot["flows"] if f["remote_port"] == port)
    assert {f["process"] for f in snapshot["flows"] if f["local_port"] == port} == {"st-dual"}
    assert per_process(samples) == {("lo", "receive", "st-dual"): server_side,
                                    ("lo", "receive", psutil.Process().name()): client_side}


def test_top_flow_series_stay_bounded_and_add_up(netns: str, agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory(config(rate=1, extra='filter = "udp"\ntop_flows = 3\n')).start()
    estimated = "sidetrace_network_estimated_packets_total"
    other_labels = ("lo", "receive", "", "other", "other", "")  # device, direction, process, protocol, remote, port
    other_before = 0.0
    with ExitStack() as stack:
        for wave, count in enumerate((100, 200, 300, 400)):  # each wave's 3 flows outgrow every earlier one
            senders = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) for _ in range(3)]
            for sender in senders:
                sender.bind(("127.0.0.1", 0))
                for _ in range(count):
                    sender.sendto(b"w" * 100, ("127.0.0.1", 44000 + wave))
            ports = {str(sender.getsockname()[1]) for sender in senders}

            def exported(senders: list = senders, wave: int = wave, ports: set = ports) -> dict | None:
                for sender in senders:  # a series is made by the first sample after the flow enters the top set
                    sender.sendto(b"w" * 100, ("127.0.0.1", 44000 + wave))
                samples = scrape(agent)
                return samples if ports <= {k[5] for k in samples.get(estimated, {})} else None
            samples = wait_until(exported, 20, f"wave {wave}'s flows exported (every 5 s)", interval=0.5)
            series = samples[estimated]
            assert len(series) <= 3 + 1, series  # top_flows, and "other"
            assert series[other_labels] >= other_before
            other_before = series[other_labels]
            assert sum(series.values()) == samples["sidetrace_network_packet_size_bytes_count"][("lo", "receive")]
            assert sum(samples["sidetrace_network_estimated_bytes_total"].values()) == \
                samples["sidetrace_network_packet_size_bytes_sum"][("lo", "receive")]


def test_a_flow_that_stopped_sending_gives_its_top_place_to_one_that_sends(
    veth: str, agent_factory: Callable[..., Agent]
) -> None:
    agent = agent_factory(config(rate=1, interfaces='["stv0"]', extra='filter = "udp"\ntop_flows = 1\n')).start()
    estimated = "sidetrace_network_estimated_packets_total"

    def exported(samples: dict) -> set[str]:
        """The peer ports with a top-flow series of their own (label values: device, direction, process, protocol,
        remote, remote_port)."""
        return {key[5] for key in samples.get(estimated, {}) if key[4] == PEER}

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for _ in range(3000):  # 3000 x 142 bytes to port 9 (and one per probe below), then nothing more
            sender.sendto(b"a" * 100, (PEER, 9))

        def big_flow_on_top() -> bool:  # its series is made by its first sample after it enters the top set
            sender.sendto(b"a" * 100, (PEER, 9))
            return exported(scrape(agent)) == {"9"}
        wait_until(big_flow_on_top, 20, "the big flow exported (every 5 s)", interval=0.5)
        deadline = time.monotonic() + 20

        def small_flow_on_top() -> dict | None:
            for _ in range(5):  # 5 x 142 bytes to port 10 each time: 200 packets at most in 20 s, far below 3000
                sender.sendto(b"b" * 100, (PEER, 10))
            samples = scrape(agent)
            return samples if exported(samples) == {"10"} else None
        samples = wait_until(small_flow_on_top, deadline - time.monotonic(), "the sending flow on top", interval=0.5)
    # The stopped flow's series went to "other" (every sum still holds), and its flow is still in the table.
    assert device_totals_disagree(wait_until(lambda: agreeing(agent), 20, "the samples moved to their process")) == []
    assert samples[estimated][("stv0", "transmit", "", "other", "other", "")] > 3000
    assert [f["remote_port"] for f in flows(agent)["flows"]] == [9, 10]  # /debug/flows still ranks by total


def test_a_reload_with_a_filter_that_does_not_compile_keeps_the_old_sampler(
    netns: str, agent_factory: Callable[..., Agent]
) -> None:
    import signal

    agent = agent_factory(config(rate=1, extra='filter = "udp and dst port 41600"\n')).start()
    agent.write_config(config(rate=1, extra='filter = "port 99999"\n'))
    agent.signal(signal.SIGHUP)
    wait_until(lambda: scrape(agent).get("sidetrace_config_reload_failures_total") == {(): 1.0}, 10,
               "the reload to be refused")
    assert scrape(agent)["sidetrace_config_last_reload_successful"] == {(): 0.0}
    assert (f"{agent.config_path}: [sources.netsample] filter: capture filter 'port 99999' does not compile"
            in agent.log())
    send_udp(41600, 100)
    snapshot = settled(agent)  # the old sampler, with the old filter, still samples
    assert snapshot["interfaces"]["lo"]["state"] == "running"
    assert [(f["local_port"], f["estimated_packets"]) for f in snapshot["flows"]] == [(41600, 100)]


def test_debug_flows_top_bounds_and_flows_into_a_closed_pipe(netns: str, agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory(config(rate=1)).start()
    send_udp(41650, 20)
    for bad in ("0", "-3", "x"):
        assert http_get(f"{agent.url}/debug/flows?top={bad}") == (
            400, "top must be an integer from 1 (at most 1000 are returned)\n")
    answer = flows(agent, top=100_000)
    assert (answer["top"], answer["top_capped"]) == (1000, True)
    answer = flows(agent, top=1)
    assert (answer["top"], answer["top_capped"], len(answer["flows"])) == (1, False, 1)
    # `sidetrace flows | head -n 3`: the reader goes away, the live table stops quietly.
    viewer = subprocess.Popen([sys.executable, "-m", "sidetrace", "flows", "--interval", "0.1", "--url", agent.url],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(3):
            assert viewer.stdout.readline()
        viewer.stdout.close()
        assert viewer.wait(20) == 141
        assert viewer.stderr.read() == b""
    finally:
        viewer.kill()
        viewer.wait(10)
    done = subprocess.run([sys.executable, "-m", "sidetrace", "flows", "--once", "--top", "0", "--url", agent.url],
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 2 and "--top: expected an integer from 1 to 1000, got '0'" in done.stderr


def test_with_no_interfaces_listed_one_that_comes_up_later_is_sampled(
    netns: str, agent_factory: Callable[..., Agent]
) -> None:
    agent = agent_factory(config(rate=1, interfaces="[]")).start()  # the namespace has only lo: nothing sampled
    assert flows(agent)["interfaces"] == {}
    make_veth()
    wait_until(lambda: flows(agent)["interfaces"].get("stv0", {}).get("state") == "running", 15,
               "stv0 found at a housekeeping tick (every 5 s)")
    talker = Talker("st-late", 40, seconds=0.4)
    try:
        samples = scrape_with(agent, ("stv0", "transmit", "st-late"))
    finally:
        talker.stop()
    assert {k: v for k, v in per_process(samples).items() if k[0] == "stv0"} == {("stv0", "transmit", "st-late"): 40}
    ip("link", "delete", "stv0")  # both ends go: their samplers fail, then are forgotten
    wait_until(lambda: not set(flows(agent)["interfaces"]) & {"stv0", "stv1"}, 15, "the samplers of the veth gone")
    assert http_get(agent.url + "/readyz")[0] == 200


def test_a_flow_that_reenters_the_top_set_carries_the_process_known_by_then(
    veth: str, agent_factory: Callable[..., Agent]
) -> None:
    from scapy.all import IP, UDP, Ether, raw

    agent = agent_factory(config(rate=1, interfaces='["stv0"]', extra='filter = "udp"\ntop_flows = 1\n')).start()
    mac = json.loads(subprocess.run(["ip", "-j", "link", "show", "stv0"], capture_output=True, text=True,
                                    check=True, timeout=20).stdout)[0]["address"]
    frame = raw(Ether(dst=mac, src=PEER_MAC) / IP(src=PEER, dst="10.77.0.1") / UDP(sport=7, dport=40999) /
                (b"r" * 58))  # 100 bytes, to this host's port 40999
    estimated = "sidetrace_network_estimated_packets_total"

    def series_of(process: str, sender: Callable[[], None]) -> dict | None:
        # label values in name order: device, direction, process, protocol, remote, remote_port
        sender()
        return scrape(agent) if ("stv0", "receive", process, "udp", PEER, "7") in scrape(agent)[estimated] else None

    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as injector:
        injector.bind(("stv1", 0))

        def inject(count: int = 1) -> None:
            for _ in range(count):
                injector.send(frame)
        inject(50)
        # No socket on port 40999: the flow is the top one, its process "unknown".
        wait_until(lambda: series_of("unknown", inject), 20, "the flow exported as unknown", interval=0.5)
        with ExitStack() as stack:
            stack.callback(Talker("st-big", 300, seconds=0.3).stop)  # 300 x 142 bytes: the top flow now
            samples = wait_until(lambda: scrape(agent) if not any(k[3] == "udp" and k[5] == "7"
                                                                for k in scrape(agent)[estimated]) else None,
                                 20, "the injected flow out of the top set")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
                listener.bind(("10.77.0.1", 40999))  # now the port has a process
                inject(600)  # 600 x 100 bytes: the top flow again
                samples = wait_until(lambda: series_of(psutil.Process().name(), inject), 20,
                                     "the flow exported again, under its process", interval=0.5)
    assert ("stv0", "receive", "unknown", "udp", PEER, "7") not in samples[estimated]


def device_series(samples: dict) -> dict[str, set[str]]:
    """Device -> the names of the traffic, packet size, per-process and top-flow series it has on /metrics."""
    families = ("sidetrace_network_estimated_packets_total", "sidetrace_network_estimated_bytes_total",
                "sidetrace_network_packet_size_bytes_count", "sidetrace_network_packet_size_bytes_sum",
                "sidetrace_network_process_packets_total", "sidetrace_network_process_bytes_total")
    devices: dict[str, set[str]] = {}
    for name in families:
        for key in samples.get(name, {}):
            devices.setdefault(key[0], set()).add(name)  # device sorts first among each family's label names
    return devices


def test_series_of_a_deleted_interface_leave_metrics_after_the_grace(
    netns: str, agent_factory: Callable[..., Agent]
) -> None:
    agent = agent_factory(config(rate=1, interfaces="[]", extra="gone_interface_grace_seconds = 1\n")).start()
    sizes = []
    for _ in range(3):  # created, talked over and deleted three times: nothing is left behind each time
        make_veth()
        wait_until(lambda: flows(agent)["interfaces"].get("stv0", {}).get("state") == "running", 15,
                   "stv0 found at a housekeeping tick (every 5 s)")
        talker = Talker("st-churn", 40, seconds=0.4)
        try:
            samples = wait_until(lambda: s if (s := agreeing(agent)) and ("stv0", "transmit", "st-churn")
                                 in per_process(s) else None, 20, "st-churn's traffic on /metrics, adding up")
        finally:
            talker.stop()
        # 40 each time, not 80 then 120: the series of the earlier stv0 were dropped, and they start again.
        assert {k: v for k, v in per_process(samples).items() if k[0] == "stv0"} == {("stv0", "transmit",
                                                                                       "st-churn"): 40}
        assert set(device_series(samples)) == {"stv0", "stv1"}
        ip("link", "delete", "stv0")  # both ends go: their samplers fail, are forgotten, then their series go
        samples = wait_until(lambda: s if not device_series(s := scrape(agent)) else None, 20,
                             "the series of stv0 and stv1 gone from /metrics")
        assert flows(agent)["flow_count"] == 0  # their flows are let go too
        sizes.append(len(http_get(agent.url + "/metrics")[1].splitlines()))
    assert sizes[0] == sizes[1] == sizes[2], sizes  # the same exposition after every round: nothing accumulates


def test_flows_let_go_with_a_deleted_interface_are_counted_as_evicted(
    netns: str, agent_factory: Callable[..., Agent]
) -> None:
    agent = agent_factory(config(rate=1, interfaces="[]", extra="gone_interface_grace_seconds = 1\n")).start()
    make_veth()
    wait_until(lambda: flows(agent)["interfaces"].get("stv0", {}).get("state") == "running", 15,
               "stv0 found at a housekeeping tick (every 5 s)")
    talker = Talker("st-gone-if", 30, seconds=0.3, ports=3)
    try:
        wait_until(lambda: agreeing(agent) if ("stv0", "transmit", "st-gone-if") in per_process(scrape(agent))
                   else None, 20, "st-gone-if's traffic on /metrics, adding up")
    finally:
        talker.stop()
    # Sent to 3 ports of the peer: 3 flows sent on stv0, the same 3 seen arriving on stv1 (the peer end).
    kept = [(f["device"], f["direction"], f["remote_port"] if f["direction"] == "transmit" else f["local_port"])
            for f in flows(agent)["flows"]]
    assert sorted(kept) == [("stv0", "transmit", 9), ("stv0", "transmit", 10), ("stv0", "transmit", 11),
                            ("stv1", "receive", 9), ("stv1", "receive", 10), ("stv1", "receive", 11)]
    assert scrape(agent)["sidetrace_network_evicted_flows_total"] == {("max_flows",): 0, ("interface_gone",): 0}
    ip("link", "delete", "stv0")  # both ends go; their flows are let go with their series after the grace
    samples = wait_until(lambda: s if not device_series(s := scrape(agent)) else None, 20,
                         "the series of stv0 and stv1 gone from /metrics")
    assert samples["sidetrace_network_evicted_flows_total"] == {("max_flows",): 0, ("interface_gone",): 6}
    snapshot = flows(agent)
    assert (snapshot["flow_count"], snapshot["evicted_flows"]) == (0, 6)


def test_series_of_interfaces_gone_within_the_grace_are_capped(
    netns: str, agent_factory: Callable[..., Agent]
) -> None:
    from scapy.all import IP, UDP, Ether, raw

    from sidetrace.agent.sources.netsample import MAX_GONE_DEVICES

    agent = agent_factory(config(rate=1, interfaces="[]")).start()  # the default grace: 300 s
    subprocess.run(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"],
                   check=True, timeout=20)
    pairs = MAX_GONE_DEVICES // 2 + 1  # two devices each: two more than the cap
    for index in range(pairs):
        ip("link", "add", f"stc{index}a", "type", "veth", "peer", "name", f"stc{index}b")
        ip("link", "set", f"stc{index}a", "up")
        ip("link", "set", f"stc{index}b", "up")
    devices = {f"stc{i}{end}" for i in range(pairs) for end in "ab"}
    wait_until(lambda: devices <= {d for d, i in flows(agent)["interfaces"].items() if i["state"] == "running"}, 15,
               "every veth end sampled")
    frame = raw(Ether(dst="02:00:00:00:77:01", src=PEER_MAC) / IP(src=PEER, dst="10.77.0.9") / UDP(sport=7, dport=9))
    for index in range(pairs):
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as injector:
            injector.bind((f"stc{index}a", 0))
            injector.send(frame)  # sampled as sent on stcNa and as received on stcNb
    wait_until(lambda: set(device_series(scrape(agent))) == devices, 20, "every veth end with series")
    for index in range(pairs):
        ip("link", "delete", f"stc{index}a")
    samples = wait_until(lambda: s if not set(flows(agent)["interfaces"]) & devices and
                         len(device_series(s := scrape(agent))) <= MAX_GONE_DEVICES else None, 20,
                         "the samplers forgotten and the series past the cap dropped")
    # Within the 300 s grace, but only MAX_GONE_DEVICES of the 2 * pairs gone devices keep their series.
    assert len(device_series(samples)) == MAX_GONE_DEVICES
    assert set(device_series(samples)) < devices
    # A kept one comes back within the grace: its series carry on (2 packets, not 1 started again).
    kept = sorted(device_series(samples))[0]
    index = int(kept[3:-1])
    ip("link", "add", f"stc{index}a", "type", "veth", "peer", "name", f"stc{index}b")
    ip("link", "set", f"stc{index}a", "up")
    ip("link", "set", f"stc{index}b", "up")
    wait_until(lambda: {f"stc{index}a", f"stc{index}b"} <= {d for d, i in flows(agent)["interfaces"].items()
                                                            if i["state"] == "running"}, 15, "the pair sampled again")
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as injector:
        injector.bind((f"stc{index}a", 0))
        injector.send(frame)

    def count(samples: dict) -> float:
        return sum(v for k, v in samples["sidetrace_network_packet_size_bytes_count"].items() if k[0] == kept)
    assert count(samples) == 1
    wait_until(lambda: count(scrape(agent)) == 2, 20, f"{kept}'s second packet counted on top of its first")
