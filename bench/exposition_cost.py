"""What a /metrics scrape costs the agent in each exposition format: text 0.0.4, OpenMetrics, and the protobuf one
(the only one with native histograms), rendered in-process from the same app-metrics store.

Two stores: "ordinary" (counters and classic histograms, which every format carries) and "exponential" (the same
plus exponential histograms, which only the protobuf format carries; the text formats leave them out). The formats
alternate round by round (order reversed every other round); each round renders each format ``--renders`` times
and keeps the mean time of one render. Medians and the spread (min to max) over the rounds are printed, with each
format's time as a ratio of text 0.0.4's in the same round. Points carry start and end times, as an SDK's do.

``--cpu`` times CPU time of this process instead of wall time (steadier on a shared machine).
``--baseline REV`` adds a contender: the protobuf exposition of REV's code (its ``app_metrics`` and
``protobuf_exposition`` modules, from git), rendered from a store of its own built from the same request.

Usage: python bench/exposition_cost.py [--rounds 9] [--renders 20] [--series 1000] [--cpu] [--baseline REV]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest  # noqa: E402
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality  # noqa: E402

from sidetrace.agent import protobuf_exposition  # noqa: E402
from sidetrace.agent.app_metrics import AppMetrics  # noqa: E402
from sidetrace.config import AppMetricsSection  # noqa: E402

CUMULATIVE = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
START, END = 1_700_000_000 * 10**9, 1_700_000_060 * 10**9


def request(series: int, exponential: bool) -> ExportMetricsServiceRequest:
    """``series`` series from one app: 40 % counters, 30 % classic histograms (12 bounds), and 30 % exponential
    histograms (scale 3, 40 buckets) when ``exponential``, else that share again as classic histograms."""
    out = ExportMetricsServiceRequest()
    resource_metrics = out.resource_metrics.add()
    kv = resource_metrics.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", "bench"
    scope = resource_metrics.scope_metrics.add()
    counter = scope.metrics.add(name="requests")
    counter.sum.is_monotonic, counter.sum.aggregation_temporality = True, CUMULATIVE
    classic = scope.metrics.add(name="latency", unit="s")
    classic.histogram.aggregation_temporality = CUMULATIVE
    expo = scope.metrics.add(name="size", unit="By")
    expo.exponential_histogram.aggregation_temporality = CUMULATIVE
    for i in range(series):
        kind = i % 10
        if kind < 4:
            point = counter.sum.data_points.add(as_double=float(i))
        elif kind < 7 or not exponential:
            point = classic.histogram.data_points.add(count=66, sum=12.5, bucket_counts=list(range(12)),
                                                      explicit_bounds=[0.005 * 2**k for k in range(11)])
        else:
            point = expo.exponential_histogram.data_points.add(count=820, sum=1e4, scale=3)
            point.positive.offset = -10
            point.positive.bucket_counts.extend(range(1, 41))
        point.start_time_unix_nano, point.time_unix_nano = START, END
        attribute = point.attributes.add()
        attribute.key, attribute.value.string_value = "route", f"/route/{i}"
    return out


def registry_of(series: int, exponential: bool, store_class: type = AppMetrics) -> CollectorRegistry:
    store = store_class(AppMetricsSection(max_series=series + 10))
    store.apply(request(series, exponential))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(store)
    return registry


FORMATS: dict[str, Callable[[CollectorRegistry], bytes]] = {
    "text 0.0.4": generate_latest, "OpenMetrics": generate_openmetrics, "protobuf": protobuf_exposition.encode}


def _module(revision: str, path: str, name: str, replace: tuple[str, str] = ("", "")) -> ModuleType:
    source = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout.replace(*replace)
    file = Path(tempfile.mkdtemp(prefix="sidetrace-bench-")) / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so the baseline's app_metrics imports the baseline's encoder
    spec.loader.exec_module(module)
    return module


def baseline(revision: str) -> tuple[Callable[[CollectorRegistry], bytes], type]:
    """REV's protobuf encoder and AppMetrics class (its app_metrics reads REV's encoder's context variable)."""
    encoder = _module(revision, "sidetrace/agent/protobuf_exposition.py", "protobuf_exposition_baseline")
    store = _module(revision, "sidetrace/agent/app_metrics.py", "app_metrics_baseline",
                    ("from sidetrace.agent.protobuf_exposition import", "from protobuf_exposition_baseline import"))
    return encoder.encode, store.AppMetrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--renders", type=int, default=20)
    parser.add_argument("--series", type=int, default=1000)
    parser.add_argument("--baseline", help="a git revision whose protobuf exposition is timed too")
    parser.add_argument("--cpu", action="store_true", help="CPU time of this process rather than wall time")
    args = parser.parse_args()
    clock = time.process_time if args.cpu else time.perf_counter
    old = baseline(args.baseline) if args.baseline else None
    for store_name, exponential in (("ordinary", False), ("exponential", True)):
        registry = registry_of(args.series, exponential)
        contenders = {name: (render, registry) for name, render in FORMATS.items()}
        if old is not None:
            contenders[f"protobuf {args.baseline}"] = (old[0], registry_of(args.series, exponential, old[1]))
        times: dict[str, list[float]] = {name: [] for name in contenders}
        sizes = {name: len(render(of)) for name, (render, of) in contenders.items()}
        for round_number in range(args.rounds):
            order = list(contenders) if round_number % 2 == 0 else list(reversed(contenders))
            for name in order:
                render, of = contenders[name]
                started = clock()
                for _ in range(args.renders):
                    render(of)
                times[name].append((clock() - started) / args.renders * 1000)
        print(f"store {store_name!r}, {args.series} app series, {args.rounds} rounds of {args.renders} renders")
        for name in contenders:
            ratios = [mine / text for mine, text in zip(times[name], times["text 0.0.4"], strict=True)]
            print(f"  {name:12s} median {statistics.median(times[name]):7.2f} ms (min {min(times[name]):.2f}, "
                  f"max {max(times[name]):.2f}); x text: median {statistics.median(ratios):.2f} "
                  f"({min(ratios):.2f}-{max(ratios):.2f}); body {sizes[name]} bytes")
        if old is not None:
            ratios = [mine / theirs for mine, theirs in
                      zip(times["protobuf"], times[f"protobuf {args.baseline}"], strict=True)]
            print(f"  protobuf / protobuf {args.baseline}, same round: median {statistics.median(ratios):.2f} "
                  f"({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
