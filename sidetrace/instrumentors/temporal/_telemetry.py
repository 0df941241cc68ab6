"""What every Temporal role shares: the context header, the guard, error types, and a span around work."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import temporalio.converter
import temporalio.exceptions
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import (
    Span,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
)
from temporalio.api.common.v1 import Payload

from sidetrace.instrumentors._messaging import Guard

log = logging.getLogger("sidetrace.instrumentors.temporal")
GUARD = Guard("temporal")
HEADER = "_tracer-data"  # the official interceptor's header: both can read each other's context


def context_to_headers(headers: Mapping[str, Payload], ctx: otel_context.Context | None = None,
                       guard: Guard = GUARD) -> Mapping[str, Payload]:
    """A copy of ``headers`` carrying ``ctx`` (default: the current context); ``headers`` if that fails."""
    try:
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=ctx)
        if not carrier:
            return headers
        (payload,) = temporalio.converter.PayloadConverter.default.to_payloads([carrier])
        return {**headers, HEADER: payload}
    except Exception as exc:
        guard.failed("inject", exc)
        return headers


def context_from_headers(headers: Mapping[str, Payload], guard: Guard = GUARD) -> otel_context.Context | None:
    """The context in ``headers``, or None when absent or unreadable (a foreign or broken header)."""
    payload = headers.get(HEADER)
    if payload is None:
        return None
    try:
        (carrier,) = temporalio.converter.PayloadConverter.default.from_payloads([payload])
        return propagate.extract(carrier) if isinstance(carrier, dict) else None
    except Exception as exc:
        guard.failed("extract", exc)
        return None


def context_to_nexus_headers(headers: Mapping[str, str] | None, ctx: otel_context.Context | None,
                             guard: Guard = GUARD) -> Mapping[str, str] | None:
    """A copy of a Nexus operation's string ``headers`` carrying ``ctx`` as the propagator's own fields
    (``traceparent``, as temporalio's interceptor writes them); ``headers`` unchanged if they already carry
    one of those fields or if that fails."""
    try:
        carrier: dict[str, Any] = {}
        propagate.inject(carrier, context=ctx)
        if not carrier or any(key in (headers or {}) for key in carrier):
            return headers
        return {**(headers or {}), **{k: ",".join(v) if isinstance(v, list) else v for k, v in carrier.items()}}
    except Exception as exc:
        guard.failed("inject", exc)
        return headers


def context_from_nexus_headers(headers: Mapping[str, str], guard: Guard = GUARD) -> otel_context.Context | None:
    """The context in a Nexus request's string headers, or None when unreadable."""
    try:
        return propagate.extract(headers)
    except Exception as exc:
        guard.failed("extract", exc)
        return None


def error_type(exc: BaseException) -> str:
    if isinstance(exc, temporalio.exceptions.ApplicationError):
        return exc.type or "ApplicationError"
    if isinstance(exc, temporalio.exceptions.TimeoutError):
        return f"timeout.{exc.type.name.lower()}" if exc.type is not None else "timeout"
    if type(exc).__name__ == "CancelledError":  # Temporal's and asyncio's
        return "cancelled"
    return type(exc).__qualname__


@contextlib.contextmanager
def _span(tracer: Tracer, guard: Guard, name: str, kind: SpanKind, attributes: dict[str, Any],
          parent: otel_context.Context | None = None) -> Iterator[Span]:
    """A current span around the caller's work; if making it fails, the work runs without one."""
    try:
        span = tracer.start_span(name, context=parent, kind=kind, attributes=attributes)
        token = otel_context.attach(trace.set_span_in_context(span))
    except Exception as exc:
        guard.failed("span", exc)
        yield trace.INVALID_SPAN
        return
    try:
        yield span
    except BaseException as exc:
        with contextlib.suppress(Exception):
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, str(exc) or type(exc).__name__))
            span.set_attribute("error.type", error_type(exc))
        raise
    finally:
        try:
            otel_context.detach(token)
            span.end()
        except Exception as exc:
            guard.failed("span end", exc)
