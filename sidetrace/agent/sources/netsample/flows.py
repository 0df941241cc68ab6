"""Flows estimated from 1-in-N samples, with sFlow-style 95 % error bounds.

Every sample counts as N packets and N times its length in bytes, with the N in force when it
was taken. For c samples of a flow the estimate's 95 % error bound is about 196 * sqrt(1/c)
percent (sFlow's sampling theory: a binomial count, normal approximation). The table is bounded:
the least recently seen flow is evicted, counted and handed to the table's ``evicted`` callback.

A flow also carries where its packets go per process: ``counter``, the ``[packets, bytes, samples]``
list of its process's series once its process is known, and until then the estimates it holds
(``held_*``), which the source moves to a series when the process is resolved or given up.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from sidetrace.agent.sources.netsample.packets import TCP_FIN, TCP_RST, TCP_SYN

# (device, direction, protocol, local address, local port, remote address, remote port)
FlowKey = tuple[str, str, str, str, int, str, int]


def error_bound_percent(samples: int) -> float:
    """95 % error bound of an estimate made from ``samples`` samples, in percent."""
    return 196.0 * math.sqrt(1.0 / samples) if samples else math.inf


class Flow:
    __slots__ = ("key", "samples", "packets", "bytes", "syn", "fin", "rst", "first_seen", "last_seen", "process",
                 "window_bytes", "rate_bytes", "recent_bytes", "counter", "held_packets", "held_bytes", "held_samples",
                 "held_epoch", "looked_up")

    def __init__(self, key: FlowKey, now: float) -> None:
        self.key = key
        self.samples = 0
        self.packets = 0
        self.bytes = 0
        self.syn = self.fin = self.rst = 0
        self.first_seen = self.last_seen = now
        self.process = ""
        self.window_bytes = 0
        self.rate_bytes = 0.0
        self.recent_bytes = 0  # bytes of the windows rolled since the last top_recent
        self.counter: list[int] | None = None
        self.held_packets = self.held_bytes = self.held_samples = self.held_epoch = 0
        self.looked_up = -1  # the version of the process table this flow's local end was last looked up in

    def as_dict(self) -> dict[str, Any]:
        device, direction, protocol, local, local_port, remote, remote_port = self.key
        return {
            "device": device, "direction": direction, "protocol": protocol, "local": local,
            "local_port": local_port, "remote": remote, "remote_port": remote_port,
            "process": self.process or "unknown",
            "samples": self.samples, "estimated_packets": self.packets, "estimated_bytes": self.bytes,
            "error_bound_percent": round(error_bound_percent(self.samples), 1),
            "bytes_per_second": round(self.rate_bytes, 1), "tcp_syn": self.syn, "tcp_fin": self.fin,
            "tcp_rst": self.rst, "first_seen": self.first_seen, "last_seen": self.last_seen,
        }


class FlowTable:
    """Bounded LRU table of flows."""

    def __init__(self, max_flows: int, evicted: Callable[[Flow], None] | None = None) -> None:
        self.max_flows = max_flows
        self.flows: OrderedDict[FlowKey, Flow] = OrderedDict()
        self.evicted = 0
        self._on_evict = evicted

    def add(self, key: FlowKey, length: int, n: int, tcp_flags: int, now: float) -> Flow:
        flow = self.flows.get(key)
        if flow is None:
            flow = self.flows[key] = Flow(key, now)
            if len(self.flows) > self.max_flows:
                _, gone = self.flows.popitem(last=False)
                self.evicted += 1
                if self._on_evict is not None:
                    self._on_evict(gone)
        else:
            self.flows.move_to_end(key)
        flow.samples += 1
        flow.packets += n
        flow.bytes += n * length
        flow.window_bytes += n * length
        flow.last_seen = now
        if tcp_flags:
            flow.syn += bool(tcp_flags & TCP_SYN)
            flow.fin += bool(tcp_flags & TCP_FIN)
            flow.rst += bool(tcp_flags & TCP_RST)
        return flow

    def roll_rates(self, seconds: float) -> None:
        """Turn the bytes counted since the last call into a per-second rate."""
        for flow in self.flows.values():
            flow.rate_bytes = flow.window_bytes / seconds if seconds > 0 else 0.0
            flow.recent_bytes += flow.window_bytes
            flow.window_bytes = 0

    def top(self, count: int) -> list[Flow]:
        """The ``count`` flows with the most bytes since they were first seen."""
        return heapq.nlargest(count, self.flows.values(), key=lambda f: f.bytes)

    def top_recent(self, count: int) -> list[Flow]:
        """The ``count`` flows with the most bytes rolled since the last call (ties, such as flows that sent
        nothing, by bytes since first seen), so a flow that stopped sending gives its place to one that sends;
        starts the next window."""
        top = heapq.nlargest(count, self.flows.values(), key=lambda f: (f.recent_bytes, f.bytes))
        for flow in self.flows.values():
            flow.recent_bytes = 0
        return top

