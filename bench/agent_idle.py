"""Idle CPU and RSS of `sidetrace run`, and the cost of one host collection, beside node_exporter.

Both agents run at the same time on loopback ports with their default collectors and are scraped
every 15 s (Prometheus's default) for the window; CPU is read from /proc/PID/stat, RSS from
/proc/PID/status once a second. Then one full host collection is timed in-process
(HostSource.scan) and as a whole /metrics scrape of each agent.

Usage: python bench/agent_idle.py [--seconds 60] [--scrapes 50]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sidetrace.agent.components import Context  # noqa: E402
from sidetrace.agent.sources.host import HostSource  # noqa: E402
from sidetrace.config import Config, HostSection  # noqa: E402
from tests.conftest import free_port, wait_until  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def scrape(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as response:
        response.read()
    return time.perf_counter() - started


def ready(url: str) -> bool:
    try:
        scrape(url)
    except OSError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--scrapes", type=int, default=50)
    args = parser.parse_args()

    node_exporter = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    tmp = Path(tempfile.mkdtemp(prefix="sidetrace-bench-"))
    st_port, ne_port = free_port(), free_port()
    env = {**os.environ, "SIDETRACE_SERVER__LISTEN": f"127.0.0.1:{st_port}",
           "SIDETRACE_AGENT__DATA_DIR": str(tmp / "data")}
    procs = {"sidetrace": subprocess.Popen([sys.executable, "-m", "sidetrace", "run"], env=env,
                                           stderr=subprocess.DEVNULL)}
    urls = {"sidetrace": f"http://127.0.0.1:{st_port}/metrics"}
    if node_exporter:
        procs["node_exporter"] = subprocess.Popen(
            [node_exporter, f"--web.listen-address=127.0.0.1:{ne_port}"], stderr=subprocess.DEVNULL)
        urls["node_exporter"] = f"http://127.0.0.1:{ne_port}/metrics"
    try:
        for name, url in urls.items():
            wait_until(lambda url=url: ready(url), 30, f"{name} serving")
        time.sleep(2)  # let start-up work settle before the window
        cpu0 = {name: cpu_seconds(p.pid) for name, p in procs.items()}
        rss: dict[str, list[float]] = {name: [] for name in procs}
        started = time.monotonic()
        next_scrape = started
        while time.monotonic() - started < args.seconds:
            if time.monotonic() >= next_scrape:
                for url in urls.values():
                    scrape(url)
                next_scrape += 15
            for name, p in procs.items():
                rss[name].append(rss_mib(p.pid))
            time.sleep(1)
        window = time.monotonic() - started
        idle = {name: (cpu_seconds(p.pid) - cpu0[name]) / window * 100 for name, p in procs.items()}
        scrape_ms = {name: [scrape(url) * 1000 for _ in range(args.scrapes)] for name, url in urls.items()}
    finally:
        for p in procs.values():
            p.terminate()
            p.wait(15)

    registry = CollectorRegistry(auto_describe=False)
    source = HostSource(HostSection(), Context(Config(), registry, dict, lambda: True))
    scans = []
    for _ in range(args.scrapes):
        t = time.perf_counter()
        source.scan()
        scans.append((time.perf_counter() - t) * 1000)
    per_collector = {name: round(seconds * 1000, 2) for name, seconds in source._durations.items()}

    print(f"window {window:.0f} s, scraped every 15 s; {os.cpu_count()} cores; Python {sys.version.split()[0]}")
    print(f"{'agent':15} {'idle CPU % of a core':>21} {'RSS MiB median':>15} {'RSS MiB max':>12} "
          f"{'/metrics ms median':>19}")
    for name in procs:
        print(f"{name:15} {idle[name]:21.3f} {statistics.median(rss[name]):15.1f} {max(rss[name]):12.1f} "
              f"{statistics.median(scrape_ms[name]):19.2f}")
    if "node_exporter" in procs:
        rss_m = {name: statistics.median(values) for name, values in rss.items()}
        scrape_m = {name: statistics.median(values) for name, values in scrape_ms.items()}
        print(f"ratio sidetrace/node_exporter: idle CPU {idle['sidetrace'] / max(idle['node_exporter'], 1e-9):.2f}, "
              f"RSS {rss_m['sidetrace'] / rss_m['node_exporter']:.2f}, "
              f"/metrics {scrape_m['sidetrace'] / scrape_m['node_exporter']:.2f}")
    else:
        print("node_exporter not installed: `make bench` installs Debian's prometheus-node-exporter")
    print(f"one host collection (HostSource.scan, in-process): median {statistics.median(scans):.2f} ms, "
          f"max {max(scans):.2f} ms over {len(scans)}")
    print(f"per collector (last scan, ms): {per_collector}")


if __name__ == "__main__":
    main()
