"""The agent's HTTP endpoint: /metrics, /healthz, /readyz and /debug/status."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from prometheus_client import exposition

from sidetrace.agent.components import Context
from sidetrace.config import ServerSection, parse_host_port

log = logging.getLogger("sidetrace.http")


class HttpServer:
    """Serves the metric store and the daemon's health on ``[server] listen``."""

    def __init__(self, section: ServerSection, context: Context) -> None:
        self.section = section
        self._context = context
        self._runner: web.AppRunner | None = None
        self._state = "created"
        self._last_error: str | None = None
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/debug/status", self._debug_status)
        self._app = app

    async def start(self) -> None:
        self._state = "starting"
        host, port = parse_host_port(self.section.listen)
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError as exc:
            await runner.cleanup()
            self._state = "failed"
            self._last_error = f"cannot listen on {self.section.listen}: {exc.strerror or exc}"
            raise RuntimeError(f"server.listen: {self._last_error}") from None
        self._runner = runner
        self._state = "running"
        log.info("serving /metrics on http://%s/metrics", self.section.listen)

    async def stop(self) -> None:
        self._state = "stopping"
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._state = "stopped"

    def status(self) -> dict[str, Any]:
        return {"state": self._state, "detail": f"listening on {self.section.listen}", "last_error": self._last_error}

    async def _metrics(self, request: web.Request) -> web.Response:
        encoder, content_type = exposition.choose_encoder(request.headers.get("Accept", ""))
        # Collectors only read snapshots, but rendering a large store takes milliseconds of CPU:
        # keep it off the event loop so receivers stay responsive during a scrape.
        body = await asyncio.to_thread(encoder, self._context.registry)
        response = web.Response(body=body, headers={"Content-Type": content_type})
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            response.enable_compression(web.ContentCoding.gzip)
        return response

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self._context.ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def _debug_status(self, request: web.Request) -> web.Response:
        return web.json_response(self._context.daemon_status())
