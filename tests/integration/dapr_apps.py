"""The stand-in daprd process, and the apps Dapr invokes in the tests, each served from its own
thread so that blocking SDK calls in a test can reach them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import free_port, port_open, stop_process, wait_until

STANDIN = Path(__file__).with_name("daprd_standin.py")
ROOT = Path(__file__).resolve().parents[2]


class StandInDaprd:
    """The stand-in daprd (tests/integration/daprd_standin.py) in its own process, like daprd."""

    def __init__(self) -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        self.proc = subprocess.Popen([sys.executable, str(STANDIN), str(self.http_port), str(self.grpc_port)],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            stop_process(self.proc)
            raise AssertionError(f"stand-in daprd did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.url = f"http://127.0.0.1:{self.http_port}"

    def configure(self, apps: dict[str, tuple[str, int]], subscriptions: list[dict[str, Any]] | None = None,
                  app_id: str = "callerapp") -> None:
        body = json.dumps({"app_id": app_id, "subscriptions": subscriptions or [],
                           "apps": {k: {"protocol": p, "port": port} for k, (p, port) in apps.items()}}).encode()
        request = urllib.request.Request(f"{self.url}/_standin/config", data=body, method="POST",
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=5):
            pass

    def seen(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/_standin/seen", timeout=5) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        stop_process(self.proc)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class ThreadedAiohttp:
    """An aiohttp.web app on its own event loop thread."""

    def __init__(self, build: Callable[[], Any]) -> None:
        from aiohttp import web

        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def start() -> None:
            self.runner = web.AppRunner(build())
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
            started.set()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(start())
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True, name="aiohttp-app")
        self.thread.start()
        assert started.wait(10), "aiohttp app did not start"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class ThreadedUvicorn:
    """An ASGI app (FastAPI) under uvicorn in a thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="uvicorn-app")
        self.thread.start()
        wait_until(lambda: port_open(self.port), 10, "uvicorn app")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class ThreadedWsgi:
    """A WSGI app (Flask) under werkzeug's threaded server."""

    def __init__(self, app: Any) -> None:
        from werkzeug.serving import make_server

        self.port = free_port()
        self.server = make_server("127.0.0.1", self.port, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="wsgi-app")
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(10)


class GrpcApp:
    """A dapr-ext-grpc ``App`` (the gRPC AppCallback server daprd calls) on a free port."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.port = free_port()
        self.thread = threading.Thread(target=app.run, args=(self.port, "127.0.0.1"), daemon=True, name="grpc-app")
        self.thread.start()
        wait_until(lambda: port_open(self.port), 10, "dapr-ext-grpc app")

    def stop(self) -> None:
        self.app.stop()
        self.thread.join(10)
