"""What remote-write costs the agent: CPU per 10,000 samples pushed, and idle CPU and RSS at the defaults.

Three agents run at once against one real Prometheus (Debian's, with --web.enable-remote-write-receiver):
  plain:     no exporter (the baseline: host collection, /metrics)
  default:   [[exporters.remote_write]] at its defaults (interval_seconds = 15)
  fast:      the same every 0.2 s, to measure the cost per sample pushed
Each window reads every agent's CPU from /proc/PID/stat and RSS from /proc/PID/status; windows are
repeated and the medians reported. Samples pushed are counted by the agent itself
(sidetrace_exporter_sent_samples_total).

Usage: python bench/remote_write_cost.py [--seconds 30] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.agent_idle import cpu_seconds, rss_mib  # noqa: E402
from tests.conftest import Agent, http_get, wait_until  # noqa: E402
from tests.integration.test_prometheus import Prometheus  # noqa: E402


def sent_samples(agent: Agent) -> float:
    _, text = http_get(agent.url + "/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sidetrace_exporter_sent_samples_total{"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sidetrace-rw-"))
    (tmp / "prometheus").mkdir()
    prometheus = Prometheus(tmp / "prometheus", None)
    writer = f'[[exporters.remote_write]]\nurl = "{prometheus.url}/api/v1/write"\n'
    agents = {"plain": Agent(tmp / "plain"), "default": Agent(tmp / "default", writer),
              "fast": Agent(tmp / "fast", writer + "interval_seconds = 0.2\n")}
    try:
        for agent in agents.values():
            agent.start()
        wait_until(lambda: sent_samples(agents["fast"]) > 0, 30, "the first samples in Prometheus")
        time.sleep(2)
        windows: dict[str, list[dict]] = {name: [] for name in agents}
        for _ in range(args.rounds):
            cpu0 = {name: cpu_seconds(a.proc.pid) for name, a in agents.items()}
            sent0 = sent_samples(agents["fast"])
            rss: dict[str, list[float]] = {name: [] for name in agents}
            started = time.monotonic()
            while time.monotonic() - started < args.seconds:
                for name, agent in agents.items():
                    rss[name].append(rss_mib(agent.proc.pid))
                time.sleep(1)
            elapsed = time.monotonic() - started
            pushed = sent_samples(agents["fast"]) - sent0
            for name, agent in agents.items():
                windows[name].append({"cpu": (cpu_seconds(agent.proc.pid) - cpu0[name]) / elapsed * 100,
                                      "rss": statistics.median(rss[name]), "pushed": pushed})
    finally:
        for agent in agents.values():
            agent.stop()
        prometheus.stop()

    def med(name: str, key: str) -> float:
        return statistics.median(w[key] for w in windows[name])

    print(f"{args.rounds} windows of {args.seconds:.0f} s; {os.cpu_count()} cores; Python {sys.version.split()[0]}")
    for name in agents:
        cpus = [w["cpu"] for w in windows[name]]
        print(f"{name:8} CPU {med(name, 'cpu'):5.2f} % of a core (min {min(cpus):.2f}, max {max(cpus):.2f}), "
              f"RSS median {med(name, 'rss'):.1f} MiB")
    extra = [(f["cpu"] - p["cpu"]) / 100 * args.seconds for f, p in zip(windows["fast"], windows["plain"], strict=True)]
    per_10k = [seconds / w["pushed"] * 10_000 for seconds, w in zip(extra, windows["fast"], strict=True)]
    print(f"remote-write CPU per 10,000 samples pushed: {statistics.median(per_10k) * 1000:.1f} ms "
          f"(min {min(per_10k) * 1000:.1f}, max {max(per_10k) * 1000:.1f}); "
          f"{statistics.median(w['pushed'] for w in windows['fast']) / args.seconds:.0f} samples/s")
    print(f"idle cost of remote-write at its defaults: {med('default', 'cpu') - med('plain', 'cpu'):+.2f} % of a core, "
          f"{med('default', 'rss') - med('plain', 'rss'):+.1f} MiB")


if __name__ == "__main__":
    main()
