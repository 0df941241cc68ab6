"""Spans per second relayed end to end, CPU per 100k spans and RSS at 10k spans/s: sidetrace vs rotel.

Three chains alternate round by round in the same invocation, with the same load:
  sidetrace:    load -> sidetrace agent (gRPC) -> rotel -> sink
  sidetrace-lb: load -> sidetrace agent, loadbalancing exporter by trace id -> 3 rotels -> sink
  rotel alone:  load -> rotel -> sink
The load is pre-encoded OTLP requests (512 spans in traces of 8, 100 distinct bodies so trace ids
vary) replayed over concurrent gRPC calls from a separate process: one Python process running the
stock SDK cannot offer more than about 8k spans/s. The sink is an in-process OTLP/gRPC server that
counts spans. CPU is read from /proc/PID/stat of the relaying process (the agent, or rotel in the
rotel-alone chain); RSS from /proc/PID/status.

Usage: python bench/trace_relay.py [--spans 400000] [--steady-seconds 30] [--rounds 3] [--no-lb]
                                   [--compare-with CHECKOUT]
--compare-with adds a chain whose agent runs another checkout's code (say a worktree of main at the
commit before a change), alternating with the others, so before and after come from the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.agent_idle import cpu_seconds, rss_mib  # noqa: E402
from tests.conftest import free_port, http_get, wait_until  # noqa: E402
from tests.integration.otlp_servers import Rotel, Sink  # noqa: E402

LOAD = str(Path(__file__).with_name("otlp_load.py"))


def start_agent(tmp: Path, rotel_port: int, exporter: str | None = None,
                source: Path | None = None) -> tuple[subprocess.Popen, int, int]:
    grpc_port, http_port, port = free_port(), free_port(), free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "agent.toml"
    config.write_text(
        f'[agent]\ndata_dir = "{tmp / "data"}"\n[server]\nlisten = "127.0.0.1:{port}"\n'
        f'[receivers.otlp]\ngrpc_listen = "127.0.0.1:{grpc_port}"\nhttp_listen = "127.0.0.1:{http_port}"\n'
        + (exporter or f'[[exporters.otlp]]\nname = "rotel"\nendpoint = "http://127.0.0.1:{rotel_port}"\n')
    )
    with open(tmp / "agent.log", "wb") as log:
        # From the other checkout's directory too: `python -m` puts the working directory before PYTHONPATH.
        env = {**os.environ, "PYTHONPATH": str(source)} if source else None
        proc = subprocess.Popen([sys.executable, "-m", "sidetrace", "run", "--config", str(config)], stderr=log,
                                env=env, cwd=source)
    wait_until(lambda: http_get(f"http://127.0.0.1:{port}/readyz", 1)[0] == 200, 30, "agent ready")
    return proc, grpc_port, port


def run_load(target: str, spans: int, rate: float, concurrency: int) -> tuple[int, float, int]:
    done = subprocess.run([sys.executable, LOAD, target, str(spans), str(rate), str(concurrency)],
                          capture_output=True, text=True, timeout=900, check=True)
    sent, seconds, refused = done.stdout.split()
    return int(sent), float(seconds), int(refused)


def relay(name: str, relay_pid: int, target: str, sink: Sink, spans: int, concurrency: int) -> dict:
    before = sink.collected.unique_spans
    cpu0 = cpu_seconds(relay_pid)
    started = time.monotonic()
    sent, _, refused = run_load(target, spans, 0, concurrency)
    wait_until(lambda: sink.collected.unique_spans - before >= sent, 600, f"{name}: every span at the sink",
               interval=0.02)
    seconds = time.monotonic() - started
    cpu = cpu_seconds(relay_pid) - cpu0
    return {"spans_per_s": sent / seconds, "cpu_per_100k": cpu / sent * 100_000, "refused": refused}


def steady(relay_pid: int, target: str, seconds: float, rate: float = 10_000) -> dict:
    rss: list[float] = []
    cpu0 = cpu_seconds(relay_pid)
    load = subprocess.Popen([sys.executable, LOAD, target, str(int(rate * seconds)), str(rate), "2"],
                            stdout=subprocess.PIPE, text=True)
    started = time.monotonic()
    while load.poll() is None:
        rss.append(rss_mib(relay_pid))
        time.sleep(0.5)
    elapsed = time.monotonic() - started
    return {"cpu_percent": (cpu_seconds(relay_pid) - cpu0) / elapsed * 100, "rss_median": statistics.median(rss),
            "rss_max": max(rss)}


class CountingSink(Sink):
    """The test sink, counting spans without keeping them (a benchmark sends millions)."""

    def __init__(self) -> None:
        super().__init__()
        collected = self.collected
        collected.unique_spans = 0

        def handle_trace(request, headers):  # noqa: ANN001, ANN202
            n = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
            with collected.lock:
                collected.unique_spans += n

        collected.handle_trace = handle_trace


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spans", type=int, default=400_000)
    parser.add_argument("--steady-seconds", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--no-lb", action="store_true", help="leave out the sidetrace-lb chain")
    parser.add_argument("--compare-with", type=Path, help="a checkout whose agent runs as one more chain")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sidetrace-relay-"))
    sink = CountingSink()
    rotel = Rotel(tmp, sink.port).start()
    tier = [] if args.no_lb else [Rotel(tmp, sink.port).start() for _ in range(3)]
    agent, agent_grpc, _ = start_agent(tmp / "plain", rotel.grpc_port)
    agents = [agent]
    chains = {"sidetrace": (agent.pid, agent_grpc)}
    if args.compare_with:
        other, other_grpc, _ = start_agent(tmp / "other", rotel.grpc_port, source=args.compare_with.resolve())
        agents.append(other)
        chains["compared"] = (other.pid, other_grpc)
    if tier:
        backends = ", ".join(f'"127.0.0.1:{r.grpc_port}"' for r in tier)
        balancer, balancer_grpc, _ = start_agent(tmp / "lb", 0, f'[[exporters.loadbalancing]]\nname = "tier"\n'
                                                               f'backends = [{backends}]\n')
        agents.append(balancer)
        chains["sidetrace-lb"] = (balancer.pid, balancer_grpc)
    chains["rotel alone"] = (rotel.proc.pid, rotel.grpc_port)
    results: dict[str, list[dict]] = {name: [] for name in chains}
    try:
        for _ in range(args.rounds):  # alternate the chains so drift hits them alike
            for name, (pid, port) in chains.items():
                results[name].append(relay(name, pid, f"127.0.0.1:{port}", sink, args.spans, args.concurrency))
        steady_runs = {name: steady(pid, f"127.0.0.1:{port}", args.steady_seconds)
                       for name, (pid, port) in chains.items() if name != "sidetrace-lb"}
    finally:
        for process in agents:
            process.terminate()
            process.wait(15)
        for collector in (rotel, *tier):
            collector.stop()
        sink.stop()

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print(f"{args.rounds} rounds of {args.spans} spans, {args.concurrency} concurrent gRPC calls; "
          f"{os.cpu_count()} cores; Python {sys.version.split()[0]}")
    def spread(name: str, key: str) -> str:
        values = [r[key] for r in results[name]]
        return f"{min(values):.3f}-{max(values):.3f}"

    print(f"{'chain':12} {'spans/s median':>15} {'relay CPU s per 100k spans':>27} {'(min-max)':>13} {'refused':>8}")
    for name in results:
        print(f"{name:12} {med(name, 'spans_per_s'):15.0f} {med(name, 'cpu_per_100k'):27.3f} "
              f"{spread(name, 'cpu_per_100k'):>13} {sum(r['refused'] for r in results[name]):8d}")
    print(f"ratio sidetrace/rotel: throughput {med('sidetrace', 'spans_per_s') / med('rotel alone', 'spans_per_s'):.2f}"
          f", CPU per span {med('sidetrace', 'cpu_per_100k') / med('rotel alone', 'cpu_per_100k'):.2f}")
    for other in ("compared", "sidetrace-lb"):
        if other in results:
            throughput = med(other, "spans_per_s") / med("sidetrace", "spans_per_s")
            cpu = med(other, "cpu_per_100k")
            per_round = [o["cpu_per_100k"] / plain["cpu_per_100k"] for o, plain in zip(results[other],
                                                                                     results["sidetrace"], strict=True)]
            print(f"ratio {other}/sidetrace: throughput {throughput:.2f}, CPU per span "
                  f"{cpu / med('sidetrace', 'cpu_per_100k'):.2f} (round by round: median "
                  f"{statistics.median(per_round):.2f}, {min(per_round):.2f}-{max(per_round):.2f}); {other}/rotel: "
                  f"CPU per span {cpu / med('rotel alone', 'cpu_per_100k'):.2f}")
    for name, run in steady_runs.items():
        print(f"steady 10k spans/s for {args.steady_seconds:.0f} s: {name} {run['cpu_percent']:.1f} % of a core, "
              f"RSS median {run['rss_median']:.1f} MiB (max {run['rss_max']:.1f})")


if __name__ == "__main__":
    main()
