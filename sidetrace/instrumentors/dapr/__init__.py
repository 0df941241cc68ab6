"""Dapr instrumentation: calls through the sidecar and the methods Dapr invokes, as Dapr-aware spans.

``DaprInstrumentor().instrument()`` traces, in the whole process, whichever of these are installed:

- the dapr SDK's gRPC clients (``dapr.clients.DaprClient``, ``DaprGrpcClient`` and the asyncio
  ``dapr.aio.clients.DaprClient``), hooked when a client is made: every unary call to the sidecar's
  gRPC API is a span named by its operation, with the context in the call metadata (``traceparent``;
  streaming calls carry it too, without a span);
- HTTP calls to the sidecar's API made with aiohttp, requests or httpx, which includes the SDK's
  service invocation over HTTP (its default): recognised by URL template on a sidecar address
  (loopback, ``DAPR_RUNTIME_HOST`` or ``DAPR_HTTP_ENDPOINT``) or by a ``dapr-app-id`` header. The
  HTTP client span of another instrumentation is renamed and enriched; without one, ours is the HTTP
  client span, and it injects the context;
- the methods Dapr invokes: dapr-ext-grpc's ``App`` (``OnInvoke``, ``OnTopicEvent``,
  ``OnBulkTopicEvent``, ``OnBindingEvent``) and HTTP routes in aiohttp.web, Starlette/FastAPI (so
  dapr-ext-fastapi's ``DaprApp``) and Flask apps, recognised by daprd's headers or the CloudEvent
  content type.

Span names: ``invoke {app_id}/{method}`` (CLIENT; SERVER in the callee, where the method is the
matched route template; on the calling side each method path segment holding a digit is ``{id}``,
``orders/42`` giving ``orders/{id}``, and ``dapr.method`` keeps the path), ``publish {pubsub}/{topic}``
(PRODUCER), ``process {pubsub}/{topic}`` (CONSUMER, parented by the ``traceparent`` header, else by
the CloudEvent's ``traceparent`` field), ``state.{operation} {store}``, ``binding {name}``,
``secret {store}``, ``configuration {store}``, ``lock {store}``/``unlock {store}``, ``dapr {Method}``
for other gRPC methods. A sidecar error sets ``error.type`` (and ``dapr.error_code``) to Dapr's code:
the HTTP body's ``errorCode`` (``ERR_STATE_STORE_NOT_FOUND``), or the gRPC ``ErrorInfo.reason``
(``DAPR_STATE_NOT_FOUND``), else the HTTP status or gRPC status code name.

Metric: ``dapr.client.operation.duration`` (s) by ``dapr.building_block``, ``dapr.operation``,
``dapr.component.name`` (at most 200 distinct, then ``_OTHER``), ``dapr.outcome`` and ``error.type``.

Any failure inside the instrumentation is logged once, counted in
``sidetrace.instrumentation.errors``, and the app's call goes on untouched.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Collection
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.instrumentation.utils import unwrap
from wrapt import wrap_function_wrapper

from sidetrace import __version__
from sidetrace.instrumentors._messaging import Guard
from sidetrace.instrumentors.dapr._telemetry import Telemetry

# (module that must be importable, module to patch, attribute path, wrapper factory path)
_PATCHES: tuple[tuple[str, str, str, str], ...] = (
    ("dapr", "dapr.clients.grpc.client", "DaprGrpcClient.__init__", "_grpc_client:sync_client_init"),
    ("dapr", "dapr.aio.clients.grpc.client", "DaprGrpcClientAsync.__init__", "_grpc_client:async_client_init"),
    ("requests", "requests.sessions", "Session.send", "_http_client:requests_send_wrapper"),
    ("httpx", "httpx", "Client.send", "_http_client:httpx_send_wrapper"),
    ("httpx", "httpx", "AsyncClient.send", "_http_client:httpx_async_send_wrapper"),
    ("aiohttp", "aiohttp.client", "ClientSession._request", "_http_client:aiohttp_request_wrapper"),
    ("dapr.ext.grpc", "dapr.ext.grpc._servicer", "_CallbackServicer.OnInvoke", "_server:on_invoke_wrapper"),
    ("dapr.ext.grpc", "dapr.ext.grpc._servicer", "_CallbackServicer.OnTopicEvent", "_server:on_topic_event_wrapper"),
    ("dapr.ext.grpc", "dapr.ext.grpc._servicer", "_CallbackServicer.OnBindingEvent",
     "_server:on_binding_event_wrapper"),
    ("dapr.ext.grpc", "dapr.ext.grpc._servicer", "_CallbackServicer.OnBulkTopicEvent",
     "_server:on_bulk_topic_event_wrapper"),
    ("dapr.ext.grpc", "dapr.ext.grpc._servicer", "_CallbackServicer.OnBulkTopicEventAlpha1",
     "_server:on_bulk_topic_event_wrapper"),
    ("aiohttp", "aiohttp.web_app", "Application.pre_freeze", "_server:aiohttp_pre_freeze_wrapper"),
    ("starlette", "starlette.routing", "Router.__call__", "_server:asgi_wrapper"),
    ("flask", "flask.app", "Flask.wsgi_app", "_server:wsgi_wrapper"),
    ("flask", "flask.app", "Flask.dispatch_request", "_server:flask_dispatch_wrapper"),
)
_APPLIED: list[tuple[str, str]] = []
log = logging.getLogger(__name__)


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _resolve(owner: Any, path: str) -> Any:
    for part in path.split("."):
        owner = getattr(owner, part)
    return owner


def _factory(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


class DaprInstrumentor(BaseInstrumentor):
    """Traces Dapr calls and Dapr-invoked handlers (see the module docstring).

    Needs none of the libraries it instruments: each hook is applied only if its library is
    installed, so an app that talks to the sidecar with plain ``requests`` gets spans too.
    Options to ``instrument()``: ``tracer_provider``, ``meter_provider``.
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        return ()

    def _instrument(self, **kwargs: Any) -> None:
        tracer = trace.get_tracer(__name__, __version__, tracer_provider=kwargs.get("tracer_provider"),
                                  schema_url="https://opentelemetry.io/schemas/1.27.0")
        meter = metrics.get_meter(__name__, __version__, meter_provider=kwargs.get("meter_provider"))
        guard = Guard("dapr", meter)
        telemetry = Telemetry(tracer, meter, guard)
        for needs, module, name, factory in _PATCHES:
            if not _available(needs):
                continue
            try:
                _resolve(importlib.import_module(module), name)
            except ImportError as exc:  # installed but unusable, e.g. dapr.ext.grpc without the dapr[grpc] extra
                log.debug("sidetrace dapr: not instrumenting %s.%s: %s", module, name, exc)
                continue
            except AttributeError:  # an SDK version without this method (older ones lack the stable OnBulkTopicEvent)
                log.debug("sidetrace dapr: %s has no %s; not instrumented", module, name)
                continue
            try:
                wrap_function_wrapper(module, name, _factory(factory)(telemetry))
            except Exception as exc:  # noqa: BLE001 - a library version without this hook: the rest still work
                guard.failed(f"instrument {module}.{name}", exc)
                continue
            _APPLIED.append((module, name))

    def _uninstrument(self, **kwargs: Any) -> None:
        while _APPLIED:
            module, name = _APPLIED.pop()
            owner_path, _, attribute = name.rpartition(".")
            unwrap(_resolve(importlib.import_module(module), owner_path), attribute)


__all__ = ["DaprInstrumentor"]
