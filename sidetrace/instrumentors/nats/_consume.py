"""Consume side: subscription callbacks, next_msg, JetStream fetch, settlement, and `process(msg)`."""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import time
from collections.abc import Awaitable, Callable, Iterator
from time import perf_counter
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.trace import Link, Span, SpanKind

from sidetrace.instrumentors.nats._publish import SUPPRESSED, Wrapper, run_in_span, run_suppressed
from sidetrace.instrumentors.nats._telemetry import (
    BODY_SIZE,
    DELIVERED,
    STREAM,
    Destination,
    Telemetry,
    record_error,
)

# The subject a JetStream subscribe call is for, while it creates its core subscription (whose
# subject is a deliver inbox): used to name the spans of that subscription's messages.
JS_SUBJECT: contextvars.ContextVar[str | None] = contextvars.ContextVar("sidetrace_nats_js_subject", default=None)
SPAN_ATTR = "_sidetrace_span"
TEMPLATE_ATTR = "_sidetrace_template"
COUNTED_ATTR = "_sidetrace_counted"  # a pulled message, counted consumed by its receive


def _message(telemetry: Telemetry, operation: str, kind: str, msg: Any, template: str | None,
             queue: str | None = None) -> tuple[Destination, dict[str, Any]]:
    """The shared telemetry of ``msg``'s subject and its own span attributes."""
    destination = telemetry.destination(operation, kind, msg.subject, getattr(msg, "_client", None), template,
                                        queue or None)
    attributes = {**destination.attributes, BODY_SIZE: len(msg.data or b"")}
    reply = msg.reply
    if reply and reply.startswith("$JS.ACK."):
        metadata = msg.metadata
        attributes[STREAM] = metadata.stream
        attributes["messaging.destination.subscription.name"] = metadata.consumer
        if metadata.num_delivered and metadata.num_delivered > 1:
            attributes[DELIVERED] = metadata.num_delivered
    return destination, attributes


def _is_internal(cb: Any, client: Any) -> bool:
    """nats-py's own callbacks (the request mux, JetStream async replies) are not user handlers."""
    owner = getattr(cb, "__self__", None)
    return owner is client or type(owner).__module__.startswith("nats.")


def _is_coroutine_function(cb: Any) -> bool:
    return inspect.iscoroutinefunction(cb) or inspect.iscoroutinefunction(getattr(cb, "func", None))


def traced_callback(telemetry: Telemetry, cb: Callable[[Any], Awaitable[None]], subject: str, queue: str,
                    template: str | None) -> Callable[[Any], Awaitable[None]]:
    """The user's callback run inside `process {subject}` (CONSUMER), parented by the producer."""
    name_template = template or (subject if any(t in ("*", ">") for t in subject.split(".")) else None)

    async def callback(msg: Any) -> None:
        if not is_instrumentation_enabled():
            return await cb(msg)
        try:
            span, token, destination, began = _start_process(telemetry, msg, name_template, queue)
        except Exception as exc:
            telemetry.guard.failed("process", exc)
            return await cb(msg)
        error = None
        try:
            return await cb(msg)
        except BaseException as exc:
            error = _record_error(telemetry, span, exc)
            raise
        finally:
            _end_process(telemetry, span, token, destination, began, error, counted=False)

    callback.__wrapped__ = cb  # type: ignore[attr-defined]
    return callback


def _start_process(telemetry: Telemetry, msg: Any, template: str | None, queue: str | None
                   ) -> tuple[Span | None, object, Destination, float]:
    """(span, context token, destination, perf_counter() at the start) of processing ``msg``; the span
    is None when the tracer failed to start it (the failure counted), and the message is still timed
    and counted."""
    destination, attributes = _message(telemetry, "process", "process", msg, template, queue)
    began = perf_counter()
    try:
        parent, links = telemetry.consumer_context(msg.headers)
        span = telemetry.tracer.start_span(destination.name, context=parent or otel_context.Context(),
                                           kind=SpanKind.CONSUMER, attributes=attributes, links=links)
    except Exception as exc:
        telemetry.guard.failed("process", exc)
        return None, None, destination, began
    setattr(msg, SPAN_ATTR, span)
    # the handler runs in the message's context (its baggage too), or the current one if it has none
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    return span, token, destination, began


def _record_error(telemetry: Telemetry, span: Span | None, exc: BaseException) -> str:
    """The error.type of the app's exception, recorded on ``span`` when there is one."""
    if span is not None:
        try:
            return record_error(span, exc)
        except Exception as inner:
            telemetry.guard.failed("error", inner)
    return type(exc).__qualname__


def _end_process(telemetry: Telemetry, span: Span | None, token: object, destination: Destination, began: float,
                 error: str | None, counted: bool) -> None:
    """Ends the process span and records its metrics; a delivery its receive already ``counted`` is
    not counted again (each delivery is one consumed message, as the messaging conventions say)."""
    if span is not None:
        try:
            otel_context.detach(token)
            span.end()
        except Exception as exc:
            telemetry.guard.failed("process end", exc)
    try:
        metric_attributes = destination.metrics if error is None else telemetry.metric_attributes(
            destination.attributes, error)
        telemetry.process_duration.record(perf_counter() - began, metric_attributes)
        if not counted:
            telemetry.consumed.add(1, metric_attributes)
    except Exception as exc:
        telemetry.guard.failed("process end", exc)


@contextlib.contextmanager
def process_span(telemetry: Telemetry, msg: Any) -> Iterator[Span]:
    """Run the user's own processing of a received (pulled) message inside its `process` span."""
    try:
        template = getattr(msg, TEMPLATE_ATTR, None)
        span, token, destination, began = _start_process(telemetry, msg, template, None)
    except Exception as exc:
        telemetry.guard.failed("process", exc)
        yield trace.INVALID_SPAN
        return
    error = None
    try:
        yield span if span is not None else trace.INVALID_SPAN
    except BaseException as exc:
        error = _record_error(telemetry, span, exc)
        raise
    finally:
        _end_process(telemetry, span, token, destination, began, error, counted=getattr(msg, COUNTED_ATTR, False))


def subscribe_wrapper(telemetry: Telemetry) -> Wrapper:
    """Client.subscribe: wraps the callback (core, queue groups, JetStream push)."""

    async def wrapper(wrapped: Callable[..., Awaitable[Any]], instance: Any, args: tuple, kwargs: dict) -> Any:
        try:
            subject = args[0] if args else kwargs.get("subject", "")
            queue = (args[1] if len(args) > 1 else kwargs.get("queue")) or ""
            template = JS_SUBJECT.get()
            cb = args[2] if len(args) > 2 else kwargs.get("cb")
            # A callback nats-py would refuse (not a coroutine function) is left for it to refuse.
            if cb is not None and _is_coroutine_function(cb) and not _is_internal(cb, instance):
                traced = traced_callback(telemetry, cb, template or subject, queue, template)
                if len(args) > 2:
                    args = (*args[:2], traced, *args[3:])
                else:
                    kwargs = {**kwargs, "cb": traced}
        except Exception as exc:
            telemetry.guard.failed("subscribe", exc)
        sub = await wrapped(*args, **kwargs)
        try:
            if template:
                setattr(sub, TEMPLATE_ATTR, template)
        except Exception as exc:
            telemetry.guard.failed("subscribe", exc)
        return sub

    return wrapper


def js_subscribe_wrapper(telemetry: Telemetry) -> Wrapper:
    """JetStreamContext.subscribe: remembers the stream subject for the deliver-inbox subscription."""

    async def wrapper(wrapped: Callable[..., Awaitable[Any]], instance: Any, args: tuple, kwargs: dict) -> Any:
        subject = args[0] if args else kwargs.get("subject")
        token = JS_SUBJECT.set(subject if isinstance(subject, str) else None)
        try:
            return await wrapped(*args, **kwargs)
        finally:
            JS_SUBJECT.reset(token)

    return wrapper


def js_pull_subscribe_wrapper(telemetry: Telemetry) -> Wrapper:
    """JetStreamContext.pull_subscribe: remembers the subject on the PullSubscription for span names."""

    async def wrapper(wrapped: Callable[..., Awaitable[Any]], instance: Any, args: tuple, kwargs: dict) -> Any:
        psub = await wrapped(*args, **kwargs)
        try:
            subject = args[0] if args else kwargs.get("subject")
            setattr(psub, TEMPLATE_ATTR, subject)
        except Exception as exc:
            telemetry.guard.failed("pull subscribe", exc)
        return psub

    return wrapper


def _receive_wrapper(telemetry: Telemetry, where: str,
                     source: Callable[[Any], tuple[str, str | None, str | None, Any]],
                     messages_of: Callable[[Any], list[Any]]) -> Wrapper:
    """A receive operation: `receive {subject}` (CLIENT) linked to each received message's producer.

    ``source(instance)`` gives the subject, its template, the queue group and the client;
    ``messages_of(result)`` the messages the call returned. The links are known only once the
    messages are in, and a sampler sees only the links a span starts with: so the span is started
    when the call returns, with the time the call began as its start time.
    """

    async def wrapper(wrapped: Callable[..., Awaitable[Any]], instance: Any, args: tuple, kwargs: dict) -> Any:
        if SUPPRESSED.get() or not is_instrumentation_enabled():
            return await wrapped(*args, **kwargs)
        try:
            subject, template, queue, client = source(instance)
            name = f"receive {template or telemetry.template(subject, client)[0]}"
            attributes = telemetry.base_attributes("receive", "receive", subject, client, template)
            if queue:
                attributes["messaging.consumer.group.name"] = queue
            started, began = time.time_ns(), perf_counter()
        except Exception as exc:
            telemetry.guard.failed(where, exc)
            return await run_suppressed(wrapped(*args, **kwargs))
        token = SUPPRESSED.set(True)  # the fetch's own request and next_msg make no spans
        try:
            result = await wrapped(*args, **kwargs)
        except BaseException as exc:
            _received(telemetry, where, name, template, attributes, started, began, None, exc)
            raise
        finally:
            SUPPRESSED.reset(token)
        _received(telemetry, where, name, template, attributes, started, began, lambda: messages_of(result), None)
        return result

    return wrapper


def _received(telemetry: Telemetry, where: str, name: str, template: str | None, attributes: dict[str, Any],
              started: int, began: float, messages_of: Callable[[], list[Any]] | None,
              error: BaseException | None) -> None:
    """Makes the span of a receive that has returned (or raised ``error``) and counts its messages,
    marking each as counted so that its `process` span does not count it again."""
    messages: list[Any] = []
    span = None
    try:
        links = []
        for msg in messages_of() if messages_of is not None else ():
            messages.append(msg)
            setattr(msg, COUNTED_ATTR, True)
            if template:
                setattr(msg, TEMPLATE_ATTR, template)
            producer = telemetry.extract(msg.headers)
            if producer is not None:
                links.append(Link(trace.get_current_span(producer).get_span_context()))
        span_attributes = attributes
        if error is None and len(messages) != 1:
            span_attributes = {**attributes, "messaging.batch.message_count": len(messages)}
        span = telemetry.tracer.start_span(name, kind=SpanKind.CLIENT, attributes=span_attributes, links=links,
                                           start_time=started)
    except Exception as exc:
        telemetry.guard.failed(where, exc)
    error_type = _record_error(telemetry, span, error) if error is not None else None
    if span is not None:
        try:
            span.end()
        except Exception as exc:
            telemetry.guard.failed("end", exc)
    try:
        metric_attributes = telemetry.metric_attributes(attributes, error_type)
        telemetry.operation_duration.record(perf_counter() - began, metric_attributes)
        if messages:
            telemetry.consumed.add(len(messages), metric_attributes)
    except Exception as exc:
        telemetry.guard.failed("end", exc)


def next_msg_wrapper(telemetry: Telemetry) -> Wrapper:
    """Subscription.next_msg: one message."""

    def source(sub: Any) -> tuple[str, str | None, str | None, Any]:
        # The template names the messages' `process` spans too: a JetStream push subscription's
        # stream subject, else a wildcard or inbox subscription's own.
        template = getattr(sub, TEMPLATE_ATTR, None) or telemetry.template(sub.subject, sub._conn)[1]
        return sub.subject, template, sub.queue or None, sub._conn

    return _receive_wrapper(telemetry, "next_msg", source, lambda msg: [msg])


def fetch_wrapper(telemetry: Telemetry) -> Wrapper:
    """PullSubscription.fetch: a batch of messages."""

    def source(psub: Any) -> tuple[str, str | None, str | None, Any]:
        template = getattr(psub, TEMPLATE_ATTR, None)
        return template or psub._deliver, template, None, psub._nc

    return _receive_wrapper(telemetry, "fetch", source, list)


def settle_wrapper(telemetry: Telemetry, operation: str) -> Wrapper:
    """Msg.ack / nak / term / in_progress: an event on the message's process span, or a span if asked."""

    async def wrapper(wrapped: Callable[..., Awaitable[Any]], instance: Any, args: tuple, kwargs: dict) -> Any:
        if not is_instrumentation_enabled():
            return await wrapped(*args, **kwargs)
        try:
            process = getattr(instance, SPAN_ATTR, None)
            if not telemetry.settle_spans and process is not None and process.is_recording():
                process.add_event(operation)
                span = None
            else:
                template = getattr(instance, TEMPLATE_ATTR, None)
                destination, attributes = _message(telemetry, operation, "settle", instance, template)
                producer = telemetry.extract(instance.headers)
                links = [Link(trace.get_current_span(producer).get_span_context())] if producer else []
                span = telemetry.tracer.start_span(destination.name, kind=SpanKind.CLIENT, attributes=attributes,
                                                   links=links)
                began = perf_counter()
        except Exception as exc:
            telemetry.guard.failed(operation, exc)
            span = None
        if span is None:
            token = SUPPRESSED.set(True)
            try:
                return await wrapped(*args, **kwargs)
            finally:
                SUPPRESSED.reset(token)
        return await run_in_span(telemetry, span, destination, began, wrapped(*args, **kwargs))

    return wrapper
