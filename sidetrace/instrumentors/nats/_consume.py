"""Consume side: subscription callbacks, next_msg, JetStream fetch, settlement, and `process(msg)`."""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.trace import Link, Span, SpanKind

from sidetrace.instrumentors.nats._publish import SUPPRESSED, Wrapper, run_in_span
from sidetrace.instrumentors.nats._telemetry import DELIVERED, STREAM, Telemetry, Timer, record_error

# The subject a JetStream subscribe call is for, while it creates its core subscription (whose
# subject is a deliver inbox): used to name the spans of that subscription's messages.
JS_SUBJECT: contextvars.ContextVar[str | None] = contextvars.ContextVar("sidetrace_nats_js_subject", default=None)
SPAN_ATTR = "_sidetrace_span"
TEMPLATE_ATTR = "_sidetrace_template"


def _message_attributes(telemetry: Telemetry, operation: str, kind: str, msg: Any, template: str | None,
                        queue: str | None = None) -> dict[str, Any]:
    client = getattr(msg, "_client", None)
    attributes = telemetry.base_attributes(operation, kind, msg.subject, client, template)
    attributes["messaging.message.body.size"] = len(msg.data or b"")
    if queue:
        attributes["messaging.consumer.group.name"] = queue
    reply = msg.reply or ""
    if reply.startswith("$JS.ACK."):
        metadata = msg.metadata
        attributes[STREAM] = metadata.stream
        attributes["messaging.destination.subscription.name"] = metadata.consumer
        if metadata.num_delivered and metadata.num_delivered > 1:
            attributes[DELIVERED] = metadata.num_delivered
    return attributes


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
            span, token, attributes, timer = _start_process(telemetry, msg, name_template, queue)
        except Exception as exc:
            telemetry.guard.failed("process", exc)
            return await cb(msg)
        error = None
        try:
            return await cb(msg)
        except BaseException as exc:
            error = record_error(span, exc)
            raise
        finally:
            _end_process(telemetry, span, token, attributes, timer, error)

    callback.__wrapped__ = cb  # type: ignore[attr-defined]
    return callback


def _start_process(telemetry: Telemetry, msg: Any, template: str | None, queue: str | None
                   ) -> tuple[Span, object, dict[str, Any], Timer]:
    attributes = _message_attributes(telemetry, "process", "process", msg, template, queue)
    parent, links = telemetry.consumer_context(msg.headers)
    name = f"process {template or telemetry.template(msg.subject, getattr(msg, '_client', None))[0]}"
    span = telemetry.tracer.start_span(name, context=parent or otel_context.Context(), kind=SpanKind.CONSUMER,
                                       attributes=attributes, links=links)
    setattr(msg, SPAN_ATTR, span)
    token = otel_context.attach(trace.set_span_in_context(span))
    return span, token, attributes, Timer()


def _end_process(telemetry: Telemetry, span: Span, token: object, attributes: dict[str, Any], timer: Timer,
                 error: str | None) -> None:
    try:
        otel_context.detach(token)
        span.end()
        metric_attributes = telemetry.metric_attributes(attributes, error)
        telemetry.process_duration.record(timer.seconds(), metric_attributes)
        telemetry.consumed.add(1, metric_attributes)
    except Exception as exc:
        telemetry.guard.failed("process end", exc)


@contextlib.contextmanager
def process_span(telemetry: Telemetry, msg: Any) -> Iterator[Span]:
    """Run the user's own processing of a received (pulled) message inside its `process` span."""
    try:
        template = getattr(msg, TEMPLATE_ATTR, None)
        span, token, attributes, timer = _start_process(telemetry, msg, template, None)
    except Exception as exc:
        telemetry.guard.failed("process", exc)
        yield trace.INVALID_SPAN
        return
    error = None
    try:
        yield span
    except BaseException as exc:
        error = record_error(span, exc)
        raise
    finally:
        _end_process(telemetry, span, token, attributes, timer, error)


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


def _receive(telemetry: Telemetry, subject: str, client: Any, template: str | None) -> tuple[Span, dict, Timer]:
    attributes = telemetry.base_attributes("receive", "receive", subject, client, template)
    name = f"receive {template or telemetry.template(subject, client)[0]}"
    span = telemetry.tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
    return span, attributes, Timer()


def _link_messages(telemetry: Telemetry, template: str | None, messages: list[Any],
                   attributes: dict[str, Any]) -> Callable[[Span, Any], None]:
    def on_result(span: Span, _: Any) -> None:
        if len(messages) != 1:
            span.set_attribute("messaging.batch.message_count", len(messages))
        for msg in messages:
            if template:
                setattr(msg, TEMPLATE_ATTR, template)
            producer = telemetry.extract(msg.headers)
            if producer is not None and span.is_recording():
                span.add_link(trace.get_current_span(producer).get_span_context())
        telemetry.consumed.add(len(messages), telemetry.metric_attributes(attributes, None))

    return on_result


def _receive_wrapper(telemetry: Telemetry, where: str, source: Callable[[Any, str | None], tuple[str, Any]],
                     messages_of: Callable[[Any], list[Any]]) -> Wrapper:
    """A receive operation: `receive {subject}` (CLIENT) linked to each received message's producer.

    ``source(instance, template)`` gives the subject and client to describe; ``messages_of(result)``
    the messages the call returned.
    """

    async def wrapper(wrapped: Callable[..., Awaitable[Any]], instance: Any, args: tuple, kwargs: dict) -> Any:
        if SUPPRESSED.get() or not is_instrumentation_enabled():
            return await wrapped(*args, **kwargs)
        try:
            template = getattr(instance, TEMPLATE_ATTR, None)
            subject, client = source(instance, template)
            span, attributes, timer = _receive(telemetry, subject, client, template)
        except Exception as exc:
            telemetry.guard.failed(where, exc)
            return await wrapped(*args, **kwargs)
        received: list[Any] = []

        async def call() -> Any:
            result = await wrapped(*args, **kwargs)
            received.extend(messages_of(result))
            return result

        return await run_in_span(telemetry, span, attributes, timer, call(),
                                 on_result=_link_messages(telemetry, template, received, attributes))

    return wrapper


def next_msg_wrapper(telemetry: Telemetry) -> Wrapper:
    """Subscription.next_msg: one message."""
    return _receive_wrapper(telemetry, "next_msg", lambda sub, _: (sub.subject, sub._conn), lambda msg: [msg])


def fetch_wrapper(telemetry: Telemetry) -> Wrapper:
    """PullSubscription.fetch: a batch of messages."""
    return _receive_wrapper(telemetry, "fetch", lambda psub, template: (template or psub._deliver, psub._nc), list)


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
                attributes = _message_attributes(telemetry, operation, "settle", instance, template)
                name = f"{operation} {template or telemetry.template(instance.subject, instance._client)[0]}"
                producer = telemetry.extract(instance.headers)
                links = [Link(trace.get_current_span(producer).get_span_context())] if producer else []
                span = telemetry.tracer.start_span(name, kind=SpanKind.CLIENT, attributes=attributes, links=links)
                timer = Timer()
        except Exception as exc:
            telemetry.guard.failed(operation, exc)
            span = None
        if span is None:
            token = SUPPRESSED.set(True)
            try:
                return await wrapped(*args, **kwargs)
            finally:
                SUPPRESSED.reset(token)
        return await run_in_span(telemetry, span, attributes, timer, wrapped(*args, **kwargs))

    return wrapper
