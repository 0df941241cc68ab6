"""Added cost of Dapr instrumentation per call: sidetrace's DaprInstrumentor vs the generic gRPC and
aiohttp-client instrumentations of opentelemetry-python-contrib, same run.

Four conditions (bare dapr SDK; DaprInstrumentor; DaprInstrumentor with a no-op meter provider,
to show what its duration histogram costs; contrib GrpcInstrumentorClient +
AioHttpClientInstrumentor) run in alternating fresh processes of one venv (.benchdapr: the contrib
aiohttp-client instrumentation pins an older OpenTelemetry than the test venv's) against the stand-in
daprd (tests/integration/daprd_standin.py) on loopback, each with the OpenTelemetry SDK, a batch
processor discarding spans, and a metric reader. Modes: ``save_state`` (the SDK's gRPC client),
``invoke_sdk`` (the SDK's ``invoke_method`` over HTTP, its default: a new aiohttp session per call)
and ``invoke_aiohttp`` (GET /v1.0/invoke/echo/method/... on one aiohttp session). The stand-in's
``echo`` app is the stand-in itself. Reported: median over rounds of the caller's CPU microseconds per
call, and the added cost over bare.

Usage: python bench/dapr_overhead.py [--rounds 5] [--ops 2000] [--python .benchdapr/bin/python]
`make bench` creates .benchdapr when missing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._rounds import alternating_runs, python_version  # noqa: E402
from tests.integration.dapr_apps import StandInDaprd  # noqa: E402

WORKER = str(Path(__file__).with_name("dapr_worker.py"))
CONDITIONS = ("bare", "sidetrace", "sidetrace_nometrics", "peer")
MODES = ("save_state", "invoke_sdk", "invoke_aiohttp")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--python", default=str(Path(__file__).resolve().parents[1] / ".benchdapr/bin/python"))
    args = parser.parse_args()
    daprd = StandInDaprd()
    try:
        daprd.configure({"echo": ("http", daprd.http_port)})
        runs = alternating_runs(CONDITIONS, args.rounds, lambda condition: [
            args.python, WORKER, str(daprd.http_port), str(daprd.grpc_port), condition, str(args.ops)])
    finally:
        daprd.stop()
    version = python_version(args.python)
    print(f"{args.rounds} rounds, {args.ops} save_state and invoke_aiohttp / {args.ops // 5} invoke_sdk calls each; "
          f"Python {version}; caller CPU microseconds per call, median")
    print(f"{'mode':15} {'bare':>8} {'sidetrace':>10} {'peer':>8} {'added: sidetrace':>17} {'added: peer':>12} "
          f"{'ratio':>6} {'added: sidetrace without metric':>32}")
    for mode in MODES:
        median = {c: statistics.median(r["modes"][mode]["cpu_us"] for r in runs[c]) for c in CONDITIONS}
        ours, peer = median["sidetrace"] - median["bare"], median["peer"] - median["bare"]
        print(f"{mode:15} {median['bare']:8.1f} {median['sidetrace']:10.1f} {median['peer']:8.1f} "
              f"{ours:17.1f} {peer:12.1f} {ours / peer if peer > 0 else float('nan'):6.2f} "
              f"{median['sidetrace_nometrics'] - median['bare']:32.1f}")
    spans = {c: statistics.median(r["spans"] for r in runs[c]) for c in CONDITIONS}
    print(f"spans per run (median): sidetrace {spans['sidetrace']:.0f}, peer {spans['peer']:.0f}")


if __name__ == "__main__":
    main()
