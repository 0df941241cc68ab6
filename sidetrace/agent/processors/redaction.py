"""Redaction: replaces the values of sensitive attributes before spans reach disk or a backend."""

from __future__ import annotations

import re
from collections.abc import Iterable

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidetrace.config import RedactionProcessorSection

_DECISIONS_KEPT = 10_000  # attribute keys are few in practice; the bound is for pathological senders


class RedactionProcessor:
    """Replaces values of attributes whose key is listed or matches a pattern (resource, span, event, link)."""

    def __init__(self, section: RedactionProcessorSection) -> None:
        self._keys = {key.lower() for key in section.keys}
        self._pattern = re.compile("|".join(f"(?:{p})" for p in section.key_patterns), re.IGNORECASE) \
            if section.key_patterns else None
        self._replacement = section.replacement
        self._decisions: dict[str, bool] = {}
        self.redacted = 0

    def _sensitive(self, key: str) -> bool:
        decision = self._decisions.get(key)
        if decision is None:
            decision = key.lower() in self._keys or bool(self._pattern and self._pattern.search(key))
            if len(self._decisions) < _DECISIONS_KEPT:
                self._decisions[key] = decision
        return decision

    def _scrub(self, attributes: Iterable) -> None:
        for kv in attributes:
            if self._sensitive(kv.key):
                kv.value.string_value = self._replacement
                self.redacted += 1

    def apply(self, request: ExportTraceServiceRequest) -> None:
        scrub = self._scrub
        for resource_spans in request.resource_spans:
            scrub(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    scrub(span.attributes)
                    for event in span.events:
                        scrub(event.attributes)
                    for link in span.links:
                        scrub(link.attributes)
