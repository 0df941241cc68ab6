"""The agent's HTTP endpoint: /metrics (text, OpenMetrics or protobuf), /healthz, /readyz and /debug/status."""

from __future__ import annotations

import asyncio
import hmac
import logging
import ssl
from typing import Any

from aiohttp import web
from prometheus_client import exposition

from sidetrace.agent import protobuf_exposition
from sidetrace.agent.components import Context
from sidetrace.config import ServerSection, parse_host_port

log = logging.getLogger("sidetrace.http")
MAX_DEBUG_FLOWS = 1000  # /debug/flows?top= beyond this gets this many (the answer says so: top_capped)


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
        app.router.add_get("/debug/traces", self._debug_traces)
        app.router.add_get("/debug/traces/{trace_id}", self._debug_trace)
        app.router.add_get("/debug/flows", self._debug_flows)
        self._app = app
        self._expected_auth = section.auth_token.encode() if section.auth_token else None

    async def start(self) -> None:
        self._state = "starting"
        host, port = parse_host_port(self.section.listen)
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await runner.setup()
        ssl_context = None
        if self.section.tls.cert_file:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(self.section.tls.cert_file, self.section.tls.key_file)
        try:
            await web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True).start()
        except OSError as exc:
            await runner.cleanup()
            self._state = "failed"
            self._last_error = f"cannot listen on {self.section.listen}: {exc.strerror or exc}"
            raise RuntimeError(f"server.listen: {self._last_error}") from None
        self._runner = runner
        self._state = "running"
        log.info("serving /metrics on %s://%s/metrics", "https" if ssl_context else "http", self.section.listen)

    async def stop(self) -> None:
        self._state = "stopping"
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._state = "stopped"

    def status(self) -> dict[str, Any]:
        return {"state": self._state, "detail": f"listening on {self.section.listen}", "last_error": self._last_error}

    async def _metrics(self, request: web.Request) -> web.Response:
        """The agent's metrics in the format the scraper asks for: the protobuf one (the only one with native
        histograms) when it comes first in ``Accept``, else prometheus_client's choice of text formats."""
        accept = request.headers.get("Accept", "")
        if protobuf_exposition.accepts_protobuf(accept):
            encoder, content_type = protobuf_exposition.encode, protobuf_exposition.CONTENT_TYPE
        else:
            encoder, content_type = exposition.choose_encoder(accept)
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
        reasons = self._context.not_ready()
        if not reasons:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {'; '.join(reasons)}\n")

    def _authorize(self, request: web.Request) -> None:
        if self._expected_auth is None:
            return
        # The scheme is case-insensitive (RFC 9110 section 11.1): "bearer" is "Bearer"; the token is compared in
        # constant time.
        scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
        given = token.strip().encode(errors="replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self._expected_auth):
            raise web.HTTPUnauthorized(text="missing or wrong bearer token ([server] auth_token)\n")

    async def _debug_status(self, request: web.Request) -> web.Response:
        self._authorize(request)
        return web.json_response(self._context.daemon_status())

    def _recent(self) -> Any:
        recent = self._context.links.recent.get()
        if recent is None:
            raise web.HTTPServiceUnavailable(text="the trace pipeline is not running\n")
        return recent

    async def _debug_traces(self, request: web.Request) -> web.Response:
        """Recent trace summaries, newest first: ?service=NAME&min_duration_ms=N&limit=N."""
        self._authorize(request)
        query = request.query
        try:
            min_duration = float(query.get("min_duration_ms", "0"))
            limit = int(query.get("limit", "20"))
        except ValueError:
            raise web.HTTPBadRequest(text="min_duration_ms must be a number and limit an integer\n") from None
        # Built from the encoded spans when asked: CPU-bound, so off the event loop.
        traces = await asyncio.to_thread(self._recent().list, query.get("service") or None, min_duration,
                                         max(1, min(limit, 1000)))
        return web.json_response({"traces": traces})

    async def _debug_flows(self, request: web.Request) -> web.Response:
        """The top sampled flows with estimates and error bounds: ?top=N (20; 1 to MAX_DEBUG_FLOWS, larger asks
        get MAX_DEBUG_FLOWS and say so in top_capped; 0, negative or not a number: 400)."""
        self._authorize(request)
        source = self._context.links.flows.get()
        if source is None:
            raise web.HTTPServiceUnavailable(text="the netsample source is not running ([sources.netsample] "
                                             "enabled = true)\n")
        try:
            asked = int(request.query.get("top", "20"))
        except ValueError:
            asked = 0
        if asked < 1:
            raise web.HTTPBadRequest(text=f"top must be an integer from 1 (at most {MAX_DEBUG_FLOWS} are "
                                     "returned)\n") from None
        top = min(asked, MAX_DEBUG_FLOWS)
        # "top": the number of flows asked for after the cap; "top_capped": the request asked for more.
        answer = {"top": top, "top_capped": asked > top, **(await asyncio.to_thread(source.debug, top))}
        return web.json_response(answer)

    async def _debug_trace(self, request: web.Request) -> web.Response:
        self._authorize(request)
        trace = await asyncio.to_thread(self._recent().get, request.match_info["trace_id"])
        if trace is None:
            raise web.HTTPNotFound(text=f"no recent trace {request.match_info['trace_id']}\n")
        return web.json_response(trace)
