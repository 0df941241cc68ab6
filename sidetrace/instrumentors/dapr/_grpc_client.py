"""The dapr SDK's gRPC clients (``DaprClient``/``DaprGrpcClient`` and the asyncio ``DaprClient``):
each unary call is a Dapr span and carries the context in the call metadata; streaming calls carry
the context only. The synchronous client's unary methods are wrapped on its stub; the asyncio
client, whose channel takes interceptors only when it is made, gets client interceptors."""

from __future__ import annotations

import inspect
import time
from collections import namedtuple
from typing import Any

import grpc
import grpc.aio
from opentelemetry.instrumentation.utils import is_instrumentation_enabled

from sidetrace.instrumentors._messaging import TRACE_HEADERS
from sidetrace.instrumentors.dapr._operations import GRPC_PREFIX, grpc_operation
from sidetrace.instrumentors.dapr._telemetry import Telemetry, grpc_error_type, inject

INTERCEPTOR_MARK = "_sidetrace_dapr"


class _CallDetails(namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                               "compression")), grpc.ClientCallDetails):
    pass


def _with_context(metadata: Any, span: Any = None) -> list[tuple[str, str]]:
    """The call's metadata with the trace context of ``span`` (default: the current one) in place of
    any the caller set."""
    pairs = [(k, v) for k, v in (metadata or ()) if k.lower() not in TRACE_HEADERS]
    pairs.extend(inject({}, span).items())
    return pairs


def _method(details: Any) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else method


class _Base:
    def __init__(self, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        self.server: tuple[str, int] | None = None

    def _start(self, details: Any, request: Any) -> tuple[Any, Any, list[tuple[str, str]] | None]:
        return self._start_call(_method(details), details.metadata, request)

    def _start_call(self, method: str, metadata: Any, request: Any) -> tuple[Any, Any, list[tuple[str, str]] | None]:
        """(span, operation, metadata with context) for a unary call; (None, None, None) if not traced."""
        if not is_instrumentation_enabled():
            return None, None, None
        span = None
        try:
            op = grpc_operation(method, request)
            if op is None:
                return None, None, None
            span = self.telemetry.start_client(op, self.server, grpc=True)
            return span, op, _with_context(metadata, span)
        except Exception as exc:  # noqa: BLE001 - never break the app's call
            self.telemetry.guard.failed("dapr grpc client start", exc)
            if span is not None:
                try:
                    span.end()
                except Exception as end_exc:  # noqa: BLE001 - a SpanProcessor's on_end raised
                    self.telemetry.guard.failed("dapr grpc client finish", end_exc)
            return None, None, None

    def _finish(self, span: Any, op: Any, started: float, error: BaseException | None) -> None:
        try:
            if error is None:
                span.set_attribute("rpc.grpc.status_code", 0)
                self.telemetry.finish_client(span, op, started, None)
            else:
                error_type, message = grpc_error_type(error)
                code = error.code() if callable(getattr(error, "code", None)) else None
                if code is not None and isinstance(code.value, tuple):
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                self.telemetry.finish_client(span, op, started, error_type, message)
        except Exception as exc:  # noqa: BLE001
            self.telemetry.guard.failed("dapr grpc client finish", exc)

    def _finish_future(self, span: Any, op: Any, started: float, future: Any) -> None:
        try:
            error = future.exception()
        except BaseException as cancelled:  # noqa: BLE001 - grpc.FutureCancelledError
            error = cancelled
        self._finish(span, op, started, error)


class TracedUnaryUnary(grpc.UnaryUnaryMultiCallable):
    """Stands in for one unary method of the synchronous SDK client's ``DaprStub``: the call's span
    and context around the channel's own callable, without grpc's interceptor machinery (a
    ``grpc.intercept_channel`` interceptor costs about 3 us more per call)."""

    __slots__ = ("_inner", "_method", "_tracing")

    def __init__(self, inner: Any, method: str, tracing: _Base) -> None:
        self._inner, self._method, self._tracing = inner, method, tracing

    def __call__(self, request: Any, timeout: Any = None, metadata: Any = None, credentials: Any = None,
                 wait_for_ready: Any = None, compression: Any = None) -> Any:
        return self.with_call(request, timeout, metadata, credentials, wait_for_ready, compression)[0]

    def with_call(self, request: Any, timeout: Any = None, metadata: Any = None, credentials: Any = None,
                  wait_for_ready: Any = None, compression: Any = None) -> Any:
        span, op, traced = self._tracing._start_call(self._method, metadata, request)
        if span is None:
            return self._inner.with_call(request, timeout, metadata, credentials, wait_for_ready, compression)
        started = time.perf_counter()
        try:
            result = self._inner.with_call(request, timeout, traced, credentials, wait_for_ready, compression)
        except BaseException as error:
            self._tracing._finish(span, op, started, error)
            raise
        self._tracing._finish(span, op, started, None)
        return result

    def future(self, request: Any, timeout: Any = None, metadata: Any = None, credentials: Any = None,
               wait_for_ready: Any = None, compression: Any = None) -> Any:
        span, op, traced = self._tracing._start_call(self._method, metadata, request)
        if span is None:
            return self._inner.future(request, timeout, metadata, credentials, wait_for_ready, compression)
        started = time.perf_counter()
        try:
            future = self._inner.future(request, timeout, traced, credentials, wait_for_ready, compression)
        except BaseException as error:
            self._tracing._finish(span, op, started, error)
            raise
        future.add_done_callback(lambda done: self._tracing._finish_future(span, op, started, done))
        return future


class StreamInterceptor(_Base, grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor,
                        grpc.StreamStreamClientInterceptor):
    """For the synchronous SDK client's streaming calls: the context only, no span. (Not a
    UnaryUnaryClientInterceptor, so grpc leaves unary calls out of its interceptor machinery.)"""

    def _stream(self, continuation: Any, details: Any, request: Any) -> Any:
        if is_instrumentation_enabled():
            try:
                details = _CallDetails(details.method, details.timeout, _with_context(details.metadata),
                                       details.credentials, getattr(details, "wait_for_ready", None),
                                       getattr(details, "compression", None))
            except Exception as exc:  # noqa: BLE001
                self.telemetry.guard.failed("dapr grpc stream", exc)
        return continuation(details, request)

    intercept_unary_stream = intercept_stream_unary = intercept_stream_stream = _stream


def trace_stub(stub: Any, tracing: _Base) -> None:
    """Replaces each unary method of a ``DaprStub`` with a :class:`TracedUnaryUnary`."""
    for name, value in list(vars(stub).items()):
        if isinstance(value, grpc.UnaryUnaryMultiCallable) and not isinstance(value, TracedUnaryUnary):
            setattr(stub, name, TracedUnaryUnary(value, GRPC_PREFIX + name, tracing))


class AioUnaryInterceptor(_Base, grpc.aio.UnaryUnaryClientInterceptor):
    """For the asyncio SDK client: unary calls get spans."""

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        span, op, metadata = self._start(details, request)
        if span is None:
            return await continuation(details, request)
        started = time.perf_counter()
        try:
            call = await continuation(grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                                                 details.credentials, details.wait_for_ready), request)
            await call
        except BaseException as error:
            self._finish(span, op, started, error)
            raise
        self._finish(span, op, started, None)
        return call


class _AioStream(_Base):
    async def _stream(self, continuation: Any, details: Any, request: Any) -> Any:
        if is_instrumentation_enabled():
            try:
                details = grpc.aio.ClientCallDetails(details.method, details.timeout, _with_context(details.metadata),
                                                     details.credentials, details.wait_for_ready)
            except Exception as exc:  # noqa: BLE001
                self.telemetry.guard.failed("dapr grpc stream", exc)
        return await continuation(details, request)


class AioUnaryStreamInterceptor(_AioStream, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _AioStream._stream


class AioStreamStreamInterceptor(_AioStream, grpc.aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _AioStream._stream


def _server_of(client: Any) -> tuple[str, int] | None:
    uri = getattr(client, "_uri", None)
    try:
        return (uri.hostname, uri.port_as_int) if uri is not None else None
    except Exception:  # noqa: BLE001 - a unix socket endpoint has no port
        return None


def client_init_wrapper(telemetry: Telemetry, asynchronous: bool):  # noqa: ANN201
    """Wraps ``DaprGrpcClient.__init__`` (or the asyncio one): our interceptor joins the user's."""

    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        ours: list[Any] = []
        try:
            bound = inspect.signature(wrapped).bind(*args, **kwargs)
            given = list(bound.arguments.get("interceptors") or ())
            if not any(getattr(i, INTERCEPTOR_MARK, False) for i in given):
                if asynchronous:
                    ours = [AioUnaryInterceptor(telemetry), AioUnaryStreamInterceptor(telemetry),
                            AioStreamStreamInterceptor(telemetry)]
                else:
                    ours = [StreamInterceptor(telemetry)]
                for interceptor in ours:
                    setattr(interceptor, INTERCEPTOR_MARK, True)
                bound.arguments["interceptors"] = given + ours
                args, kwargs = bound.args, bound.kwargs
        except Exception as exc:  # noqa: BLE001
            telemetry.guard.failed("dapr grpc client init", exc)
            ours = []
        result = wrapped(*args, **kwargs)
        server = _server_of(instance)
        for interceptor in ours:
            interceptor.server = server
        if ours and not asynchronous:
            try:
                trace_stub(instance._stub, ours[0])
            except Exception as exc:  # noqa: BLE001
                telemetry.guard.failed("dapr grpc client init", exc)
        return result

    return wrapper


def sync_client_init(telemetry: Telemetry):  # noqa: ANN201
    return client_init_wrapper(telemetry, asynchronous=False)


def async_client_init(telemetry: Telemetry):  # noqa: ANN201
    return client_init_wrapper(telemetry, asynchronous=True)
