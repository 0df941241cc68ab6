"""The methods Dapr invokes in the app: service invocation and pub/sub deliveries.

- dapr-ext-grpc's ``App``: ``OnInvoke`` (SERVER), ``OnTopicEvent``, ``OnBulkTopicEvent`` (one span
  per batch, linked to each message's producer) and ``OnBindingEvent`` (CONSUMER).
- HTTP apps (aiohttp.web, Starlette/FastAPI and so dapr-ext-fastapi's ``DaprApp``, Flask): a request
  daprd makes is recognised by its headers (``dapr-callee-app-id``/``dapr-caller-app-id`` on service
  invocation) or its content type (``application/cloudevents+json`` on a pub/sub delivery,
  ``application/cloudevents-batch+json`` on a bulk one, whose body is read, at most 64 KiB, to find
  the topic, pub/sub name and the CloudEvents' traceparents, then handed to the app unchanged). Every
  other request passes through after a header lookup.

If a web framework instrumentation already opened a SERVER span for the request (it is the current
span), an invocation renames and enriches that span instead of making a second one; a delivery's
CONSUMER span is its child (or, when daprd sent no trace headers, the CloudEvent's traceparent's).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.trace import Span, SpanKind

from sidetrace.instrumentors.dapr._operations import method_name
from sidetrace.instrumentors.dapr._telemetry import (
    CLOUDEVENT_TYPES,
    MAX_INSPECTED_BODY,
    Telemetry,
    cloudevent_from,
    extract_parent,
    headers_dict,
    mark_error,
    subscription_operation,
)

CALLBACK_SERVICE = "dapr.proto.runtime.v1.AppCallback"
_DAPR_HEADER_NAMES = (b"dapr-callee-app-id", b"dapr-caller-app-id")
_CE_PREFIX = b"application/cloudevents"  # 23 bytes
_AIOHTTP_SEEN = "sidetrace.dapr"
# name, kind, parent, attributes, links
Spec = tuple[str, SpanKind, otel_context.Context | None, dict[str, Any], list[trace.Link] | None]


@contextlib.contextmanager
def serve(telemetry: Telemetry, make: Any, *args: Any) -> Iterator[Span | None]:
    """Runs the app's handler inside the span ``make(*args)`` describes (None: no span). The
    handler's exception is recorded and re-raised; a failure of ours is logged and counted."""
    span = None
    try:
        spec: Spec | None = make(*args) if is_instrumentation_enabled() else None
        if spec is not None:
            name, kind, parent, attributes, links = spec
            current = trace.get_current_span()  # a web framework instrumentation's span for this request?
            if getattr(current, "kind", None) is SpanKind.SERVER and current.is_recording():
                if kind is SpanKind.SERVER:
                    current.update_name(name)  # an invocation: that span is the one; enrich it
                    current.set_attributes(attributes)
                    spec = None
                elif trace.get_current_span(parent).get_span_context().trace_id == \
                        current.get_span_context().trace_id:
                    parent = None  # a delivery with trace headers: processed under the request's span
            if spec is not None:
                span = telemetry.tracer.start_span(name, context=parent, kind=kind, attributes=attributes,
                                                   links=links)
    except Exception as exc:  # noqa: BLE001 - never break the app's handler
        telemetry.guard.failed("dapr server start", exc)
        span = None
    if span is None:
        yield None
        return
    # Not trace.use_span(end_on_exit=True): span.end() runs the SpanProcessors' on_end, which may
    # raise, and that must reach neither the app nor the app's own exception.
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield span
    except BaseException as exc:
        # aiohttp's and Starlette's HTTPException: _answered judged their status
        status = getattr(exc, "status", getattr(exc, "status_code", None))
        if not isinstance(status, int):
            guarded(telemetry, "dapr server error", mark_error, span, type(exc).__qualname__, str(exc), exc)
        raise
    finally:
        otel_context.detach(token)
        guarded(telemetry, "dapr server end", span.end)


def guarded(telemetry: Telemetry, where: str, action: Callable[..., None], *args: Any) -> None:
    """Runs one step of our span handling; a failure is the guard's to log and count, never the app's."""
    try:
        action(*args)
    except Exception as exc:  # noqa: BLE001 - never break the app's handler
        telemetry.guard.failed(where, exc)


def _invocation(headers: Mapping[str, Any], method: str, extra: dict[str, Any]) -> Spec:
    callee, caller = headers.get("dapr-callee-app-id"), headers.get("dapr-caller-app-id")
    attributes: dict[str, Any] = {"dapr.method": method, **extra}
    if callee:
        attributes["dapr.app_id"] = callee
    if caller:
        attributes["dapr.caller.app_id"] = caller
    # until (and unless) a route template names it: a path no route matched keeps no id either
    name = f"invoke {callee}/{method_name(method)}" if callee else f"invoke {method_name(method)}"
    return name, SpanKind.SERVER, extract_parent(headers), attributes, None


def _delivery(headers: Mapping[str, Any], cloudevent: Mapping[str, Any] | None, topic: str | None = None,
              pubsub: str | None = None) -> Spec:
    name, attributes = subscription_operation(cloudevent, topic, pubsub)
    return name, SpanKind.CONSUMER, extract_parent(headers, cloudevent), attributes, None


# dapr-ext-grpc ------------------------------------------------------------------------------------

def _metadata(context: Any) -> dict[str, Any]:
    return headers_dict(context.invocation_metadata() or ())


def on_invoke_wrapper(telemetry: Telemetry):  # noqa: ANN201
    def make(request: Any, context: Any) -> Spec:
        return _invocation(_metadata(context), request.method, {
            "rpc.system": "grpc", "rpc.service": CALLBACK_SERVICE, "rpc.method": "OnInvoke",
            "dapr.api": f"/{CALLBACK_SERVICE}/OnInvoke"})

    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        with serve(telemetry, make, *args[:2]):
            return wrapped(*args, **kwargs)

    return wrapper


def on_topic_event_wrapper(telemetry: Telemetry):  # noqa: ANN201
    def make(request: Any, context: Any) -> Spec:
        extensions = dict(request.extensions.items()) if request.HasField("extensions") else {}
        extensions.setdefault("id", request.id)
        name, kind, parent, attributes, _ = _delivery(_metadata(context), extensions, request.topic,
                                                      request.pubsub_name)
        attributes["dapr.api"] = f"/{CALLBACK_SERVICE}/OnTopicEvent"
        return name, kind, parent, attributes, None

    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        with serve(telemetry, make, *args[:2]) as span:
            response = wrapped(*args, **kwargs)
            guarded(telemetry, "dapr server answer", _topic_status, span, response)
            return response

    return wrapper


def _topic_status(span: Span | None, response: Any) -> None:
    status = getattr(response, "status", None)
    if span is None or not status:  # TopicEventResponse: 0 SUCCESS, 1 RETRY, 2 DROP
        return
    label = {1: "RETRY", 2: "DROP"}.get(status, str(status))
    span.set_attribute("dapr.pubsub.status", label)
    if label == "RETRY":
        mark_error(span, "RETRY", "the handler asked Dapr to redeliver")


def _entry_link(entry: Any) -> trace.Link | None:
    """A link to the producer of one bulk-delivered message: its CloudEvent's ``traceparent``
    extension, else its metadata's."""
    fields: dict[str, Any] = {}
    if entry.HasField("cloud_event") and entry.cloud_event.HasField("extensions"):
        fields = dict(entry.cloud_event.extensions.items())
    if not isinstance(fields.get("traceparent"), str):
        fields = dict(entry.metadata)
    context = trace.get_current_span(extract_parent({}, fields)).get_span_context()
    return trace.Link(context) if context.is_valid else None


def on_bulk_topic_event_wrapper(telemetry: Telemetry):  # noqa: ANN201
    """``OnBulkTopicEvent``/``OnBulkTopicEventAlpha1``: one ``process`` span for the batch, parented
    by the call's context and linked to each message's producer (the messaging conventions' batch
    shape); ``messaging.batch.message_count`` is the number of entries."""

    def make(request: Any, context: Any) -> Spec:
        name, attributes = subscription_operation(None, request.topic, request.pubsub_name)
        attributes["messaging.batch.message_count"] = len(request.entries)
        attributes["dapr.api"] = f"/{CALLBACK_SERVICE}/OnBulkTopicEvent"
        links = [link for link in map(_entry_link, request.entries) if link is not None]
        return name, SpanKind.CONSUMER, extract_parent(_metadata(context)), attributes, links

    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        with serve(telemetry, make, *args[:2]):
            return wrapped(*args, **kwargs)

    return wrapper


def on_binding_event_wrapper(telemetry: Telemetry):  # noqa: ANN201
    def make(request: Any, context: Any) -> Spec:
        return (f"binding {request.name}", SpanKind.CONSUMER, extract_parent(_metadata(context)), {
            "dapr.component.name": request.name, "dapr.component.type": "bindings",
            "dapr.api": f"/{CALLBACK_SERVICE}/OnBindingEvent"}, None)

    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        with serve(telemetry, make, *args[:2]):
            return wrapped(*args, **kwargs)

    return wrapper


# HTTP apps ----------------------------------------------------------------------------------------

def _media_type(content_type: str | None) -> str:
    return content_type.split(";", 1)[0].strip().lower() if content_type else ""


def _is_cloudevent(content_type: str | None) -> bool:
    """A pub/sub delivery: one CloudEvent, or a bulk subscription's batch of them."""
    return _media_type(content_type) in CLOUDEVENT_TYPES


def _batch(headers: Mapping[str, Any], batch: Mapping[str, Any] | None) -> Spec:
    """A bulk delivery (``application/cloudevents-batch+json``): one span for the batch, linked to
    each entry's producer (its event's ``traceparent``)."""
    batch = batch or {}
    entries = batch.get("entries") if isinstance(batch.get("entries"), list) else []
    name, kind, parent, attributes, _ = _delivery(headers, batch)
    attributes.pop("messaging.message.id", None)
    attributes["messaging.batch.message_count"] = len(entries)
    links = []
    for entry in entries:
        event = entry.get("event") if isinstance(entry, dict) else None
        context = trace.get_current_span(extract_parent({}, event if isinstance(event, dict) else None))
        if context.get_span_context().is_valid:
            links.append(trace.Link(context.get_span_context()))
    return name, kind, parent, attributes, links


def _http_spec(headers: Mapping[str, Any], verb: str, path: str, body: bytes | None) -> Spec | None:
    media_type = _media_type(headers.get("content-type"))
    if media_type == CLOUDEVENT_TYPES[1]:
        spec = _batch(headers, cloudevent_from(body))
    elif media_type == CLOUDEVENT_TYPES[0]:
        spec = _delivery(headers, cloudevent_from(body))
    elif "dapr-callee-app-id" in headers or "dapr-caller-app-id" in headers:
        spec = _invocation(headers, path.lstrip("/"), {"http.request.method": verb, "url.path": path})
    else:
        return None
    return spec


def _answered(span: Span | None, status: int | None) -> None:
    if span is None or status is None:
        return
    span.set_attribute("http.response.status_code", status)
    # a non-2xx answer to a delivery makes daprd redeliver (or drop on 404): the processing failed
    if status >= 500 or (status >= 400 and getattr(span, "kind", None) is SpanKind.CONSUMER):
        mark_error(span, str(status))


def _routed(span: Span | None, template: str | None) -> None:
    """Names an invocation SERVER span by the route template that matched (``/orders/{id}``), not by
    the path daprd called (``orders/42``), so that span names stay few."""
    if span is None or not template or getattr(span, "kind", None) is not SpanKind.SERVER or not span.is_recording():
        return
    callee = (getattr(span, "attributes", None) or {}).get("dapr.app_id")
    method = template.lstrip("/")
    span.update_name(f"invoke {callee}/{method}" if callee else f"invoke {method}")
    span.set_attribute("http.route", template)


def _maybe_dapr(get: Any) -> bool:
    return bool(get("dapr-callee-app-id") or get("dapr-caller-app-id") or _is_cloudevent(get("content-type")))


def asgi_wrapper(telemetry: Telemetry):  # noqa: ANN201
    """Wraps ``starlette.routing.Router.__call__`` (FastAPI, dapr-ext-fastapi's DaprApp): inside the app's
    middleware, so that a web framework instrumentation's SERVER span (contrib's FastAPI and Starlette ones are
    ASGI middleware) is current when ours looks."""

    async def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        scope, receive, send = args[:3] if len(args) >= 3 else (None, None, None)
        if scope is None or scope.get("type") != "http" or scope.get("sidetrace.dapr"):
            return await wrapped(*args, **kwargs)
        try:  # ASGI header names are lower-case bytes: look without decoding every request's headers
            dapr = any(key in _DAPR_HEADER_NAMES or (key == b"content-type" and value[:23].lower() == _CE_PREFIX)
                       for key, value in scope.get("headers") or ())
            headers = headers_dict(scope.get("headers") or ()) if dapr else {}
        except Exception as exc:  # noqa: BLE001
            telemetry.guard.failed("dapr asgi", exc)
            dapr = False
        if not dapr:
            return await wrapped(*args, **kwargs)
        scope["sidetrace.dapr"] = True  # mounted sub-apps see it and pass through
        buffered: list[dict] = []
        body = None
        if _is_cloudevent(headers.get("content-type")):
            size, more = 0, True
            while more and size <= MAX_INSPECTED_BODY:
                message = await receive()
                buffered.append(message)
                if message.get("type") != "http.request":
                    break
                size += len(message.get("body", b""))
                more = message.get("more_body", False)
            if not more and size <= MAX_INSPECTED_BODY:
                body = b"".join(m.get("body", b"") for m in buffered if m.get("type") == "http.request")

        async def replay() -> dict:
            return buffered.pop(0) if buffered else await receive()

        status: list[int] = []

        async def send_status(message: dict) -> None:
            if message.get("type") == "http.response.start":
                status.append(message.get("status", 0))
            await send(message)

        with serve(telemetry, _http_spec, headers, scope.get("method", "GET"), scope.get("path", "/"), body) as span:
            try:
                result = await wrapped(scope, replay, send_status)
            except Exception as exc:
                # Starlette's HTTPException, answered by the app's exception middleware outside the router
                guarded(telemetry, "dapr server answer", _answered, span, getattr(exc, "status_code", None))
                raise
            guarded(telemetry, "dapr server answer", _answered, span, status[0] if status else None)
            # Starlette keeps the matched route in the scope
            guarded(telemetry, "dapr server route", _routed, span, getattr(scope.get("route"), "path", None))
            return result

    return wrapper


def wsgi_wrapper(telemetry: Telemetry):  # noqa: ANN201
    """Wraps ``Flask.wsgi_app``."""

    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        environ, start_response = args[:2]
        get = lambda key: environ.get("CONTENT_TYPE") if key == "content-type" else environ.get(  # noqa: E731
            "HTTP_" + key.upper().replace("-", "_"))
        if not _maybe_dapr(get):
            return wrapped(*args, **kwargs)
        headers = {"content-type": environ.get("CONTENT_TYPE", "")}
        headers.update((k[5:].lower().replace("_", "-"), v) for k, v in environ.items() if k.startswith("HTTP_"))
        body = None
        if _is_cloudevent(headers.get("content-type")):
            try:
                length = int(environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                length = 0
            if 0 < length <= MAX_INSPECTED_BODY:
                body = environ["wsgi.input"].read(length)
                environ["wsgi.input"] = io.BytesIO(body)
        status: list[int] = []

        def start(status_line: str, *rest: Any) -> Any:
            with contextlib.suppress(ValueError):
                status.append(int(status_line.split(" ", 1)[0]))
            return start_response(status_line, *rest)

        with serve(telemetry, _http_spec, headers, environ.get("REQUEST_METHOD", "GET"),
                   environ.get("PATH_INFO", "/"), body) as span:
            result = wrapped(environ, start)
            guarded(telemetry, "dapr server answer", _answered, span, status[0] if status else None)
            return result

    return wrapper


def flask_dispatch_wrapper(telemetry: Telemetry):  # noqa: ANN201
    """Wraps ``Flask.dispatch_request``: the matched rule is known only inside the request, so the
    invocation span (current here) is named by it from here."""

    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        try:
            span = trace.get_current_span()
            if "dapr.method" in (getattr(span, "attributes", None) or {}):  # ours, or one we enriched
                from flask import request

                _routed(span, getattr(request.url_rule, "rule", None))
        except Exception as exc:  # noqa: BLE001
            telemetry.guard.failed("dapr flask route", exc)
        return wrapped(*args, **kwargs)

    return wrapper


def aiohttp_pre_freeze_wrapper(telemetry: Telemetry):  # noqa: ANN201
    """Wraps ``aiohttp.web.Application.pre_freeze`` (run once, as the app starts) to add a middleware of ours
    last, so innermost: inside a web framework instrumentation's middleware (contrib's aiohttp-server), so that
    its SERVER span is current when ours looks, whichever was instrumented first."""
    from aiohttp import web

    @web.middleware
    async def dapr_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if _AIOHTTP_SEEN in request or not _maybe_dapr(request.headers.get):
            return await handler(request)
        request[_AIOHTTP_SEEN] = True  # a sub-app's middleware passes it through
        headers = headers_dict(request.headers.items())
        body = None
        length = request.content_length
        if _is_cloudevent(headers.get("content-type")) and length is not None and length <= MAX_INSPECTED_BODY:
            body = await request.read()  # aiohttp keeps it: the handler reads the same bytes
        with serve(telemetry, _http_spec, headers, request.method, request.path, body) as span:
            try:
                response = await handler(request)
            except Exception as exc:
                # web.HTTPException subclasses carry the status they answer with
                guarded(telemetry, "dapr server answer", _answered, span, getattr(exc, "status", None))
                raise
            guarded(telemetry, "dapr server answer", _answered, span, response.status)
            resource = getattr(getattr(request.match_info, "route", None), "resource", None)
            guarded(telemetry, "dapr server route", _routed, span, getattr(resource, "canonical", None))
            return response

    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        try:
            if not instance.pre_frozen and dapr_middleware not in instance.middlewares:
                instance.middlewares.append(dapr_middleware)
        except Exception as exc:  # noqa: BLE001 - the app starts untraced rather than not at all
            telemetry.guard.failed("dapr aiohttp middleware", exc)
        return wrapped(*args, **kwargs)

    return wrapper
