"""How long an old spool's trace-queue backlog holds up a load-balancing exporter's start.

A spool written before routing at accept time keeps every request in the trace queue under the
load-balancing exporter's cursor; the exporter routes that backlog into its backends' queues once.
This measures, on a spool holding --spans SDK spans (bench/spool_sizing.py's spans, 512 to a request,
394 bytes a span as received) for an exporter over three backends (addresses nothing listens on: only
routing is timed, not delivery):

- start: from opening the spool to the exporter's ``start()`` returning (what delays the agent's start);
- routed: from opening the spool until the backlog is routed (the trace-queue cursor gone).

Conditions: sidetrace now, and with ``--before REV`` sidetrace as it was at git revision REV (which
routed the backlog inside ``start()``), each in a fresh process, alternating round by round.

Usage: python bench/upgrade_drain.py [--spans 100000] [--rounds 5] [--before 4cde94f]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._rounds import alternating_runs  # noqa: E402


def checkout(revision: str) -> str:
    """sidetrace as it was at ``revision``, extracted to a temporary directory (put first on sys.path)."""
    target = tempfile.mkdtemp(prefix="sidetrace-before-")
    archive = subprocess.run(["git", "archive", revision, "sidetrace"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", target], input=archive.stdout, check=True)
    return target


async def measure(requests_file: Path) -> dict:
    """One round in this process: write the old spool, then time the exporter's start and the backlog's routing."""
    from sidetrace.config import LoadBalancingExporterSection
    from sidetrace.exporters.delivery import DeliveryStats
    from sidetrace.exporters.loadbalancing import LoadBalancingExporter
    from sidetrace.exporters.spool import TRACES, Spool

    bodies = json.loads(requests_file.read_text())
    directory = Path(tempfile.mkdtemp(prefix="upgrade-drain-"))
    try:
        old = Spool(directory / "spool.db", max_bytes=1 << 34, sync="normal")
        old.add_reader_at_open("lb")  # the previous version's router cursor on the trace queue
        await old.open()
        for body in bodies:
            await old.append(bytes.fromhex(body), 512, TRACES)
        await old.close()
        began = time.monotonic()
        spool = Spool(directory / "spool.db", max_bytes=1 << 34, sync="full")
        spool.add_reader_at_open("lb", TRACES, resume_only=True, sub_readers=True)
        await spool.open()
        stats: dict[str, DeliveryStats] = {}
        section = LoadBalancingExporterSection(name="lb", backends=("127.0.0.1:9", "127.0.0.2:9", "127.0.0.3:9"),
                                               compression="none")
        lb = LoadBalancingExporter(section, spool, lambda reader: stats.setdefault(reader, DeliveryStats()))
        await lb.start()
        started = time.monotonic() - began
        while "lb" in spool.readers():
            await asyncio.sleep(0.005)
        routed = time.monotonic() - began
        await lb.stop()
        await spool.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {"start": started, "routed": routed}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spans", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", help="also measure sidetrace as it was at this git revision")
    parser.add_argument("--worker", nargs=2, metavar=("REQUESTS", "SYS_PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        requests_file, path = args.worker
        if path:
            sys.path.insert(0, path)
        import logging
        logging.disable(logging.WARNING)  # the backends refuse every connection: not what is measured
        print(json.dumps(asyncio.run(measure(Path(requests_file)))))
        return
    from bench.spool_sizing import sdk_requests

    scratch = Path(tempfile.mkdtemp(prefix="upgrade-drain-requests-"))
    requests_file = scratch / "requests.json"
    requests_file.write_text(json.dumps([body.hex() for body in sdk_requests(args.spans)]))
    before = checkout(args.before) if args.before else ""
    conditions = ("now", *(("before",) if before else ()))
    try:
        runs = alternating_runs(conditions, args.rounds, lambda c: [
            sys.executable, __file__, "--worker", str(requests_file), before if c == "before" else ""], cwd=ROOT)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if before:
            shutil.rmtree(before, ignore_errors=True)
    print(f"{args.spans} spans, {args.rounds} alternating rounds, seconds, median (range)")
    for condition in conditions:
        print(f"{condition}: start {spread([r['start'] for r in runs[condition]])}, "
              f"backlog routed {spread([r['routed'] for r in runs[condition]])}")


if __name__ == "__main__":
    main()
