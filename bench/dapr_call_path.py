"""CPU per call of the instrumentation alone on the dapr SDK's synchronous gRPC path, without the
network: the noise of a loopback round trip (tens of microseconds between runs on this machine)
hides differences of a few microseconds that this isolates.

A fake gRPC channel answers every unary call at once; on it, one ``SaveState`` call goes through
(bare) nothing, (sidetrace) sidetrace's traced stub method as DaprInstrumentor installs it, with and
without its duration histogram, or (peer) the contrib gRPC client interceptor as
GrpcInstrumentorClient installs it (``grpcext.intercept_channel``). Each condition runs in a fresh
process of .benchdapr with the OpenTelemetry SDK, a batch processor discarding spans and a metric
reader. Reported: best of 5 repeats of 20,000 calls, microseconds per call.

Usage: python bench/dapr_call_path.py [--python .benchdapr/bin/python]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import timeit
from pathlib import Path
from typing import Any

CONDITIONS = ("bare", "sidetrace", "sidetrace_nometrics", "peer")
CALLS = 20_000


def measure(condition: str) -> float:
    import grpc
    from dapr.proto import api_v1

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import dapr_worker

    dapr_worker.instrument(condition)

    class Done(grpc.Call, grpc.Future):  # an RPC that has already succeeded
        def result(self, timeout: Any = None) -> bytes:
            return b""

        def exception(self, timeout: Any = None) -> None:
            return None

        def traceback(self, timeout: Any = None) -> None:
            return None

        def add_done_callback(self, fn: Any) -> None:
            fn(self)

        def cancel(self) -> bool:
            return False

        cancelled = running = is_active = add_callback = cancel
        done = lambda self: True  # noqa: E731

        def time_remaining(self) -> None:
            return None

        def initial_metadata(self) -> tuple:
            return ()

        trailing_metadata = initial_metadata

        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.OK

        def details(self) -> str:
            return ""

    class Callable(grpc.UnaryUnaryMultiCallable):
        def __call__(self, request: Any, *args: Any, **kwargs: Any) -> bytes:
            return b""

        def with_call(self, request: Any, *args: Any, **kwargs: Any) -> tuple[bytes, Done]:
            return b"", Done()

        def future(self, request: Any, *args: Any, **kwargs: Any) -> Done:
            return Done()

    class Channel(grpc.Channel):
        def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Callable:
            return Callable()

        unary_stream = stream_unary = stream_stream = unary_unary

        def subscribe(self, *args: Any, **kwargs: Any) -> None:
            pass

        unsubscribe = close = subscribe

    method = "/dapr.proto.runtime.v1.Dapr/SaveState"
    if condition.startswith("sidetrace"):
        from opentelemetry import metrics, trace

        from sidetrace.instrumentors._messaging import Guard
        from sidetrace.instrumentors.dapr._grpc_client import StreamInterceptor, TracedUnaryUnary
        from sidetrace.instrumentors.dapr._telemetry import Telemetry

        meter = metrics.NoOpMeterProvider().get_meter("x") if condition == "sidetrace_nometrics" \
            else metrics.get_meter("sidetrace")
        tracing = StreamInterceptor(Telemetry(trace.get_tracer("sidetrace"), meter, Guard("dapr")))
        tracing.server = ("127.0.0.1", 50001)
        call = TracedUnaryUnary(Callable(), method, tracing)
    elif condition == "peer":
        from opentelemetry.instrumentation.grpc import client_interceptor
        from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

        call = intercept_channel(Channel(), client_interceptor()).unary_unary(method)
    else:
        call = Channel().unary_unary(method)
    request = api_v1.SaveStateRequest(store_name="statestore")
    metadata = (("dapr-api-token", "x"),)
    return min(timeit.repeat(lambda: call.with_call(request, metadata=metadata), number=CALLS, repeat=5)) / CALLS * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--python", default=str(Path(__file__).resolve().parents[1] / ".benchdapr/bin/python"))
    parser.add_argument("--condition", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.condition:
        print(json.dumps({"us": measure(args.condition)}))
        return
    result = {}
    for condition in CONDITIONS:
        done = subprocess.run([args.python, __file__, "--condition", condition], capture_output=True, text=True,
                              timeout=600, check=True)
        result[condition] = json.loads(done.stdout.strip().splitlines()[-1])["us"]
    print("SaveState through the instrumentation on a fake channel, CPU microseconds per call (best of 5 x 20,000)")
    for condition in CONDITIONS:
        added = result[condition] - result["bare"]
        print(f"{condition:20} {result[condition]:7.1f}   added {added:6.1f}")
    ours, peer = result["sidetrace"] - result["bare"], result["peer"] - result["bare"]
    print(f"ratio of added (sidetrace / peer): {ours / peer:.2f}; without sidetrace's histogram: "
          f"{(result['sidetrace_nometrics'] - result['bare']) / peer:.2f}")


if __name__ == "__main__":
    main()
