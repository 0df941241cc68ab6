"""Packet rates the netsample source follows, and its CPU at 100k packets/s, beside scapy sniff()
with a per-packet callback and tcpdump -w /dev/null, in one run.

Runs as root inside a network namespace it creates (all traffic stays on that namespace's lo).
A generator process offers UDP packets at a fixed rate for a bounded time; each capturer runs alone
while it does. For each capturer and rate: the share of packets lost before user space (kernel
drops for sidetrace and tcpdump, packets offered but never seen by the callback for scapy), and the
capturer's CPU. sidetrace samples 1 in 100 here; its estimate is checked against the packets lo
actually received (its interface counter) and the 95 % bound it states.

Usage: sudo .venv/bin/python bench/netsample_rate.py [--seconds 3] [--rates 2000,10000,50000,100000,200000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.agent_idle import cpu_seconds  # noqa: E402
from tests.conftest import Agent, http_get  # noqa: E402
from tests.integration.netns import inside_new_netns  # noqa: E402

GENERATOR = r"""
import socket, sys, time
rate, seconds, port = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sink.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # a listener, so no ICMP unreachable replies
sink.bind(("127.0.0.1", port))
body, target, sent = b"x" * 64, ("127.0.0.1", port), 0
start = time.perf_counter()
while True:
    elapsed = time.perf_counter() - start
    if elapsed >= seconds:
        break
    due = int(elapsed * rate) + 1
    while sent < due:
        sock.sendto(body, target); sent += 1
print(sent, time.perf_counter() - start, flush=True)
"""

SCAPY = r"""
import signal, sys
from scapy.all import sniff
count = 0
def on_packet(packet):
    global count
    count += 1
def stop(*_):
    print(count, flush=True); sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
sniff(iface="lo", prn=on_packet, store=False, filter="udp and dst port 45000")
"""


GENERATOR_LIMIT = 200_000  # packets/s one Python generator process offers reliably here


def offer(rate: float, seconds: float) -> int:
    """Offer ``rate`` packets/s for ``seconds`` from as many generator processes as it takes."""
    processes = max(1, -(-int(rate) // GENERATOR_LIMIT))
    generators = [subprocess.Popen([sys.executable, "-c", GENERATOR, str(rate / processes), str(seconds),
                                    str(45000)], stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    sent = 0
    for generator in generators:
        out, _ = generator.communicate(timeout=seconds + 60)
        sent += int(out.split()[0])
    return sent


def run_sidetrace(tmp: Path, rates: list[float], seconds: float) -> list[dict]:
    agent = Agent(tmp / "agent", '[host]\nenabled = false\n[sources.netsample]\nenabled = true\ninterfaces = ["lo"]\n'
                  'sampling_rate = 100\nfilter = "udp and dst port 45000"\n').start()
    results = []
    try:
        for rate in rates:
            before = json.loads(http_get(agent.url + "/debug/flows?top=1000")[1])
            cpu = cpu_seconds(agent.proc.pid)
            received = psutil.net_io_counters(pernic=True)["lo"].packets_recv
            sent = offer(rate, seconds)
            time.sleep(1.5)  # let the last samples and the drop counters arrive
            # The truth is what lo received: at high rates the loopback backlog drops some of what was sent
            # before any tap sees it. The agent's own HTTP requests add a handful.
            received = psutil.net_io_counters(pernic=True)["lo"].packets_recv - received
            after = json.loads(http_get(agent.url + "/debug/flows?top=1000")[1])
            used = cpu_seconds(agent.proc.pid) - cpu
            samples = after["interfaces"]["lo"]["samples"] - before["interfaces"]["lo"]["samples"]
            drops = after["interfaces"]["lo"]["kernel_drops"] - before["interfaces"]["lo"]["kernel_drops"]
            estimate = sum(f["estimated_packets"] for f in after["flows"] if f["local_port"] == 45000) - \
                sum(f["estimated_packets"] for f in before["flows"] if f["local_port"] == 45000)
            bound = 196 * (1 / max(samples, 1)) ** 0.5
            results.append({"rate": sent / seconds, "loss_percent": drops / max(samples + drops, 1) * 100,
                            "cpu_percent": used / (seconds + 1.5) * 100,
                            "estimate_error_percent": abs(estimate - received) / received * 100,
                            "bound_percent": bound, "lo_received_percent": received / sent * 100})
    finally:
        agent.stop()
    return results


def run_scapy(rates: list[float], seconds: float) -> list[dict]:
    results = []
    for rate in rates:
        sniffer = subprocess.Popen([sys.executable, "-c", SCAPY], stdout=subprocess.PIPE, text=True)
        assert sniffer.stdout.readline().strip() == "ready"
        time.sleep(1.0)  # scapy opens its socket after printing
        cpu = cpu_seconds(sniffer.pid)
        sent = offer(rate, seconds)
        time.sleep(1.5)
        used = cpu_seconds(sniffer.pid) - cpu
        sniffer.send_signal(signal.SIGTERM)
        seen = int(sniffer.stdout.readline() or 0)
        sniffer.wait(10)
        results.append({"rate": sent / seconds, "loss_percent": max(0, sent - seen) / sent * 100,
                        "cpu_percent": used / (seconds + 1.5) * 100})
    return results


def run_tcpdump(rates: list[float], seconds: float) -> list[dict]:
    results = []
    for rate in rates:
        dump = subprocess.Popen(["tcpdump", "-i", "lo", "-w", "/dev/null", "-B", "4096", "udp and dst port 45000"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        cpu = cpu_seconds(dump.pid)
        sent = offer(rate, seconds)
        time.sleep(1.5)
        used = cpu_seconds(dump.pid) - cpu
        dump.send_signal(signal.SIGINT)
        _, err = dump.communicate(timeout=10)
        captured = int(next(line for line in err.splitlines() if "captured" in line).split()[0])
        dropped = int(next(line for line in err.splitlines() if "dropped by kernel" in line).split()[0])
        results.append({"rate": sent / seconds, "loss_percent": max(dropped, sent - captured) / sent * 100,
                        "cpu_percent": used / (seconds + 1.5) * 100})
    return results


def parse_cost(frames: int = 20_000) -> dict[str, float]:
    """Microseconds to dissect one sampled frame: sidetrace's struct parser against scapy's Ether()."""
    from scapy.all import IP, TCP, Ether, raw

    from sidetrace.agent.sources.netsample.packets import parse

    frame = raw(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=443, flags="PA") / (b"x" * 64))
    costs = {}
    for name, dissect in (("struct parser", lambda: parse(frame)), ("scapy Ether()", lambda: Ether(frame))):
        started = time.perf_counter()
        for _ in range(frames):
            dissect()
        costs[name] = (time.perf_counter() - started) / frames * 1e6
    return costs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rates", default="2000,5000,10000,20000,100000,200000,400000")
    args = parser.parse_args()
    assert os.geteuid() == 0, "run as root: the benchmark makes a network namespace and raw sockets"
    rates = [float(r) for r in args.rates.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="sidetrace-netsample-"))
    with inside_new_netns():
        table = {"sidetrace 1:100": run_sidetrace(tmp, rates, args.seconds), "scapy sniff()": run_scapy(rates,
                 args.seconds), "tcpdump -w /dev/null": run_tcpdump(rates, args.seconds)}
    print(f"{args.seconds:.0f} s per rate, UDP 64-byte payloads on lo in a private namespace, {os.cpu_count()} cores")
    print(f"{'capturer':22} {'offered pps':>12} {'lost %':>8} {'CPU %':>7}  estimate error (bound)")
    for name, rows in table.items():
        for row in rows:
            extra = (f"  {row['estimate_error_percent']:.1f} % ({row['bound_percent']:.1f} %), lo received "
                     f"{row['lo_received_percent']:.1f} % of sent" if "bound_percent" in row else "")
            print(f"{name:22} {row['rate']:12.0f} {row['loss_percent']:8.2f} {row['cpu_percent']:7.2f}{extra}")
    for name, rows in table.items():
        followed = [row["rate"] for row in rows if row["loss_percent"] < 1.0]
        print(f"{name}: highest rate followed with < 1 % loss: {max(followed) if followed else 0:.0f} pps")
    costs = parse_cost()
    print("dissecting one TCP frame: " + ", ".join(f"{name} {us:.2f} us" for name, us in costs.items()))


if __name__ == "__main__":
    main()
