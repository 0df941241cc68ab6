"""OTLP exponential histogram points: kept, merged (delta into cumulative) and turned into Prometheus native histograms.

An OTLP bucket ``i`` at scale ``s`` holds the values in ``(2**(i * 2**-s), 2**((i + 1) * 2**-s)]``; lowering the
scale by one merges buckets ``2j`` and ``2j + 1`` into bucket ``j`` (``i >> 1``), exactly, so two points of different
scales are merged at the lower one, as the Collector's ``deltatocumulative`` processor does (which also lowers the
scale further while the merged buckets of one sign would span more than ``MAX_BUCKETS`` indices, and widens the
narrower zero bucket to the wider one's threshold, rounded up to a bucket boundary).

A Prometheus native histogram of schema ``n`` has the same buckets as scale ``n``, numbered by their upper bound
(OTLP index + 1), for schemas -4 to 8 only: a finer point is lowered to scale 8; a coarser one cannot be split
without inventing counts and is refused (``MIN_SCHEMA``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.samples import BucketSpan, NativeHistogram

MIN_SCHEMA = -4
MAX_SCHEMA = 8
EMPTY_ZERO_THRESHOLD = 2.0**-128  # client_golang's default zero threshold, for a point without observations
MAX_BUCKETS = 160  # per sign, after a merge: the Collector's deltatocumulative bound (and the SDK's default size)


def bucket_index(value: float, scale: int) -> int:
    """The OTLP bucket index of a positive ``value`` at ``scale`` (the data model's mapping functions)."""
    mantissa, exponent = math.frexp(value)  # value = mantissa * 2**exponent, mantissa in [0.5, 1)
    power_of_two = mantissa == 0.5
    if scale <= 0:
        return ((exponent - 1) - (1 if power_of_two else 0)) >> -scale
    if power_of_two:  # an exact boundary belongs to the bucket below it
        return ((exponent - 1) << scale) - 1
    return math.floor(math.log2(value) * (1 << scale))


def upper_bound(index: int, scale: int) -> float:
    """The (inclusive) upper bound of OTLP bucket ``index`` at ``scale``."""
    return 2.0 ** ((index + 1) / 2.0**scale)


@dataclass
class Buckets:
    """The buckets of one sign: ``counts[k]`` is bucket ``offset + k``; no zero count at either end."""

    offset: int = 0
    counts: list[int] = field(default_factory=list)

    @classmethod
    def trimmed(cls, offset: int, counts: list[int]) -> Buckets:
        first = next((k for k, count in enumerate(counts) if count), len(counts))
        last = next((k for k in range(len(counts) - 1, -1, -1) if counts[k]), first - 1)
        return cls(offset + first, list(counts[first:last + 1]))

    @property
    def last(self) -> int:
        return self.offset + len(self.counts) - 1

    def downscaled(self, by: int) -> Buckets:
        """The same counts at ``by`` scales lower: bucket ``i`` goes to ``i >> by``."""
        if by == 0 or not self.counts:
            return self
        first = self.offset >> by
        counts = [0] * ((self.last >> by) - first + 1)
        for k, count in enumerate(self.counts):
            counts[((self.offset + k) >> by) - first] += count
        return Buckets(first, counts)

    def added(self, other: Buckets) -> Buckets:
        if not other.counts:
            return self
        if not self.counts:
            return other
        first = min(self.offset, other.offset)
        counts = [0] * (max(self.last, other.last) - first + 1)
        for buckets in (self, other):
            for k, count in enumerate(buckets.counts):
                counts[buckets.offset + k - first] += count
        return Buckets.trimmed(first, counts)

    def split_at(self, top: int) -> tuple[int, Buckets]:
        """The total of the buckets up to index ``top``, and the buckets above it."""
        keep = max(0, min(len(self.counts), top + 1 - self.offset))
        return sum(self.counts[:keep]), Buckets.trimmed(self.offset + keep, self.counts[keep:])

    def spans(self) -> tuple[list[BucketSpan], list[int]]:
        """Prometheus spans and deltas of these buckets (native index = OTLP index + 1); zero buckets are gaps."""
        runs: list[list[int]] = []  # [first native index, length]
        deltas: list[int] = []
        previous = 0
        for k, count in enumerate(self.counts):
            if not count:
                continue
            index = self.offset + k + 1
            if runs and runs[-1][0] + runs[-1][1] == index:
                runs[-1][1] += 1
            else:
                runs.append([index, 1])
            deltas.append(count - previous)
            previous = count
        spans, end = [], 0
        for number, (first, length) in enumerate(runs):
            spans.append(BucketSpan(first if number == 0 else first - end, length))  # a later span: the gap
            end = first + length
        return spans, deltas


def _spread(a: Buckets, b: Buckets) -> int:
    """How many scales lower ``a`` and ``b`` added together fit in ``MAX_BUCKETS`` indices."""
    present = [buckets for buckets in (a, b) if buckets.counts]
    if not present:
        return 0
    low, high = min(x.offset for x in present), max(x.last for x in present)
    by = 0
    while high - low + 1 > MAX_BUCKETS:
        low, high, by = low >> 1, high >> 1, by + 1
    return by


@dataclass
class ExponentialPoint:
    """One exponential histogram point, cumulative: what a series keeps between scrapes. Never changed once made
    (a merge makes a new one), so its native form is worked out once, at the first scrape that asks."""

    scale: int
    count: int
    sum: float
    zero_threshold: float = 0.0
    zero_count: int = 0
    positive: Buckets = field(default_factory=Buckets)
    negative: Buckets = field(default_factory=Buckets)
    _native: NativeHistogram | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_otlp(cls, point: Any) -> ExponentialPoint:
        return cls(point.scale, point.count, point.sum, point.zero_threshold, point.zero_count,
                   Buckets.trimmed(point.positive.offset, list(point.positive.bucket_counts)),
                   Buckets.trimmed(point.negative.offset, list(point.negative.bucket_counts)))

    def downscaled(self, by: int) -> ExponentialPoint:
        return ExponentialPoint(self.scale - by, self.count, self.sum, self.zero_threshold, self.zero_count,
                                self.positive.downscaled(by), self.negative.downscaled(by))

    def widened(self, top: int, threshold: float) -> ExponentialPoint:
        """This point with every bucket up to index ``top`` moved into the zero bucket, now ``threshold`` wide."""
        if threshold <= self.zero_threshold:
            return self
        moved_positive, positive = self.positive.split_at(top)
        moved_negative, negative = self.negative.split_at(top)
        return ExponentialPoint(self.scale, self.count, self.sum, threshold,
                                self.zero_count + moved_positive + moved_negative, positive, negative)

    def merged(self, delta: ExponentialPoint) -> ExponentialPoint:
        """This cumulative point with ``delta`` added (see the module doc for how scales and zero buckets meet)."""
        scale = min(self.scale, delta.scale)
        a, b = self.downscaled(self.scale - scale), delta.downscaled(delta.scale - scale)
        by = max(_spread(a.positive, b.positive), _spread(a.negative, b.negative))
        if by:
            a, b, scale = a.downscaled(by), b.downscaled(by), scale - by
        if a.zero_threshold != b.zero_threshold:
            top = bucket_index(max(a.zero_threshold, b.zero_threshold), scale)
            threshold = upper_bound(top, scale)
            a, b = a.widened(top, threshold), b.widened(top, threshold)
        return ExponentialPoint(scale, a.count + b.count, a.sum + b.sum, max(a.zero_threshold, b.zero_threshold),
                                a.zero_count + b.zero_count, a.positive.added(b.positive),
                                a.negative.added(b.negative))

    def native(self) -> NativeHistogram:
        """This point as a Prometheus native histogram (schema at most ``MAX_SCHEMA``; the caller refuses points
        whose scale is below ``MIN_SCHEMA``)."""
        if self._native is None:
            self._native = self._converted()
        return self._native

    def _converted(self) -> NativeHistogram:
        point = self.downscaled(max(0, self.scale - MAX_SCHEMA))
        positive_spans, positive_deltas = point.positive.spans()
        negative_spans, negative_deltas = point.negative.spans()
        zero_threshold = point.zero_threshold
        if not positive_spans and not negative_spans:
            # Without buckets, a zero count or a zero threshold Prometheus reads a classic histogram: the no-op span
            # says it is a native one (client_model's metrics.proto), and for Prometheus 2.42, which ignores that
            # span, so does a zero threshold (client_golang's default): there is no observation for it to move.
            positive_spans = [BucketSpan(0, 0)]
            if not point.zero_count and not zero_threshold:
                zero_threshold = EMPTY_ZERO_THRESHOLD
        return NativeHistogram(point.count, point.sum, point.scale, zero_threshold, point.zero_count,
                               positive_spans, negative_spans, positive_deltas, negative_deltas)
