"""What folding an OTLP metrics request into the app-metrics store costs on the receive path:
``AppMetrics.apply()`` in-process, CPU time per data point, the current code against other git revisions'
(``--baseline``, repeatable, default ``main``).

The request is shaped like a stock SDK's export: one resource, two scopes, in each 10 delta counters, 10 delta
histograms (the SDK's 16 default buckets) and 10 gauges, 20 attribute sets of 3 attributes each: 1,200 points.
Each round builds a fresh store per contender, applies one request to create the series, then times ``--requests``
requests whose delta windows follow on; contenders alternate, the order reversed every other round. A last
condition times the current code on requests that were already applied (every delta point re-sent, so dropped).

Usage: python bench/app_metrics_apply.py [--rounds 11] [--requests 20] [--baseline main --baseline REV]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest  # noqa: E402
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality  # noqa: E402

from sidetrace.agent import app_metrics as current  # noqa: E402
from sidetrace.config import AppMetricsSection  # noqa: E402

DELTA = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
BOUNDS = [0, 5, 10, 25, 50, 75, 100, 250, 500, 750, 1000, 2500, 5000, 7500, 10000]


def request(window: int) -> ExportMetricsServiceRequest:
    """One SDK-shaped export covering [window, window + 1] seconds."""
    start, end = (10**18 + window * 10**9, 10**18 + (window + 1) * 10**9)
    built = ExportMetricsServiceRequest()
    resource_metrics = built.resource_metrics.add()
    for key, value in (("service.name", "cart"), ("service.instance.id", "cart-1"), ("host.name", "h1")):
        resource_metrics.resource.attributes.add(key=key).value.string_value = value
    for scope_name, version in (("cart.http", "1.4.0"), ("cart.db", "")):
        scope_metrics = resource_metrics.scope_metrics.add()
        scope_metrics.scope.name, scope_metrics.scope.version = scope_name, version
        for n in range(10):
            counter = scope_metrics.metrics.add(name=f"requests.{n}", unit="{request}").sum
            counter.is_monotonic, counter.aggregation_temporality = True, DELTA
            histogram = scope_metrics.metrics.add(name=f"duration.{n}", unit="ms").histogram
            histogram.aggregation_temporality = DELTA
            gauge = scope_metrics.metrics.add(name=f"queue.{n}").gauge
            for a in range(20):
                attributes = {"http.route": f"/r{a}", "http.method": "GET", "status": str(200 + a % 3)}
                points = (counter.data_points.add(start_time_unix_nano=start, time_unix_nano=end, as_int=3),
                          histogram.data_points.add(start_time_unix_nano=start, time_unix_nano=end, count=3, sum=7.5,
                                                    explicit_bounds=BOUNDS, bucket_counts=[0, 1, 2] + [0] * 13),
                          gauge.data_points.add(time_unix_nano=end, as_double=a))
                for point in points:
                    for key, value in attributes.items():
                        point.attributes.add(key=key).value.string_value = value
    return built


def points(built: ExportMetricsServiceRequest) -> int:
    return sum(len(getattr(m, m.WhichOneof("data")).data_points) for rm in built.resource_metrics
               for sm in rm.scope_metrics for m in sm.metrics)


def baseline_module(revision: str) -> ModuleType:
    source = subprocess.run(["git", "show", f"{revision}:sidetrace/agent/app_metrics.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="sidetrace-bench-")) / "app_metrics_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("app_metrics_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_apply(module: ModuleType, requests: list[ExportMetricsServiceRequest], resend: bool) -> float:
    """CPU seconds per point of applying ``requests[1:]`` to a store that already took ``requests[0]``."""
    store = module.AppMetrics(AppMetricsSection())
    store.apply(requests[0])
    timed = requests[:1] * (len(requests) - 1) if resend else requests[1:]
    started = time.process_time()  # CPU time: other processes on a shared machine do not add to it
    for built in timed:
        store.apply(built)
    elapsed = time.process_time() - started
    return elapsed / sum(points(b) for b in timed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--baseline", action="append", help="a git revision to compare (repeatable; default main)")
    args = parser.parse_args()
    baselines = args.baseline or ["main"]
    requests = [request(window) for window in range(args.requests + 1)]
    contenders = {revision: (baseline_module(revision), False) for revision in baselines}
    contenders.update({"current": (current, False), "current, every delta re-sent": (current, True)})
    runs: dict[str, list[float]] = {name: [] for name in contenders}
    for round_number in range(args.rounds):
        order = list(contenders) if round_number % 2 == 0 else list(reversed(contenders))
        for name in order:
            module, resend = contenders[name]
            runs[name].append(time_apply(module, requests, resend))
    print(f"{points(requests[0])} points a request, {args.requests} requests a round, {args.rounds} rounds")
    base = statistics.median(runs[baselines[0]])
    for name, values in runs.items():
        median = statistics.median(values)
        print(f"{name:32s} median {median * 1e6:6.2f} us/point  (min {min(values) * 1e6:.2f}, "
              f"max {max(values) * 1e6:.2f})  ratio to {baselines[0]} {median / base:.2f}")


if __name__ == "__main__":
    main()
