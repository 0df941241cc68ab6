"""Added cost per message of NATS instrumentation: sidetrace vs otel-instrumentation-nats, same run.

Conditions (bare nats-py, sidetrace's NatsInstrumentor, the PyPI otel-instrumentation-nats peer,
and with ``--before REV`` sidetrace as it was at git revision REV) run in alternating fresh
processes of one Python 3.13 venv (the peer needs 3.13), against one nats-server on loopback, each
with the OpenTelemetry SDK and a batch processor discarding spans. Modes: pipelined (publish N,
flush once, wait for the last delivery), sequential (publish one, wait for its handler) and
request/reply. Reported: median over rounds of CPU microseconds per message with its range, and the
added cost over bare. A reference condition in the same rounds, ``sdk``, makes only what a
pipelined message makes (a publish span and its process span, same attributes, no NATS), so the
added cost can be read as a multiple of the SDK's own on this machine; ``by-hand``, the same two
spans made by the app around nats-py with each publish span's traceparent header sent along (nothing
extracted, no attribute built; the process span starts under a constant parent); and
``by-hand-parented``, the same but the handler reads the producer's context with
``propagate.extract``, starts the process span as its child and makes it current for the handler
body: the least that any instrumentation making these spans and parenting them pays in place.

With ``--metrics``, sidetrace (and the --before revision) also run with an SDK meter provider, so
that the two histogram records per message are measured (without one they are no-op calls).

Usage: python bench/nats_overhead.py [--rounds 9] [--messages 5000] [--before main] [--metrics]
                                     [--python .bench313/bin/python]
`make bench` creates .bench313 with pyenv's 3.13 when missing.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._rounds import alternating_runs, python_version  # noqa: E402
from tests.integration.nats_server import NatsServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(Path(__file__).with_name("nats_worker.py"))
MODES = ("pipelined", "sequential", "request")


def checkout(revision: str) -> str:
    """A directory holding the `sidetrace` package as it was at ``revision``."""
    target = tempfile.mkdtemp(prefix="sidetrace-before-")
    archive = subprocess.run(["git", "archive", revision, "sidetrace"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", target], input=archive.stdout, check=True)
    return target


def spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--before", help="also measure sidetrace as it was at this git revision")
    parser.add_argument("--metrics", action="store_true",
                        help="also measure sidetrace (and --before) with an SDK meter provider: the histograms' cost")
    parser.add_argument("--python", default=str(ROOT / ".bench313/bin/python"))
    args = parser.parse_args()
    ours = ("sidetrace", *(("before",) if args.before else ()))
    floors = ("by-hand", "by-hand-parented")
    conditions = ("bare", *ours, *((f"{c}+metrics" for c in ours) if args.metrics else ()), "peer", "sdk",
                  *floors)
    before = checkout(args.before) if args.before else ""

    def command(condition: str) -> list[str]:
        if condition.startswith("before"):
            return [args.python, WORKER, server.url, condition.replace("before", "sidetrace"), str(args.messages),
                    before]
        return [args.python, WORKER, server.url, condition, str(args.messages)]

    server = NatsServer(Path(tempfile.mkdtemp(prefix="sidetrace-nats-bench-")))
    try:
        runs = alternating_runs(conditions, args.rounds, command)
    finally:
        server.stop()
        if before:
            shutil.rmtree(before, ignore_errors=True)
    version = python_version(args.python)
    print(f"{args.rounds} rounds, {args.messages} pipelined / {args.messages // 5} sequential and request "
          f"messages each; Python {version}; CPU microseconds per message, median (range)")
    measured = [c for c in conditions if c not in ("bare", "sdk", *floors)]
    print(f"{'mode':11} {'bare':>18} " + " ".join(f"{c:>18} {'added: ' + c:>24}" for c in measured))
    for mode in MODES:
        cpu = {c: [r["modes"][mode]["cpu_us"] for r in runs[c]] for c in ("bare", *measured)}
        bare = statistics.median(cpu["bare"])
        print(f"{mode:11} {spread(cpu['bare']):>18} "
              + " ".join(f"{spread(cpu[c]):>18} {spread([v - bare for v in cpu[c]]):>24}" for c in measured))
    reference = [r["modes"]["pipelined"]["cpu_us"] for r in runs["sdk"]]
    print(f"reference: two bare SDK spans with a pipelined message's attributes, no NATS: {spread(reference)} us")
    bare = statistics.median(r["modes"]["pipelined"]["cpu_us"] for r in runs["bare"])
    for floor, what in (("by-hand", "a traceparent header sent along and read by no one"),
                        ("by-hand-parented", "the process span the extracted producer's child, made current")):
        added = [r["modes"]["pipelined"]["cpu_us"] - bare for r in runs[floor]]
        print(f"floor {floor}: the same two spans made by the app around nats-py, {what}, added: "
              f"{spread(added)} us, {statistics.median(added) / statistics.median(reference):.2f} times the reference")
    parented = statistics.median(r["modes"]["pipelined"]["cpu_us"] for r in runs["by-hand-parented"]) - bare
    for c in measured:
        added = statistics.median(r["modes"]["pipelined"]["cpu_us"] for r in runs[c]) - bare
        print(f"pipelined, added by {c} / reference: {added / statistics.median(reference):.2f} "
              f"(the issue's goal, 45 us against 35 us, is 1.29); above the parented floor: {added - parented:.1f} us")
    for c in measured:  # paired: each round's conditions ran one after another
        ratios = [(now["modes"]["pipelined"]["cpu_us"] - bare) / (floor["modes"]["pipelined"]["cpu_us"] - bare)
                  for now, floor in zip(runs[c], runs["by-hand-parented"], strict=True)]
        print(f"pipelined, added by {c} / added by by-hand-parented, per round: {spread(ratios, 2)}")
    if args.before:  # paired: the two ran next to each other in every round
        for suffix in ("", "+metrics") if args.metrics else ("",):
            ratios = [(now["modes"]["pipelined"]["cpu_us"] - bare) / (then["modes"]["pipelined"]["cpu_us"] - bare)
                      for now, then in zip(runs[f"sidetrace{suffix}"], runs[f"before{suffix}"], strict=True)]
            print(f"pipelined, added by sidetrace{suffix} / before{suffix}, per round: {spread(ratios, 2)}")
    spans = {c: statistics.median(r["spans"] for r in runs[c]) for c in measured}
    print("spans per run (median): " + ", ".join(f"{c} {n:.0f}" for c, n in spans.items()))


if __name__ == "__main__":
    main()
