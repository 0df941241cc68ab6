"""Packet rates the netsample source follows, and its CPU at 100k packets/s, beside scapy sniff()
with a per-packet callback and tcpdump -w /dev/null, in one run.

Runs as root inside a network namespace it creates (all traffic stays on that namespace's lo).
A generator process offers UDP packets at a fixed rate for a bounded time; each capturer runs alone
while it does. For each capturer and rate: the share of packets lost before user space (kernel
drops for sidetrace and tcpdump, packets offered but never seen by the callback for scapy), and the
capturer's CPU. sidetrace samples 1 in 100 here; its estimate is checked against the packets lo
actually received (its interface counter) and the 95 % bound it states.

Usage: sudo .venv/bin/python bench/netsample_rate.py [--seconds 3] [--rates 2000,10000,50000,100000,200000]

With ``--compare-with DIR`` (a tree holding another version's ``sidetrace`` package, for example
``git archive BASE sidetrace | tar -x -C DIR``) it measures instead what one sample costs in that
version and in this checkout, alternating round by round in fresh processes: the CPU of
``NetsampleSource.record`` per sample in-process (flows whose process is known, and flows whose
process is not), and the whole agent's CPU per sample at ``sampling_rate = 1`` with
``--compare-pps`` packets/s offered; and the CPU of one read of the process table
(``ProcessMap.refresh``, in housekeeping at most every 5 s while a flow waits), with 1,000 UDP sockets
of the reader's own and 200 of each of two other users (uids 61235 and 65534) in the namespace.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._rounds import alternating_runs  # noqa: E402
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


def run_sidetrace(tmp: Path, rates: list[float], seconds: float, sampling_rate: int = 100,
                  tree: str | None = None) -> list[dict]:
    agent = Agent(tmp / "agent", '[host]\nenabled = false\n[sources.netsample]\nenabled = true\ninterfaces = ["lo"]\n'
                  f'sampling_rate = {sampling_rate}\nfilter = "udp and dst port 45000"\n',
                  env={"PYTHONPATH": tree} if tree else None).start()
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
                            "cpu_percent": used / (seconds + 1.5) * 100, "cpu_us_per_sample": used / samples * 1e6,
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


RECORD_COST = r"""
import json, socket, sys, time
from prometheus_client import CollectorRegistry
from scapy.all import IP, UDP, Ether, raw
from sidetrace.agent.components import Context
from sidetrace.agent.sources.netsample import NetsampleSource, Sampler
from sidetrace.config import Config, NetsampleSourceSection

samples, known = int(sys.argv[1]), sys.argv[2] == "known"
source = NetsampleSource(NetsampleSourceSection(enabled=True, sampling_rate=1),
                         Context(Config(), CollectorRegistry(), dict, list))
sampler = Sampler("lo", source)
sockets = []
for _ in range(64):  # 64 flows; their local ends are real sockets when the processes are to be known
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sockets.append(sock)
ports = [s.getsockname()[1] for s in sockets]
if not known:
    for sock in sockets:
        sock.close()
source.processes.refresh()
frames = [bytearray(raw(Ether() / IP(src="127.0.0.1", dst="127.0.0.1") / UDP(sport=41000 + index, dport=port) /
                       (b"x" * 64))) for index, port in enumerate(ports)]
address = ("lo", 0x0800, 0, 772, b"")
for frame in frames:  # create the flows (and, known, attribute them) before timing
    source.record(sampler, frame, len(frame), address)
started = time.process_time()
for index in range(samples):
    frame = frames[index & 63]
    source.record(sampler, frame, len(frame), address)
used = time.process_time() - started
flow = next(iter(source.flows.flows.values()))
assert (flow.process != "") == known, flow.process
import sidetrace
print(json.dumps({"us_per_sample": used / samples * 1e6, "package": sidetrace.__file__}))
"""


READ_COST = r"""
import json, socket, sys, time
from sidetrace.agent.sources.netsample import ProcessMap
own = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(int(sys.argv[1]))]
for sock in own:
    sock.bind(("127.0.0.1", 0))
table = ProcessMap()
table.refresh()
reads = int(sys.argv[2])
started = time.process_time()
for _ in range(reads):
    table.refresh()
used = time.process_time() - started
import sidetrace
print(json.dumps({"ms_per_read": used / reads * 1e3, "ends": len(table._by_endpoint), "package": sidetrace.__file__}))
"""
HOLDER = "import socket, sys; s = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(200)]; " \
         "[x.bind(('127.0.0.1', 0)) for x in s]; print(len(s), flush=True); sys.stdin.read()"


def compare(tree: str, rounds: int, pps: float, seconds: float) -> None:
    """One sample's cost in ``tree``'s sidetrace against this checkout's, alternating round by round."""
    here = str(Path(__file__).resolve().parents[1])
    trees = {"before": str(Path(tree).resolve()), "after": here}
    tmp = Path(tempfile.mkdtemp(prefix="sidetrace-netsample-"))
    os.chdir(tmp)  # python -m and -c put the working directory first on sys.path: it must hold no sidetrace
    for condition, path in trees.items():
        found = subprocess.run(["env", f"PYTHONPATH={path}", sys.executable, "-c", "import sidetrace; "
                                "print(sidetrace.__file__)"], capture_output=True, text=True, check=True).stdout
        assert found.startswith(path + "/"), (condition, found)
    record: dict[str, dict[str, list[float]]] = {}
    for known in ("known", "unknown"):
        runs = alternating_runs(tuple(trees), rounds, lambda c, known=known: [
            "env", f"PYTHONPATH={trees[c]}", sys.executable, "-c", RECORD_COST, "200000", known])
        assert all(r["package"].startswith(trees[c] + "/") for c, rs in runs.items() for r in rs)
        record[known] = {c: [r["us_per_sample"] for r in rs] for c, rs in runs.items()}
    agent: dict[str, list[dict]] = {c: [] for c in trees}
    with inside_new_netns():
        holders = [subprocess.Popen(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                                     "/usr/bin/python3", "-c", HOLDER], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True) for uid in (61235, 65534)]
        try:
            assert [int(h.stdout.readline()) for h in holders] == [200, 200]
            reads = alternating_runs(tuple(trees), rounds, lambda c: [
                "env", f"PYTHONPATH={trees[c]}", sys.executable, "-c", READ_COST, "1000", "20"])
        finally:
            for holder in holders:
                holder.communicate("", timeout=20)
        assert all(r["package"].startswith(trees[c] + "/") for c, rs in reads.items() for r in rs)
        for round_number in range(rounds):
            for condition in trees if round_number % 2 == 0 else tuple(reversed(trees)):
                agent[condition] += run_sidetrace(tmp / f"{condition}{round_number}", [pps], seconds, 1,
                                                  trees[condition])

    def line(name: str, values: dict[str, list[float]]) -> str:
        before, after = statistics.median(values["before"]), statistics.median(values["after"])
        spread = {c: f"{min(v):.2f}-{max(v):.2f}" for c, v in values.items()}
        return (f"{name:44} before {before:6.2f} ({spread['before']})  after {after:6.2f} ({spread['after']})  "
                f"after/before {after / before:.3f}")
    print(f"{rounds} rounds alternating, {os.cpu_count()} cores; microseconds of CPU per sample, median (min-max)")
    print(line("record(), flows of known processes", record["known"]))
    print(line("record(), flows of unknown processes", record["unknown"]))
    print(line(f"agent at 1:1, {pps:.0f} pps offered on lo", {c: [r["cpu_us_per_sample"] for r in rows]
                                                            for c, rows in agent.items()}))
    print(line("process table read (ms of CPU)", {c: [r["ms_per_read"] for r in rs] for c, rs in reads.items()}))
    print("ends in the table, before/after: " + " / ".join(str(reads[c][0]["ends"]) for c in trees))
    for condition, rows in agent.items():
        print(f"agent kernel drops % by round, {condition}: " + " ".join(f"{r['loss_percent']:.2f}" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rates", default="2000,5000,10000,20000,100000,200000,400000")
    parser.add_argument("--compare-with", metavar="DIR", help="a tree holding another version's sidetrace package")
    parser.add_argument("--compare-pps", type=float, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    assert os.geteuid() == 0, "run as root: the benchmark makes a network namespace and raw sockets"
    if args.compare_with:
        compare(args.compare_with, args.rounds, args.compare_pps, args.seconds)
        return
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
