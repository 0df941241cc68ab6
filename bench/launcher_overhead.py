"""`sidetrace instrument` against `opentelemetry-instrument`: start-up time, memory, and the app's CPU per span.

The same scripts run three ways, alternated round by round in one invocation:
  bare:       python SCRIPT
  otel:       opentelemetry-instrument python SCRIPT (opentelemetry-distro: the stock SDK, OTLP/gRPC)
  sidetrace:  sidetrace instrument -- python SCRIPT
Both launchers export traces over OTLP/gRPC to an in-process sink (logs off, as sidetrace sends none).
Scripts: `trivial` (does nothing), `flask` (builds a Flask app and serves one request through its test
client), and `spans N` (makes N spans in a loop, then exits, flushing them). From each child's rusage:
wall time, CPU (user + system) and peak RSS. CPU per exported span is (CPU of `spans N` - CPU of
`spans 0`) / N, each launcher against itself.

Both launchers run from one venv (.benchlauncher, made by `make bench`) holding opentelemetry-distro,
sidetrace and the same instrumentations (Flask's and threading's), so each loads the same set: the
test venv holds many more (Temporal, Dapr, gRPC, ...), which would measure the libraries, not the
launchers. Peak RSS comes from /usr/bin/time (a child's rusage from this process would start at this
process's own size, which it inherits at fork).

Usage: python bench/launcher_overhead.py [--rounds 7] [--spans 20000]
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
from bench.trace_relay import CountingSink  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / ".benchlauncher" / "bin"
SCRIPT = '''
import sys
what = sys.argv[1]
if what == "flask":
    import flask
    app = flask.Flask("bench")
    app.add_url_rule("/hello", "hello", lambda: "hi")
    assert app.test_client().get("/hello").status_code == 200
elif what == "spans":
    from opentelemetry import trace
    tracer = trace.get_tracer("bench")
    for n in range(int(sys.argv[2])):
        with tracer.start_as_current_span("work", attributes={"n": n, "kind": "bench"}):
            pass
'''


def run(command: list[str], env: dict[str, str]) -> dict[str, float]:
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "TIME %M %U %S", *command], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed: {done.stderr[-2000:]}")
    rss_kib, user, system = done.stderr.strip().splitlines()[-1].split()[1:]
    return {"wall": wall, "cpu": float(user) + float(system), "rss": int(rss_kib) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--spans", type=int, default=20_000)
    args = parser.parse_args()
    if not (PEER / "opentelemetry-instrument").exists():
        sys.exit(f"{PEER}/opentelemetry-instrument is missing: `make bench` creates .benchlauncher")
    sink = CountingSink()
    script = Path(tempfile.mkdtemp()) / "app.py"
    script.write_text(SCRIPT)
    endpoint = f"http://127.0.0.1:{sink.port}"
    base = {key: value for key, value in os.environ.items() if not key.startswith(("OTEL_", "SIDETRACE_"))}
    peer_env = {**base, "OTEL_SERVICE_NAME": "bench", "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                "OTEL_TRACES_EXPORTER": "otlp", "OTEL_METRICS_EXPORTER": "otlp", "OTEL_LOGS_EXPORTER": "none",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    ours_env = {**base, "OTEL_SERVICE_NAME": "bench"}
    contenders = {
        "bare": ([str(PEER / "python"), str(script)], base),
        "otel": ([str(PEER / "opentelemetry-instrument"), str(PEER / "python"), str(script)], peer_env),
        "sidetrace": ([str(PEER / "sidetrace"), "instrument", "--endpoint", endpoint, "--",
                       str(PEER / "python"), str(script)], ours_env),
    }
    workloads = {"trivial": ["trivial"], "flask": ["flask"], "spans 0": ["spans", "0"],
                 f"spans {args.spans}": ["spans", str(args.spans)]}
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        for _ in range(args.rounds):  # alternate, so drift hits every contender alike
            for workload, extra in workloads.items():
                for name, (command, env) in contenders.items():
                    if name == "bare" and workload.startswith("spans"):
                        continue
                    results.setdefault((name, workload), []).append(run([*command, *extra], env))
    finally:
        sink.stop()

    def med(name: str, workload: str, key: str) -> float:
        return statistics.median(r[key] for r in results[(name, workload)])

    print(f"{args.rounds} rounds; {os.cpu_count()} cores; Python {sys.version.split()[0]}")
    print(f"{'workload':14} {'launcher':10} {'wall ms':>8} {'CPU ms':>8} {'peak RSS MiB':>13}   (medians)")
    for workload in ("trivial", "flask"):
        for name in contenders:
            print(f"{workload:14} {name:10} {med(name, workload, 'wall') * 1000:8.0f} "
                  f"{med(name, workload, 'cpu') * 1000:8.0f} {med(name, workload, 'rss'):13.1f}")
    for workload in ("trivial", "flask"):
        added = {name: (med(name, workload, "wall") - med("bare", workload, "wall")) * 1000 for name in ("otel",
                                                                                                        "sidetrace")}
        memory = {name: med(name, workload, "rss") - med("bare", workload, "rss") for name in ("otel", "sidetrace")}
        print(f"added to {workload}: start-up otel {added['otel']:+.0f} ms, sidetrace {added['sidetrace']:+.0f} ms; "
              f"memory otel {memory['otel']:+.1f} MiB, sidetrace {memory['sidetrace']:+.1f} MiB")
    for name in ("otel", "sidetrace"):
        per_span = [(many["cpu"] - none["cpu"]) / args.spans * 1e6 for many, none in
                    zip(results[(name, f"spans {args.spans}")], results[(name, "spans 0")], strict=True)]
        print(f"CPU per exported span, {name}: median {statistics.median(per_span):.1f} us "
              f"(min {min(per_span):.1f}, max {max(per_span):.1f})")


if __name__ == "__main__":
    main()
