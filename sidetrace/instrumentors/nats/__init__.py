"""NATS instrumentation for nats-py: core publish/subscribe/request and JetStream, per the
OpenTelemetry messaging conventions.

``NatsInstrumentor().instrument()`` traces, in every nats-py client of the process:

- ``Client.publish`` and JetStream ``publish``: ``publish {subject}`` (PRODUCER). JetStream
  publishes also get the stream and sequence from the PubAck, and ``messaging.message.id`` from a
  ``Nats-Msg-Id`` header.
- subscription callbacks (core, queue groups, JetStream push): ``process {subject}`` (CONSUMER),
  parented by the publisher's span from the message headers (``use_links=True`` links instead).
- ``Client.request``: one ``request {subject}`` (CLIENT) span for the round trip; the responder's
  process span is its child, and ``Msg.respond`` sends the responder's context, not the request's.
- ``Subscription.next_msg`` and JetStream ``fetch``: ``receive {subject}`` (CLIENT) linked to each
  message's producer; the span starts once the messages are in (backdated to the call's start), so
  samplers see the links. To process a received message inside a ``process`` span parented by its
  producer, wrap the work in :func:`process` (its delivery was counted by the receive, not again)::

      for msg in await psub.fetch(10):
          with process(msg):
              await handle(msg)
              await msg.ack()

- ``ack``, ``nak``, ``term``, ``in_progress``: events on the message's process span; without one (a
  fetched message settled outside :func:`process`), and always with ``settle_spans=True``,
  ``ack {subject}``-style CLIENT spans linked to the message's producer.

Span names never contain a random token: inbox and ``$JS.ACK`` subjects are named by template
and marked ``messaging.destination.temporary``; wildcard subscriptions are named by their subject.
JetStream API requests (``$JS.API.*``) make no spans. Trace context and baggage travel in a copy
of the message headers (the caller's dict is never changed), written and read by the global
propagator (the default one's work sidetrace does itself, with the same result), and a callback runs
in its message's context. A message that would exceed the server's ``max_payload`` with them, or a
server without headers, goes out without and the miss is counted
(``sidetrace.nats.context_injection.misses``). Messages consumed with ``async for msg in
sub.messages`` are not traced (use a callback, ``next_msg`` or :func:`process`).

Any failure inside the instrumentation is logged once, counted in
``sidetrace.instrumentation.errors``, and the app's call goes on untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.instrumentation.utils import unwrap
from opentelemetry.trace import Span
from wrapt import wrap_function_wrapper

from sidetrace import __version__
from sidetrace.instrumentors._messaging import Guard
from sidetrace.instrumentors.nats import _consume, _publish
from sidetrace.instrumentors.nats._telemetry import Telemetry

_INSTRUMENTS = ("nats-py >= 2.2",)
_TELEMETRY: Telemetry | None = None
# Client.publish as it was in the class (put back by uninstrument) and the function put in its place
_PUBLISH: tuple[Any, Any] | None = None

# (module, class attribute path, wrapper factory); Client.publish is replaced apart (see traced_publish)
_PATCHES = (
    ("nats.aio.client", "Client.request", _publish.request_wrapper),
    ("nats.aio.client", "Client.subscribe", _consume.subscribe_wrapper),
    ("nats.aio.subscription", "Subscription.next_msg", _consume.next_msg_wrapper),
    ("nats.aio.msg", "Msg.respond", _publish.respond_wrapper),
    ("nats.js.client", "JetStreamContext.publish", _publish.js_publish_wrapper),
    ("nats.js.client", "JetStreamContext.subscribe", _consume.js_subscribe_wrapper),
    ("nats.js.client", "JetStreamContext.pull_subscribe", _consume.js_pull_subscribe_wrapper),
    ("nats.js.client", "JetStreamContext.PullSubscription.fetch", _consume.fetch_wrapper),
) + tuple(
    ("nats.aio.msg", f"Msg.{operation}", lambda telemetry, op=operation: _consume.settle_wrapper(telemetry, op))
    for operation in ("ack", "ack_sync", "nak", "term", "in_progress")
)


class NatsInstrumentor(BaseInstrumentor):
    """Traces nats-py (see the module docstring for what is traced and how).

    Options to ``instrument()``: ``tracer_provider``, ``meter_provider``, ``use_links`` (consumer spans
    link to the producer instead of being its child; default False), ``settle_spans`` (ack/nak/term/
    in_progress as spans instead of events; default False).
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        return _INSTRUMENTS

    def _instrument(self, **kwargs: Any) -> None:
        global _TELEMETRY, _PUBLISH
        tracer = trace.get_tracer(__name__, __version__, tracer_provider=kwargs.get("tracer_provider"),
                                  schema_url="https://opentelemetry.io/schemas/1.27.0")
        meter = metrics.get_meter(__name__, __version__, meter_provider=kwargs.get("meter_provider"))
        telemetry = Telemetry(tracer, meter, Guard("nats", meter), bool(kwargs.get("use_links", False)),
                              bool(kwargs.get("settle_spans", False)))
        for module, name, factory in _PATCHES:
            wrap_function_wrapper(module, name, factory(telemetry))
        from nats.aio.client import Client

        stored = vars(Client)["publish"]
        # taken through the class, so that a wrapper someone put there earlier binds as it should
        traced = _publish.traced_publish(telemetry, Client.publish)
        Client.publish = traced
        _PUBLISH = (stored, traced)
        _TELEMETRY = telemetry

    def _uninstrument(self, **kwargs: Any) -> None:
        global _TELEMETRY, _PUBLISH
        import importlib

        from nats.aio.client import Client

        if _TELEMETRY is not None:
            _TELEMETRY.active = False  # our publish, if it stays under someone else's wrapper, passes through
        if _PUBLISH is not None:
            stored, traced = _PUBLISH
            if vars(Client)["publish"] is traced:
                Client.publish = stored
            _PUBLISH = None

        for module, name, _ in _PATCHES:
            owner_path, _, attribute = name.rpartition(".")
            owner: Any = importlib.import_module(module)
            for part in owner_path.split("."):
                owner = getattr(owner, part)
            unwrap(owner, attribute)
        _TELEMETRY = None


@contextlib.contextmanager
def process(msg: Any) -> Iterator[Span]:
    """Run your processing of a fetched or ``next_msg`` message inside its ``process`` span.

    The span is parented by the message's producer (or links to it with ``use_links``); ack/nak
    inside it become its events. Without instrumentation this does nothing but yield a no-op span.
    """
    telemetry = _TELEMETRY
    if telemetry is None:
        yield trace.INVALID_SPAN
        return
    with _consume.process_span(telemetry, msg) as span:
        yield span


__all__ = ["NatsInstrumentor", "process"]
