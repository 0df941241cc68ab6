"""HTTP calls to the sidecar's API made with requests, httpx or aiohttp (and so the dapr SDK's HTTP
service invocation, which uses aiohttp).

A request to a sidecar address (see ``sidecar_address``) whose path is a Dapr API route becomes one
span named as the Dapr operation:

- if another instrumentation already opened the HTTP client span for this very request (it is the
  current span and carries the same URL), that span is renamed and given the Dapr attributes;
- otherwise we open the span ourselves, with the HTTP client attributes, inject the context into the
  request headers, and suppress HTTP instrumentation below us so no second span appears.

Other requests pass through after one string test.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.utils import (
    is_http_instrumentation_enabled,
    is_instrumentation_enabled,
    suppress_http_instrumentation,
)
from opentelemetry.trace import Span, SpanKind

from sidetrace.instrumentors.dapr._operations import Operation, http_operation, sidecar_address
from sidetrace.instrumentors.dapr._telemetry import (
    MAX_INSPECTED_BODY,
    Telemetry,
    http_error_code,
    inject,
    mark_error,
)


def _same_request(span: Span, url: str) -> bool:
    if getattr(span, "kind", None) is not SpanKind.CLIENT or not span.is_recording():
        return False
    attributes = getattr(span, "attributes", None) or {}
    recorded = attributes.get("url.full") or attributes.get("http.url")
    return isinstance(recorded, str) and recorded.split("?", 1)[0] == url.split("?", 1)[0]


def _app_id(headers: Any) -> str | None:
    """The ``dapr-app-id`` header of a request, whatever the case of its name."""
    if not headers:
        return None
    value = headers.get("dapr-app-id")
    if value is None and isinstance(headers, dict):  # a plain dict is case-sensitive
        value = next((v for k, v in headers.items() if isinstance(k, str) and k.lower() == "dapr-app-id"), None)
    return value


class Call:
    """One traced request to the sidecar: our own span, or the HTTP instrumentation's that we enrich."""

    __slots__ = ("telemetry", "op", "span", "own", "started")

    def __init__(self, telemetry: Telemetry, op: Operation, span: Span, own: bool) -> None:
        self.telemetry, self.op, self.span, self.own = telemetry, op, span, own
        self.started = time.perf_counter()

    @classmethod
    def begin(cls, telemetry: Telemetry, verb: str, url: str, headers: Any) -> Call | None:
        try:
            app_id = _app_id(headers)
            if "/v1" not in url and not app_id:
                return None
            if not is_instrumentation_enabled():
                return None
            server = sidecar_address(url)
            if server is None:
                return None
            path = url.split("://", 1)[-1]
            path = "/" + path.split("/", 1)[1] if "/" in path else "/"
            op = http_operation(verb, path.split("?", 1)[0], {"dapr-app-id": app_id} if app_id else None)
            if op is None:
                return None
            current = trace.get_current_span()
            if _same_request(current, url):
                current.update_name(op.name)
                current.set_attributes(op.call_attributes())
                return cls(telemetry, op, current, own=False)
            if not is_http_instrumentation_enabled():
                return None
            span = telemetry.start_client(op, server, extra={"http.request.method": verb.upper(), "url.full": url})
            return cls(telemetry, op, span, own=True)
        except Exception as exc:  # noqa: BLE001 - never break the app's call
            telemetry.guard.failed("dapr http client start", exc)
            return None

    @contextlib.contextmanager
    def active(self, headers: Any):  # noqa: ANN201
        """While the request runs: our span is current, its context is in ``headers`` (a mutable
        mapping) and HTTP instrumentation below is suppressed; an enriched span needs none of that.
        A request that raises is recorded as failed, and the exception goes on to the app."""
        with contextlib.ExitStack() as stack:
            if self.own:
                stack.enter_context(trace.use_span(self.span, end_on_exit=False))
                stack.enter_context(suppress_http_instrumentation())
                try:
                    for key, value in inject({}, self.span).items():
                        headers[key] = value
                except Exception as exc:  # noqa: BLE001
                    self.telemetry.guard.failed("dapr http inject", exc)
            try:
                yield
            except BaseException as exc:
                self.failed(exc)
                raise

    def failed(self, exc: BaseException) -> None:
        try:
            if self.own:
                self.telemetry.finish_client(self.span, self.op, self.started, type(exc).__qualname__, str(exc), exc)
            else:
                self.telemetry.record(self.op, time.perf_counter() - self.started, type(exc).__qualname__)
        except Exception as inner:  # noqa: BLE001
            self.telemetry.guard.failed("dapr http client finish", inner)

    def answered(self, status: int, body: bytes | None) -> None:
        try:
            error_type = message = None
            if status >= 400:
                code, message = http_error_code(body)
                error_type = code or str(status)
            if self.own:
                self.span.set_attribute("http.response.status_code", status)
                self.telemetry.finish_client(self.span, self.op, self.started, error_type, message)
            else:
                # The owner ends its span and may set error.type to the status after we return;
                # dapr.error_code keeps Dapr's code either way.
                if error_type is not None:
                    mark_error(self.span, error_type, message)
                self.telemetry.record(self.op, time.perf_counter() - self.started, error_type)
        except Exception as exc:  # noqa: BLE001
            self.telemetry.guard.failed("dapr http client finish", exc)


# requests -----------------------------------------------------------------------------------------

def requests_send_wrapper(telemetry: Telemetry):  # noqa: ANN201
    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        request = args[0] if args else kwargs.get("request")
        call = Call.begin(telemetry, request.method or "GET", request.url or "", request.headers) \
            if request is not None else None
        if call is None:
            return wrapped(*args, **kwargs)
        with call.active(request.headers):
            response = wrapped(*args, **kwargs)
        body = response._content if response.status_code >= 400 and not kwargs.get("stream") else None
        call.answered(response.status_code, body if isinstance(body, bytes) else None)
        return response

    return wrapper


# httpx --------------------------------------------------------------------------------------------

def _httpx_body(response: Any, stream: bool) -> bytes | None:
    if stream or response.status_code < 400:
        return None
    try:
        return response.content  # read already (send without stream=True reads the body)
    except Exception:  # noqa: BLE001 - httpx.ResponseNotRead
        return None


def httpx_send_wrapper(telemetry: Telemetry):  # noqa: ANN201
    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        request = args[0] if args else kwargs.get("request")
        call = Call.begin(telemetry, request.method, str(request.url), request.headers) if request is not None else None
        if call is None:
            return wrapped(*args, **kwargs)
        with call.active(request.headers):
            response = wrapped(*args, **kwargs)
        call.answered(response.status_code, _httpx_body(response, kwargs.get("stream", False)))
        return response

    return wrapper


def httpx_async_send_wrapper(telemetry: Telemetry):  # noqa: ANN201
    async def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        request = args[0] if args else kwargs.get("request")
        call = Call.begin(telemetry, request.method, str(request.url), request.headers) if request is not None else None
        if call is None:
            return await wrapped(*args, **kwargs)
        with call.active(request.headers):
            response = await wrapped(*args, **kwargs)
        call.answered(response.status_code, _httpx_body(response, kwargs.get("stream", False)))
        return response

    return wrapper


# aiohttp ------------------------------------------------------------------------------------------

def aiohttp_request_wrapper(telemetry: Telemetry):  # noqa: ANN201
    async def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        if len(args) < 2:
            return await wrapped(*args, **kwargs)
        method, target = args[0], args[1]
        try:
            if isinstance(target, str) and getattr(instance, "_base_url", None) is None:
                url = target
            else:
                url = str(instance._build_url(target)) if hasattr(instance, "_build_url") else str(target)
        except Exception:  # noqa: BLE001 - aiohttp reports a bad URL itself
            url = str(target)
        call = Call.begin(telemetry, method, url, kwargs.get("headers"))
        if call is None:
            return await wrapped(*args, **kwargs)
        headers: Any = None
        if call.own:
            from multidict import CIMultiDict

            headers = CIMultiDict(kwargs.get("headers") or {})
            kwargs = {**kwargs, "headers": headers}
        with call.active(headers):
            response = await wrapped(*args, **kwargs)
        body = None
        length = response.content_length
        if response.status >= 400 and length is not None and length <= MAX_INSPECTED_BODY:
            try:
                body = await response.read()  # cached by aiohttp: the app reads the same bytes again
            except Exception:  # noqa: BLE001
                body = None
        call.answered(response.status, body)
        return response

    return wrapper
