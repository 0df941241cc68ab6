"""Trace context in message headers: W3C fields read and written directly while the global
propagator is OpenTelemetry's default, and through whatever propagator the user configured otherwise.

The default propagator (``tracecontext`` with or without ``baggage``) reached through the generic
getter and setter costs a composite dispatch, a regex search, a context built only to carry the span
and a header scan per field: more per message than the rest of our publish path. The direct path
gives the same headers and the same extracted context for what it handles (a well-formed version-00
``traceparent``, no ``tracestate`` or ``baggage`` to read or write) and hands everything else to the
configured propagator, which a change with ``set_global_textmap`` takes effect for at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from opentelemetry import baggage, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sidetrace.instrumentors._messaging import GETTER, SETTER, TRACE_HEADERS

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_VERSION_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_INVALID = trace.INVALID_SPAN_CONTEXT
_EMPTY = Context()
_DEFAULTS = ((TraceContextTextMapPropagator,), (TraceContextTextMapPropagator, W3CBaggagePropagator))


def _is_default(propagator: TextMapPropagator) -> bool:
    if type(propagator) is CompositePropagator:
        parts = tuple(type(p) for p in getattr(propagator, "_propagators", (None,)))
    else:
        parts = (type(propagator),)
    return parts in _DEFAULTS


class HeaderContext:
    """Injects into and extracts from NATS headers (a dict of str), as the global propagator would."""

    def __init__(self) -> None:
        # (the global propagator last seen, whether it is the default): one tuple, replaced whole,
        # so that threads never see one propagator's verdict paired with another
        self._verdict: tuple[TextMapPropagator | None, bool] = (None, False)

    def _direct(self) -> bool:
        propagator = propagate.get_global_textmap()
        verdict = self._verdict
        if verdict[0] is not propagator:
            verdict = self._verdict = (propagator, _is_default(propagator))
        return verdict[1]

    def fields(self, span: Span | None = None) -> dict[str, str]:
        """The propagation fields of ``span`` (the current span when None) with the current baggage."""
        # _direct() inlined, and the span context read once: this runs for every message sent
        propagator = propagate.get_global_textmap()
        verdict = self._verdict
        if verdict[0] is not propagator:
            verdict = self._verdict = (propagator, _is_default(propagator))
        if verdict[1] and not baggage.get_all():
            span_context = (span if span is not None else trace.get_current_span()).get_span_context()
            if span_context == _INVALID:
                return {}
            # %-formatting: half the time of the f-string with format specs, same text
            traceparent = "00-%032x-%016x-%02x" % (  # noqa: UP031
                span_context.trace_id, span_context.span_id, span_context.trace_flags)
            trace_state = span_context.trace_state
            if trace_state:
                return {TRACEPARENT: traceparent, TRACESTATE: trace_state.to_header()}
            return {TRACEPARENT: traceparent}
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span) if span is not None else None,
                         setter=SETTER)
        return carrier

    def extract(self, headers: Mapping[str, str] | None) -> Context | None:
        """The producer's context from ``headers``, or None when they carry no valid span context."""
        if not headers:
            return None
        propagator = propagate.get_global_textmap()  # _direct() inlined: this runs for every message
        verdict = self._verdict
        if verdict[0] is not propagator:
            verdict = self._verdict = (propagator, _is_default(propagator))
        if verdict[1]:
            value = headers.get(TRACEPARENT)
            # any other trace field, or a traceparent under another spelling, goes the generic way
            if value is not None and (len(headers) == 1 or not any(
                    key != TRACEPARENT and key.lower() in TRACE_HEADERS for key in headers)):
                match = _VERSION_00.fullmatch(value)
                if match is not None:
                    trace_id, span_id = int(match[1], 16), int(match[2], 16)
                    if not trace_id or not span_id:
                        return None
                    producer = SpanContext(trace_id, span_id, True, TraceFlags(int(match[3], 16)))
                    # a new Context from the shared empty one (set_value copies, never mutates it)
                    return trace.set_span_in_context(NonRecordingSpan(producer), _EMPTY)
        ctx = propagate.extract(headers, getter=GETTER)
        return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None
