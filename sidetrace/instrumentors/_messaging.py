"""Helpers every messaging instrumentor shares: header carriers, the never-break-the-app guard,
and bounded metric attribute values. Imports only the OpenTelemetry API."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping

from opentelemetry.metrics import Meter
from opentelemetry.propagators.textmap import Getter, Setter

log = logging.getLogger("sidetrace.instrumentors")

OTHER = "_OTHER"
TRACE_HEADERS = ("traceparent", "tracestate", "baggage")


class MappingGetter(Getter[Mapping[str, str]]):
    """Reads propagation fields from a headers mapping (exact key, then case-insensitive)."""

    def get(self, carrier: Mapping[str, str] | None, key: str) -> list[str] | None:
        if not carrier:
            return None
        value = carrier.get(key)
        if value is None:
            lowered = key.lower()
            value = next((v for k, v in carrier.items() if k.lower() == lowered), None)
        return [value] if value is not None else None

    def keys(self, carrier: Mapping[str, str] | None) -> list[str]:
        return list(carrier or ())


class DictSetter(Setter[dict[str, str]]):
    def set(self, carrier: dict[str, str], key: str, value: str) -> None:
        carrier[key] = value


GETTER = MappingGetter()
SETTER = DictSetter()


class Guard:
    """Catches our own failures: logs each distinct one once, counts all; the app's call goes on."""

    def __init__(self, instrumentation: str, meter: Meter | None = None) -> None:
        self.instrumentation = instrumentation
        self.errors = 0
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._counter = meter.create_counter(
            "sidetrace.instrumentation.errors", unit="{error}",
            description="Exceptions inside sidetrace instrumentation; the instrumented call went on.",
        ) if meter is not None else None

    def failed(self, where: str, exc: BaseException) -> None:
        key = (where, type(exc).__name__)
        with self._lock:
            self.errors += 1
            first = key not in self._seen and len(self._seen) < 256
            self._seen.add(key)
        if self._counter is not None:
            with contextlib.suppress(Exception):  # a broken meter must not break the app either
                self._counter.add(1, {"instrumentation": self.instrumentation, "where": where})
        if first:
            log.warning("sidetrace %s instrumentation failed in %s (the app's call went on; logged once): %s: %s",
                        self.instrumentation, where, type(exc).__name__, exc, exc_info=exc)


class BoundedValues:
    """Lets at most ``limit`` distinct values of a metric attribute through; the rest become _OTHER."""

    def __init__(self, limit: int = 200) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self.limit:
            return OTHER
        self._seen.add(value)
        return value


def without_trace_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """A copy of ``headers`` without W3C trace context and baggage fields."""
    return {k: v for k, v in (headers or {}).items() if k.lower() not in TRACE_HEADERS}
