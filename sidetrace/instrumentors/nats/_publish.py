"""Publish side: Client.publish, Client.request, JetStream publish and Msg.respond."""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.trace import Span, SpanKind

from sidetrace.instrumentors._messaging import without_trace_headers
from sidetrace.instrumentors.nats._telemetry import (
    BODY_SIZE,
    DUPLICATE,
    MSG_ID_HEADER,
    SEQUENCE,
    STREAM,
    Destination,
    Telemetry,
    record_error,
)

# Set while one of our spans already covers the client's inner publish or request (a request's
# publish, a JetStream publish's request, an ack's publish): the inner call makes no span of its own.
SUPPRESSED: contextvars.ContextVar[bool] = contextvars.ContextVar("sidetrace_nats_suppressed", default=False)
JS_API_PREFIX = "$JS.API."

Wrapper = Callable[[Callable[..., Awaitable[Any]], Any, tuple, dict], Awaitable[Any]]


def _request_args(subject: str, payload: bytes = b"", timeout: float = 0.5, old_style: bool = False,
                  headers: dict | None = None) -> tuple[str, bytes, float, bool, dict | None]:
    return subject, payload, timeout, old_style, headers


def _js_publish_args(subject: str, payload: bytes = b"", timeout: float | None = None, stream: str | None = None,
                     headers: dict | None = None, **rest: Any) -> tuple[str, bytes, float | None, str | None,
                                                                        dict | None, dict]:
    return subject, payload, timeout, stream, headers, rest


async def run_in_span(telemetry: Telemetry, span: Span, destination: Destination, began: float,
                      call: Awaitable[Any], sent: int = 0, on_result: Callable[[Span, Any], None] | None = None
                      ) -> Any:
    """Await ``call`` with ``span`` current and suppression on; end the span and record metrics after."""
    error = None
    token = SUPPRESSED.set(True)
    context_token = otel_context.attach(trace.set_span_in_context(span))
    try:
        result = await call
    except BaseException as exc:
        error = _safe_error(telemetry, span, exc)
        raise
    else:
        if on_result is not None:
            try:
                on_result(span, result)
            except Exception as exc:
                telemetry.guard.failed("result", exc)
        return result
    finally:
        otel_context.detach(context_token)
        SUPPRESSED.reset(token)
        _end_send(telemetry, span, destination, began, error, sent)


def _end_send(telemetry: Telemetry, span: Span, destination: Destination, began: float, error: str | None,
              sent: int) -> None:
    try:
        span.end()
    except Exception as exc:  # a SpanProcessor's on_end raised: the span is lost, not the metrics
        telemetry.guard.failed("end", exc)
    try:
        metric_attributes = destination.metrics if error is None else telemetry.metric_attributes(
            destination.attributes, error)
        telemetry.operation_duration.record(perf_counter() - began, metric_attributes)
        if sent and error is None:
            telemetry.sent.add(sent, metric_attributes)
    except Exception as exc:
        telemetry.guard.failed("end", exc)


def _safe_error(telemetry: Telemetry, span: Span, exc: BaseException) -> str | None:
    try:
        return record_error(span, exc)
    except Exception as inner:
        telemetry.guard.failed("error", inner)
        return None


def _start_send(telemetry: Telemetry, operation: str, kind: SpanKind, subject: str, payload: bytes,
                headers: dict | None, client: Any) -> tuple[Span, Destination, dict | None, float]:
    """Start the span of a publish or request; return it with a copy of the headers carrying it.

    Once the span has started nothing here raises: if its context cannot be written (a propagator
    whose inject raises), the failure is counted and the message goes with the app's own headers,
    under the span all the same, which the caller ends."""
    destination = telemetry.destination(operation, "send", subject, client)
    attributes = {**destination.attributes, BODY_SIZE: len(payload)}
    if headers and MSG_ID_HEADER in headers:
        attributes["messaging.message.id"] = headers[MSG_ID_HEADER]
    # started with the current context as parent, and never made current: nothing in the client's
    # publish needs it, and the headers get its context directly
    span = telemetry.tracer.start_span(destination.name, kind=kind, attributes=attributes)
    try:
        new_headers = telemetry.inject(headers, len(payload), client, span)
    except Exception as exc:
        telemetry.guard.failed("inject", exc)
        new_headers = headers
    return span, destination, new_headers, perf_counter()


def traced_publish(telemetry: Telemetry, original: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """Client.publish: `publish {subject}` (PRODUCER), trace context into a copy of the headers.

    A plain function put on the class in place of ``original`` (nats-py's, or a wrapper someone put
    there before, called unbound): not a wrapt proxy, which on this hottest of calls binds a new
    wrapper object at every attribute access and packs the arguments into a tuple and a dict again. It
    takes any arguments and hands ``original`` the same ones, positional or keyword as the app gave
    them (a keyword nats-py does not know is for a wrapper under ours, or nats-py's own error), with
    only the headers replaced by the copy carrying the context. Arguments it cannot read as nats-py's
    (no subject, a subject that is not a str, a payload without a length) are the app's mistake: they
    go to ``original`` untouched, to fail there, and are not counted as ours. Once ``telemetry`` is no
    longer active (uninstrumented while another wrapper was put on top of this one, so that it could
    not be taken out) it only calls ``original``.
    """

    async def publish(self: Any, *args: Any, **kwargs: Any) -> None:
        if not telemetry.active or SUPPRESSED.get() or not is_instrumentation_enabled():
            return await original(self, *args, **kwargs)
        count = len(args)
        try:
            subject = args[0] if count else kwargs["subject"]
            payload = args[1] if count > 1 else kwargs.get("payload", b"")
            headers = args[3] if count > 3 else kwargs.get("headers")
            len(payload)
            readable = isinstance(subject, str)
        except Exception:
            readable = False
        if not readable:  # the app's mistake, for nats-py to report
            return await original(self, *args, **kwargs)
        try:
            span, destination, new_headers, began = _start_send(telemetry, "publish", SpanKind.PRODUCER, subject,
                                                                payload, headers, self)
        except Exception as exc:
            telemetry.guard.failed("publish", exc)
            return await original(self, *args, **kwargs)
        if count > 3:
            args = (*args[:3], new_headers, *args[4:])
        elif new_headers is not None or "headers" in kwargs:
            kwargs["headers"] = new_headers
        # The client's publish only queues the bytes (it calls nothing we wrap): the span need not be
        # current, nor suppression on, while it runs.
        error = None
        try:
            return await original(self, *args, **kwargs)
        except BaseException as exc:
            error = _safe_error(telemetry, span, exc)
            raise
        finally:
            _end_send(telemetry, span, destination, began, error, 1)

    # inspect.signature() and help() show the original's; the name stays ours, so that no error is
    # blamed on the wrong function
    publish.__wrapped__ = original  # type: ignore[attr-defined]
    publish.__doc__ = original.__doc__
    return publish


def request_wrapper(telemetry: Telemetry) -> Wrapper:
    """Client.request: one `request {subject}` CLIENT span for the round trip; the responder's
    process span becomes its child. JetStream API requests ($JS.API.*) are plumbing: no span."""

    async def wrapper(wrapped: Callable[..., Awaitable[Any]], instance: Any, args: tuple, kwargs: dict) -> Any:
        if SUPPRESSED.get() or not is_instrumentation_enabled():
            return await wrapped(*args, **kwargs)
        try:
            subject, payload, timeout, old_style, headers = _request_args(*args, **kwargs)
            plumbing = subject.startswith(JS_API_PREFIX)
        except Exception as exc:
            telemetry.guard.failed("request", exc)
            return await wrapped(*args, **kwargs)
        if plumbing:
            return await run_suppressed(wrapped(*args, **kwargs))
        try:
            span, destination, new_headers, began = _start_send(telemetry, "request", SpanKind.CLIENT, subject,
                                                                payload, headers, instance)
        except Exception as exc:
            telemetry.guard.failed("request", exc)
            # its inner publish stays unspanned, as under a request span: one failure, counted once
            return await run_suppressed(wrapped(*args, **kwargs))
        call = wrapped(subject, payload, timeout=timeout, old_style=old_style, headers=new_headers)
        return await run_in_span(telemetry, span, destination, began, call, sent=1)

    return wrapper


async def run_suppressed(call: Awaitable[Any]) -> Any:
    token = SUPPRESSED.set(True)
    try:
        return await call
    finally:
        SUPPRESSED.reset(token)


def _pub_ack(span: Span, ack: Any) -> None:
    if span.is_recording():
        span.set_attribute(STREAM, ack.stream)
        span.set_attribute(SEQUENCE, ack.seq)
        if ack.duplicate:
            span.set_attribute(DUPLICATE, True)


def js_publish_wrapper(telemetry: Telemetry) -> Wrapper:
    """JetStreamContext.publish: `publish {subject}` (PRODUCER) with the PubAck's stream and sequence."""

    async def wrapper(wrapped: Callable[..., Awaitable[Any]], instance: Any, args: tuple, kwargs: dict) -> Any:
        if SUPPRESSED.get() or not is_instrumentation_enabled():
            return await wrapped(*args, **kwargs)
        client = getattr(instance, "_nc", None)
        try:
            subject, payload, timeout, stream, headers, rest = _js_publish_args(*args, **kwargs)
            span, destination, new_headers, began = _start_send(telemetry, "publish", SpanKind.PRODUCER, subject,
                                                                payload, headers, client)
        except Exception as exc:
            telemetry.guard.failed("jetstream publish", exc)
            return await run_suppressed(wrapped(*args, **kwargs))  # no request span for its inner request
        call = wrapped(subject, payload, timeout=timeout, stream=stream, headers=new_headers, **rest)
        return await run_in_span(telemetry, span, destination, began, call, sent=1, on_result=_pub_ack)

    return wrapper


def respond_wrapper(telemetry: Telemetry) -> Wrapper:
    """Msg.respond: the reply carries the responder's context, never the request's echoed back.

    nats-py sends the request's headers with the reply; the trace fields among them are replaced by
    the current (process span's) context, or dropped when it cannot be written (a propagator whose
    inject raises: counted). The message object is left as it was.
    """

    async def wrapper(wrapped: Callable[..., Awaitable[Any]], instance: Any, args: tuple, kwargs: dict) -> Any:
        if not is_instrumentation_enabled():
            return await wrapped(*args, **kwargs)
        try:
            original = instance.headers
            data = args[0] if args else kwargs.get("data", b"")
            stripped = without_trace_headers(original)
            try:
                injected = telemetry.inject(stripped, len(data), instance._client, owned=True)
            except Exception as exc:
                telemetry.guard.failed("inject", exc)
                injected = stripped
            instance.headers = injected or (None if original is None else {})
        except Exception as exc:
            telemetry.guard.failed("respond", exc)
            return await wrapped(*args, **kwargs)
        try:
            return await run_suppressed(wrapped(*args, **kwargs))
        finally:
            instance.headers = original

    return wrapper
