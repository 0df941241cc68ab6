"""Faults inside the agent: each distinct one logged once, every occurrence counted."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily

# Distinct messages remembered per FaultLog; interface churn can make error texts unbounded.
_REMEMBERED = 256


class FaultLog:
    """Counts a source's faults by collector and logs each distinct one once.

    A fault is logged the first time its (collector, type, message) is seen, so a collector that
    fails on every scan produces one log line, not one per scan; the counter
    ``sidetrace_source_errors_total{source,collector}`` shows the rate.
    """

    def __init__(self, source: str, logger: logging.Logger, collectors: tuple[str, ...] = ()) -> None:
        self.source = source
        self.logger = logger
        self.last_error: str | None = None
        # Known collectors are exported at 0 from the start, so `increase()` sees their first fault.
        self._counts: dict[str, int] = dict.fromkeys(collectors, 0)
        self._seen: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, collector: str, exc: BaseException) -> None:
        key = (collector, type(exc).__name__, str(exc))
        with self._lock:
            self._counts[collector] = self._counts.get(collector, 0) + 1
            self.last_error = f"{collector}: {type(exc).__name__}: {exc}"
            if key in self._seen:
                self._seen.move_to_end(key)
                return
            self._seen[key] = None
            if len(self._seen) > _REMEMBERED:
                self._seen.popitem(last=False)
        self.logger.warning(
            "%s collector failed: %s: %s (logged once; counted in sidetrace_source_errors_total)",
            collector, type(exc).__name__, exc,
        )

    def families(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "sidetrace_source_errors_total",
            "Errors met by a source while collecting, by the collector that failed.",
            labels=["source", "collector"],
        )
        with self._lock:
            counts = sorted(self._counts.items())
        for collector, count in counts:
            family.add_metric([self.source, collector], count)
        yield family
