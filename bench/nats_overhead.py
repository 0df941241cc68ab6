"""Added cost per message of NATS instrumentation: sidetrace vs otel-instrumentation-nats, same run.

Three conditions (bare nats-py, sidetrace's NatsInstrumentor, the PyPI otel-instrumentation-nats
peer) run in alternating fresh processes of one Python 3.13 venv (the peer needs 3.13), against one
nats-server on loopback, each with the OpenTelemetry SDK and a batch processor discarding spans.
Modes: pipelined (publish N, flush once, wait for the last delivery), sequential (publish one, wait
for its handler) and request/reply. Reported: median over rounds of CPU microseconds per message,
and the added cost over bare.

Usage: python bench/nats_overhead.py [--rounds 5] [--messages 5000] [--python .bench313/bin/python]
`make bench` creates .bench313 with pyenv's 3.13 when missing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._rounds import alternating_runs, python_version  # noqa: E402
from tests.integration.nats_server import NatsServer  # noqa: E402

WORKER = str(Path(__file__).with_name("nats_worker.py"))
CONDITIONS = ("bare", "sidetrace", "peer")
MODES = ("pipelined", "sequential", "request")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--python", default=str(Path(__file__).resolve().parents[1] / ".bench313/bin/python"))
    args = parser.parse_args()
    server = NatsServer(Path(tempfile.mkdtemp(prefix="sidetrace-nats-bench-")))
    try:
        runs = alternating_runs(CONDITIONS, args.rounds,
                                lambda condition: [args.python, WORKER, server.url, condition, str(args.messages)])
    finally:
        server.stop()
    version = python_version(args.python)
    print(f"{args.rounds} rounds, {args.messages} pipelined / {args.messages // 5} sequential and request "
          f"messages each; Python {version}; CPU microseconds per message, median")
    print(f"{'mode':11} {'bare':>8} {'sidetrace':>10} {'peer':>8} {'added: sidetrace':>17} {'added: peer':>12}")
    for mode in MODES:
        median = {c: statistics.median(r["modes"][mode]["cpu_us"] for r in runs[c]) for c in CONDITIONS}
        print(f"{mode:11} {median['bare']:8.1f} {median['sidetrace']:10.1f} {median['peer']:8.1f} "
              f"{median['sidetrace'] - median['bare']:17.1f} {median['peer'] - median['bare']:12.1f}")
    spans = {c: statistics.median(r["spans"] for r in runs[c]) for c in CONDITIONS}
    print(f"spans per run (median): sidetrace {spans['sidetrace']:.0f}, peer {spans['peer']:.0f}")


if __name__ == "__main__":
    main()
