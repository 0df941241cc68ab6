"""Apps written the way people write them, with no tracing code: `sidetrace instrument` must trace them.

Run as ``python zero_code.py KIND``; each serves itself on a free loopback port from a thread, calls itself
once with an ordinary HTTP or gRPC client, and exits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
import threading
import time


def flask_app() -> None:
    import requests
    from flask import Flask
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # its access log would muddle the app's stderr
    app = Flask(__name__)

    @app.route("/hello/<name>")
    def hello(name: str) -> str:
        return f"hello {name}"

    server = make_server("127.0.0.1", 0, app)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    assert requests.get(f"http://127.0.0.1:{server.server_port}/hello/ada", timeout=5).text == "hello ada"
    server.shutdown()


def fastapi_app() -> None:
    import httpx
    import uvicorn
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not (server.started and server.servers) and time.monotonic() < deadline:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    assert httpx.get(f"http://127.0.0.1:{port}/items/7", timeout=5).json() == {"item_id": 7}
    server.should_exit = True
    thread.join(10)


def grpc_app() -> None:
    import grpc

    def say_hello(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"hello " + request

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "demo.Greeter", {"SayHello": grpc.unary_unary_rpc_method_handler(say_hello)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert channel.unary_unary("/demo.Greeter/SayHello")(b"ada", timeout=5) == b"hello ada"
    server.stop(grace=5).wait(10)


def threads_app() -> None:
    from opentelemetry import trace

    # The app's own spans stand for work done in each thread; nothing here carries the context by hand.
    tracer = trace.get_tracer("zero_code")

    def work(where: str) -> None:
        with tracer.start_as_current_span(f"work in {where}"):
            pass

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, work, "run_in_executor")
        await asyncio.to_thread(work, "to_thread")

    class Worker(threading.Thread):
        def run(self) -> None:
            work("Thread subclass")

    with tracer.start_as_current_span("caller"):
        thread = threading.Thread(target=work, args=("Thread",))
        thread.start()
        thread.join()
        subclassed = Worker()
        subclassed.start()
        subclassed.join()
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(work, "ThreadPoolExecutor").result()
        asyncio.run(main())


def _child_work(name: str) -> str:
    from opentelemetry import trace

    with trace.get_tracer("zero_code").start_as_current_span(f"work in {name}"):
        return name


def processes_app() -> None:
    """Work in child processes as people write it: a Process with each start method, and a process pool."""
    import multiprocessing

    for method in ("fork", "spawn", "forkserver"):
        child = multiprocessing.get_context(method).Process(target=_child_work, args=(f"{method} Process",))
        child.start()
        child.join(30)
        assert child.exitcode == 0
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert list(pool.map(_child_work, ["ProcessPoolExecutor 1", "ProcessPoolExecutor 2"])) == \
            ["ProcessPoolExecutor 1", "ProcessPoolExecutor 2"]


def pool_app() -> None:
    """A multiprocessing Pool of each start method used as people use it, in a ``with`` block, which ends the
    pool with terminate(): its workers are killed the moment the block ends. Prints how long each block's end
    took."""
    import multiprocessing

    for method in ("fork", "spawn", "forkserver"):
        with multiprocessing.get_context(method).Pool(2) as pool:
            names = [f"{method} Pool {number}" for number in (1, 2, 3, 4)]
            assert pool.map(_child_work, names, chunksize=1) == names
            ending = time.monotonic()
        print(method, time.monotonic() - ending, flush=True)


def _sigterm_handler_name(_: object) -> str:
    import signal

    handler = signal.getsignal(signal.SIGTERM)
    return getattr(handler, "__name__", repr(handler))


def pool_own_handler_app() -> None:
    """An app with its own SIGTERM handler, which its fork Pool's workers inherit; prints the name of the handler
    a worker has."""
    import multiprocessing
    import signal

    def apps_own_handler(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, apps_own_handler)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        print(pool.apply(_sigterm_handler_name, (None,)), flush=True)


def _timed_child_work(name: str) -> None:
    _child_work(name)
    print("done", name, time.time(), flush=True)


def child_exit_app(*methods: str) -> None:
    """A child Process of each start method (or of those named); prints when each child's work ended and when the
    parent saw it exit, so the time a child spends sending its spans on the way out can be read."""
    import multiprocessing

    for method in methods or ("fork", "spawn", "forkserver"):
        child = multiprocessing.get_context(method).Process(target=_timed_child_work, args=(method,))
        child.start()
        child.join(60)
        print("exited", method, time.time(), flush=True)
        assert child.exitcode == 0


def _mark_exit_flushed() -> None:
    """Print ``flushed TIME`` when the tracer provider's exit shutdown is over: a span processor added after the
    launcher's export processor is shut down after it, so its shutdown marks the end of the final export (the
    SDK's exit handlers run the MeterProvider's shutdown before the TracerProvider's, which is registered first)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import SpanProcessor

    class ExitMarker(SpanProcessor):
        def shutdown(self) -> None:
            print("flushed", time.time(), flush=True)

    add_span_processor = getattr(trace.get_tracer_provider(), "add_span_processor", None)
    if add_span_processor is not None:  # run without the launcher, the app has no SDK provider to mark
        add_span_processor(ExitMarker())


def timed_app() -> None:
    """Forty requests' worth of waiting, each in a span and counted in a metric (as web frameworks' own
    instrumentations do); prints how long they took and when its last line ran, then, at exit, when the SDK's
    final export was over."""
    from opentelemetry import metrics, trace

    tracer = trace.get_tracer("zero_code")
    requests = metrics.get_meter("zero_code").create_counter("requests")
    start = time.perf_counter()
    for _ in range(40):
        with tracer.start_as_current_span("request"):
            requests.add(1)
            time.sleep(0.025)
    _mark_exit_flushed()
    print(time.perf_counter() - start, time.time(), flush=True)


def last_spans_app() -> None:
    """Five requests' spans and metric points left for the exit to send (the test sets a long batch delay); prints
    when its last line ran, and at exit when the SDK's final export was over."""
    from opentelemetry import metrics, trace

    tracer = trace.get_tracer("zero_code")
    requests = metrics.get_meter("zero_code").create_counter("requests")
    for number in range(5):
        with tracer.start_as_current_span(f"request {number}"):
            requests.add(1)
    _mark_exit_flushed()
    print("last", time.time(), flush=True)


def dropping_app() -> None:
    """Five spans toward an agent that is down; prints what the launcher says it dropped."""
    from opentelemetry import trace

    from sidetrace.instrumentors.bootstrap import dropped_spans

    tracer = trace.get_tracer("zero_code")
    for _ in range(5):
        with tracer.start_as_current_span("request"):
            pass
    trace.get_tracer_provider().force_flush()
    print(dropped_spans(), flush=True)


if __name__ == "__main__":
    {"flask": flask_app, "fastapi": fastapi_app, "grpc": grpc_app, "threads": threads_app,
     "timed": timed_app, "last_spans": last_spans_app, "dropping": dropping_app, "processes": processes_app,
     "pool": pool_app, "pool_own_handler": pool_own_handler_app,
     "child_exit": child_exit_app}[sys.argv[1]](*sys.argv[2:])
