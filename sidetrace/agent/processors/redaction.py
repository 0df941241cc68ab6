"""Redaction: replaces the values of sensitive attributes before spans reach disk or a backend."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.core import CounterMetricFamily, Metric

from sidetrace.config import RedactionProcessorSection

_DECISIONS_KEPT = 10_000  # attribute keys are few in practice; the bound is for pathological senders
_MIN_NEEDLE = 3  # shorter literals match too much to be worth a search
_MAX_ALTERNATIVES = 64

try:
    import hyperscan
except ImportError:  # an accelerator with x86-64 wheels; BytePrefilter gives the same answers without it
    hyperscan = None

if sys.version_info >= (3, 11):
    from re import _constants as sre_constants
    from re import _parser as sre_parse
else:  # pragma: no cover - Python 3.10
    import sre_constants
    import sre_parse


def _required(items: list) -> list[list[str]] | None:
    """For a parsed regex sequence: alternatives, each the literals all of which any match contains.

    None when some way to match needs no literal at all (then nothing can be skipped).
    """
    alternatives: list[list[str]] = [[]]
    run = ""

    def combine(inner: list[list[str]] | None) -> bool:
        nonlocal alternatives
        if inner is None:
            return True  # this part needs no literal: it adds nothing, the rest still must appear
        alternatives = [a + b for a in alternatives for b in inner][:_MAX_ALTERNATIVES]
        return True

    for op, av in items:
        if op is sre_constants.LITERAL:
            run += chr(av)
            continue
        if len(run) >= _MIN_NEEDLE:
            alternatives = [a + [run.lower()] for a in alternatives]
        run = ""
        if op is sre_constants.SUBPATTERN:
            combine(_required(list(av[-1])))
        elif op is sre_constants.BRANCH:
            branches = [_required(list(branch)) for branch in av[1]]
            if any(branch is None for branch in branches):
                continue
            combine([alt for branch in branches for alt in branch])
        elif op in (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT) and av[0] >= 1:
            combine(_required(list(av[2])))
    if len(run) >= _MIN_NEEDLE:
        alternatives = [a + [run.lower()] for a in alternatives]
    return None if any(not alt for alt in alternatives) else alternatives


def _implies(needed: list[str], other: list[str]) -> bool:
    """Whether a body holding every needle of ``needed`` necessarily holds every needle of ``other``."""
    return all(any(o in n for n in needed) for o in other)


# The non-ASCII letters that Python's case-insensitive matching equates with ASCII ones (found by trying
# every code point against every ASCII letter); folding them to those letters lets one rule serve the
# byte prefilter and the full check alike.
_EQUIVALENTS = {"\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"}
_TRANSLATION = str.maketrans(_EQUIVALENTS)
_EQUIVALENT_BYTES = tuple((letter.encode(), ascii_letter.encode()) for letter, ascii_letter in _EQUIVALENTS.items())


def fold(key: str) -> str:
    """Redaction's one case-folding rule, for attribute keys: the letters above become their ASCII
    equivalents, then everything is lowered. Every ASCII letter of the result comes from an ASCII
    letter of ``key`` or from one of those four, which ``fold_bytes`` treats the same way."""
    return key.translate(_TRANSLATION).lower()


def fold_bytes(raw: bytes) -> bytes:
    """``fold`` as seen by a byte search: ASCII lowered, the four equivalent letters' UTF-8 replaced."""
    lowered = raw.lower()
    for letter, ascii_letter in _EQUIVALENT_BYTES:
        if letter in lowered:
            lowered = lowered.replace(letter, ascii_letter)
    return lowered


def _needles(keys: Iterable[str], patterns: Iterable[str]) -> list[list[bytes]] | None:
    """Literal sets, one of which every sensitive key contains once folded; None when that cannot be known."""
    needles = [[fold(key)] for key in keys]
    for pattern in patterns:
        try:
            required = _required(list(sre_parse.parse(pattern, re.IGNORECASE)))
        except Exception:  # an exotic construct: be safe and always walk
            return None
        if required is None:
            return None
        needles.extend([[fold(needle) for needle in needed] for needed in required])
    if any(not needle.isascii() for needed in needles for needle in needed):
        return None  # fold_bytes can only find ASCII needles
    # A set that can only be found where a smaller set is found too adds no search: keep the smaller.
    kept: list[list[str]] = []
    for needed in needles:
        if not any(_implies(needed, other) for other in kept):
            kept = [other for other in kept if not _implies(other, needed)] + [needed]
    needles = kept
    return [[needle.encode() for needle in needed] for needed in needles] or None


class BytePrefilter:
    """The prefilter with the standard library: substring searches over the folded request bytes."""

    def __init__(self, needles: list[list[bytes]]) -> None:
        self._needles = needles

    def may_contain(self, raw: bytes) -> bool:
        lowered = raw.lower()
        if self._found(lowered):
            return True
        # Only the four non-ASCII equivalents can make a needle appear after folding: most requests hold none.
        if not any(letter in lowered for letter, _ in _EQUIVALENT_BYTES):
            return False
        return self._found(fold_bytes(raw))

    def _found(self, lowered: bytes) -> bool:
        return any(all(needle in lowered for needle in needed) for needed in self._needles)


class HyperscanPrefilter:
    """The same answers as BytePrefilter in one Hyperscan pass over the raw bytes: each needle is compiled
    case-insensitively with its i, s and k also matching their non-ASCII equivalents (about 40 times
    faster on a 170 KB request, bench/RESULTS.md)."""

    def __init__(self, needles: list[list[bytes]]) -> None:
        distinct = sorted({needle for needed in needles for needle in needed})
        index = {needle: number for number, needle in enumerate(distinct)}
        self._needles = [[index[needle] for needle in needed] for needed in needles]
        self._database = hyperscan.Database()
        self._database.compile(expressions=[_expression(needle) for needle in distinct], ids=list(range(len(distinct))),
                               flags=[hyperscan.HS_FLAG_CASELESS | hyperscan.HS_FLAG_SINGLEMATCH] * len(distinct))

    def may_contain(self, raw: bytes) -> bool:
        found: set[int] = set()
        self._database.scan(raw, match_event_handler=lambda number, *_: found.add(number))
        return any(all(number in found for number in needed) for needed in self._needles)


def _expression(needle: bytes) -> bytes:
    """A Hyperscan expression matching what folds to ``needle`` (ASCII case comes from HS_FLAG_CASELESS)."""
    equivalents: dict[int, list[bytes]] = {}
    for letter, ascii_letter in _EQUIVALENT_BYTES:
        equivalents.setdefault(ascii_letter[0], []).append(letter)
    parts = []
    for byte in needle:
        plain = bytes([byte]) if chr(byte).isalnum() else b"\\x%02x" % byte
        if byte in equivalents:
            plain = b"(?:" + b"|".join([plain, *(b"".join(b"\\x%02x" % b for b in letter)
                                                  for letter in equivalents[byte])]) + b")"
        parts.append(plain)
    return b"".join(parts)


def prefilter(needles: list[list[bytes]] | None) -> BytePrefilter | HyperscanPrefilter | None:
    if needles is None:
        return None
    return HyperscanPrefilter(needles) if hyperscan is not None else BytePrefilter(needles)


class RedactionProcessor:
    """Replaces values of sensitive attributes at every depth: resource, scope, span, event and link attributes,
    and keys inside map values (``kvlist``) and arrays of maps."""

    def __init__(self, section: RedactionProcessorSection, redacted: int = 0) -> None:
        self._keys = {fold(key) for key in section.keys}
        self._pattern = re.compile("|".join(f"(?:{p})" for p in section.key_patterns), re.IGNORECASE) \
            if section.key_patterns else None
        self._replacement = section.replacement
        self._decisions: dict[str, bool] = {}
        self.redacted = redacted
        # Every attribute key is in the request's wire bytes as plain UTF-8: if no key or pattern
        # could match anywhere in them (checked with a few C-speed substring searches for the literals
        # each pattern requires, after the same folding as the full check), the request is clean and
        # its attributes need not be walked.
        self._prefilter = prefilter(_needles(section.keys, section.key_patterns))
        self.skipped_requests = 0

    def families(self) -> Iterator[Metric]:
        yield CounterMetricFamily("sidetrace_redacted_attributes_total", "Attribute values replaced by redaction.",
                                  value=self.redacted)

    def sensitive(self, key: str) -> bool:
        """Whether values under ``key`` are redacted (the full check)."""
        decision = self._decisions.get(key)
        if decision is None:
            folded = fold(key)
            decision = folded in self._keys or bool(self._pattern and self._pattern.search(folded))
            if len(self._decisions) < _DECISIONS_KEPT:
                self._decisions[key] = decision
        return decision

    def may_contain(self, raw: bytes) -> bool:
        """The prefilter: False only when no attribute key in ``raw`` (wire bytes) can be sensitive."""
        return self._prefilter is None or self._prefilter.may_contain(raw)

    def _scrub(self, attributes: Iterable) -> None:
        for kv in attributes:
            if self.sensitive(kv.key):
                kv.value.string_value = self._replacement
                self.redacted += 1
                continue
            kind = kv.value.WhichOneof("value")
            if kind == "kvlist_value":
                self._scrub(kv.value.kvlist_value.values)
            elif kind == "array_value":
                self._scrub_array(kv.value.array_value.values)

    def _scrub_array(self, values: Iterable) -> None:
        for value in values:
            kind = value.WhichOneof("value")
            if kind == "kvlist_value":
                self._scrub(value.kvlist_value.values)
            elif kind == "array_value":
                self._scrub_array(value.array_value.values)

    def apply(self, request: ExportTraceServiceRequest, raw: bytes | None = None) -> None:
        """Redact ``request`` in place; ``raw``, its protobuf bytes when known, lets clean requests skip the walk."""
        if not self._keys and self._pattern is None:
            return
        if raw is not None and not self.may_contain(raw):
            self.skipped_requests += 1
            return
        scrub = self._scrub
        for resource_spans in request.resource_spans:
            scrub(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                scrub(scope_spans.scope.attributes)
                for span in scope_spans.spans:
                    scrub(span.attributes)
                    for event in span.events:
                        scrub(event.attributes)
                    for link in span.links:
                        scrub(link.attributes)
