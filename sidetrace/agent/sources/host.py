"""Host source: CPU, load, memory, paging, filesystems, disks, network interfaces and routes.

Metric names are the OpenTelemetry hostmetrics semantic conventions as Prometheus translates
them (``system.network.io`` with unit ``By`` becomes ``system_network_io_bytes_total``), so
dashboards built for the OpenTelemetry Collector's hostmetrics receiver work unchanged.

Collection runs on a timer in a worker thread (psutil and /proc reads block); each scrape serves
the latest complete snapshot, swapped in as one reference, so concurrent scrapes are consistent.
Each collector is isolated: one that fails (permission denied, an interface gone between two
reads) is counted and logged once, and every other collector's metrics stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from sidetrace.agent.components import Context
from sidetrace.agent.faults import FaultLog
from sidetrace.config import HostSection

log = logging.getLogger("sidetrace.host")

DIRECTIONS = (("receive", "recv"), ("transmit", "sent"))

# /proc/net/tcp state codes, named as the hostmetrics receiver names them.
TCP_STATES = {
    "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT_1", "05": "FIN_WAIT_2",
    "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN",
    "0B": "CLOSING",
}
RTF_UP = 0x0001
RTF_REJECT = 0x0200
FAMILIES = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6", psutil.AF_LINK: "link"}


class DeviceFilter:
    """Chooses which devices of one kind are exported: include, exclude, then a sticky cap.

    Devices exported at the last scan keep their place, so a burst of new veth interfaces
    cannot push out a long-lived eth0; newcomers fill free places in name order.
    """

    def __init__(self, include: Iterable[str], exclude: Iterable[str], limit: int) -> None:
        self._include = [re.compile(p) for p in include]
        self._exclude = [re.compile(p) for p in exclude]
        self._limit = limit
        self._kept: set[str] = set()
        self.over_limit = 0

    def wanted(self, name: str) -> bool:
        if self._include and not any(p.fullmatch(name) for p in self._include):
            return False
        return not any(p.fullmatch(name) for p in self._exclude)

    def exported(self, name: str) -> bool:
        """Whether ``name`` was exported at the last ``select``; other collectors follow it."""
        return name in self._kept

    def select(self, names: Iterable[str]) -> set[str]:
        wanted = sorted({name for name in names if self.wanted(name)})
        kept = [name for name in wanted if name in self._kept][: self._limit]
        for name in wanted:
            if len(kept) >= self._limit:
                break
            if name not in self._kept:
                kept.append(name)
        self._kept = set(kept)
        self.over_limit = len(wanted) - len(kept)
        return self._kept


def _cpu() -> Iterator[Metric]:
    family = CounterMetricFamily(
        "system_cpu_time_seconds_total", "Seconds each logical CPU spent in each mode.", labels=["cpu", "state"],
        unit="seconds",
    )
    for index, times in enumerate(psutil.cpu_times(percpu=True)):
        values = times._asdict()
        for state, field in (("user", "user"), ("system", "system"), ("idle", "idle"), ("nice", "nice"),
                             ("interrupt", "irq"), ("softirq", "softirq"), ("steal", "steal"), ("wait", "iowait")):
            if field in values:
                family.add_metric([f"cpu{index}", state], values[field])
    yield family


def _load() -> Iterator[Metric]:
    names = ("system_cpu_load_average_1m", "system_cpu_load_average_5m", "system_cpu_load_average_15m")
    for name, value in zip(names, os.getloadavg(), strict=True):
        yield GaugeMetricFamily(name, f"Load average over {name.rsplit('_', 1)[1]}.", value=value)


def _memory() -> Iterator[Metric]:
    memory = psutil.virtual_memory()
    usage = GaugeMetricFamily("system_memory_usage_bytes", "Memory in use by state.", labels=["state"], unit="bytes")
    for state, field in (("used", "used"), ("free", "free"), ("buffered", "buffers"), ("cached", "cached")):
        if hasattr(memory, field):
            usage.add_metric([state], getattr(memory, field))
    yield usage
    yield GaugeMetricFamily("system_memory_limit_bytes", "Total memory.", value=memory.total, unit="bytes")
    yield GaugeMetricFamily(
        "system_memory_utilization_ratio", "Share of memory not available.", value=1 - memory.available / memory.total,
        unit="ratio",
    )


def _paging(proc: str) -> Iterator[Metric]:
    family = GaugeMetricFamily(
        "system_paging_usage_bytes", "Swap space by device and state.", labels=["device", "state"], unit="bytes"
    )
    for line in _table(f"{proc}/swaps"):
        parts = line.split()
        if len(parts) >= 4:
            size, used = int(parts[2]) * 1024, int(parts[3]) * 1024
            family.add_metric([parts[0], "used"], used)
            family.add_metric([parts[0], "free"], size - used)
    yield family


class HostSource:
    """Periodic host metrics, under the OpenTelemetry hostmetrics names."""

    def __init__(self, section: HostSection, context: Context, proc: str = "/proc") -> None:
        self.section = section
        self._proc = proc
        self._filters = {
            kind: DeviceFilter(section.include_devices, section.exclude_devices, section.max_devices)
            for kind in ("network", "disk", "filesystem")
        }
        self._routes_over_limit = 0
        self._snapshot: list[Metric] = []
        self._durations: dict[str, float] = {}
        self._scans = 0
        self._last_scan_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._state = "created"
        self._collectors: tuple[tuple[str, Callable[[], Iterator[Metric]]], ...] = (
            ("cpu", _cpu),
            ("load", _load),
            ("memory", _memory),
            ("paging", lambda: _paging(self._proc)),
            ("filesystem", self._filesystem),
            ("disk", self._disk),
            ("network", self._network),
            ("connections", self._connections),
            ("interfaces", self._interfaces),
            ("routes", self._routes),
        )
        self._faults = FaultLog("host", log, tuple(name for name, _ in self._collectors))

    # component -----------------------------------------------------------------------------

    async def start(self) -> None:
        self._state = "starting"
        await asyncio.to_thread(self.scan)
        self._task = asyncio.create_task(self._run(), name="host-source")
        self._state = "running"

    async def stop(self) -> None:
        self._state = "stopping"
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._state = "stopped"

    def status(self) -> dict[str, Any]:
        age = None if self._last_scan_at is None else round(time.monotonic() - self._last_scan_at, 1)
        return {
            "state": self._state,
            "detail": f"every {self.section.interval_seconds:g} s, last scan "
            f"{sum(self._durations.values()) * 1000:.1f} ms, {age} s ago",
            "last_error": self._faults.last_error,
            "scans": self._scans,
        }

    async def _run(self) -> None:
        interval = self.section.interval_seconds
        deadline = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(0.0, deadline - time.monotonic()))
            # A scan slower than the interval delays the next one instead of stacking threads.
            deadline = max(deadline + interval, time.monotonic())
            await asyncio.to_thread(self.scan)

    # collection ------------------------------------------------------------------------------

    def scan(self) -> None:
        """Run every collector once and swap in the new snapshot."""
        snapshot: list[Metric] = []
        durations: dict[str, float] = {}
        for name, collector in self._collectors:
            started = time.perf_counter()
            try:
                snapshot.extend(collector())
            except Exception as exc:  # one collector's fault must not cost the others
                self._faults.record(name, exc)
            durations[name] = time.perf_counter() - started
        self._snapshot, self._durations = snapshot, durations
        self._scans += 1
        self._last_scan_at = time.monotonic()

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's Collector interface: the latest snapshot plus the source's own metrics."""
        snapshot, durations = self._snapshot, self._durations
        yield from snapshot
        duration = GaugeMetricFamily(
            "sidetrace_source_collection_duration_seconds",
            "Seconds the last collection took, by source and collector.",
            labels=["source", "collector"],
            unit="seconds",
        )
        for name, seconds in durations.items():
            duration.add_metric(["host", name], seconds)
        yield duration
        scans = CounterMetricFamily("sidetrace_source_collections_total", "Collections run, by source.",
                                    labels=["source"])
        scans.add_metric(["host"], self._scans)
        yield scans
        over = GaugeMetricFamily(
            "sidetrace_host_devices_over_limit",
            "Devices left out at the last scan because [host] max_devices was reached, by kind.",
            labels=["kind"],
        )
        for kind, device_filter in self._filters.items():
            over.add_metric([kind], device_filter.over_limit)
        yield over
        yield GaugeMetricFamily(
            "sidetrace_host_routes_over_limit",
            "Routes left out at the last scan because [host] max_routes was reached.",
            value=self._routes_over_limit,
        )
        yield from self._faults.families()

    def _filesystem(self) -> Iterator[Metric]:
        labels = ["device", "mode", "mountpoint", "type", "state"]
        usage = GaugeMetricFamily("system_filesystem_usage_bytes", "Filesystem space by state.", labels=labels,
                                  unit="bytes")
        inodes = GaugeMetricFamily("system_filesystem_inodes_usage", "Filesystem inodes by state.", labels=labels)
        partitions = psutil.disk_partitions(all=False)
        kept = self._filters["filesystem"].select(p.device for p in partitions)
        for part in partitions:
            if part.device not in kept:
                continue
            stat = os.statvfs(part.mountpoint)
            mode = "ro" if "ro" in part.opts.split(",") else "rw"
            base = [part.device, mode, part.mountpoint, part.fstype]
            usage.add_metric([*base, "used"], (stat.f_blocks - stat.f_bfree) * stat.f_frsize)
            usage.add_metric([*base, "free"], stat.f_bavail * stat.f_frsize)
            usage.add_metric([*base, "reserved"], (stat.f_bfree - stat.f_bavail) * stat.f_frsize)
            inodes.add_metric([*base, "used"], stat.f_files - stat.f_ffree)
            inodes.add_metric([*base, "free"], stat.f_ffree)
        yield usage
        yield inodes

    def _disk(self) -> Iterator[Metric]:
        counters = psutil.disk_io_counters(perdisk=True) or {}
        kept = self._filters["disk"].select(counters)
        io = CounterMetricFamily("system_disk_io_bytes_total", "Bytes read and written.",
                                 labels=["device", "direction"], unit="bytes")
        ops = CounterMetricFamily("system_disk_operations_total", "Read and write operations.",
                                  labels=["device", "direction"])
        op_time = CounterMetricFamily("system_disk_operation_time_seconds_total", "Time spent in reads and writes.",
                                      labels=["device", "direction"], unit="seconds")
        io_time = CounterMetricFamily("system_disk_io_time_seconds_total", "Time the disk was busy.", labels=["device"],
                                      unit="seconds")
        for device in sorted(kept):
            c = counters[device]
            for direction in ("read", "write"):
                io.add_metric([device, direction], getattr(c, f"{direction}_bytes"))
                ops.add_metric([device, direction], getattr(c, f"{direction}_count"))
                op_time.add_metric([device, direction], getattr(c, f"{direction}_time") / 1000)
            if hasattr(c, "busy_time"):
                io_time.add_metric([device], c.busy_time / 1000)
        yield from (io, ops, op_time, io_time)

    def _network(self) -> Iterator[Metric]:
        counters = psutil.net_io_counters(pernic=True)
        kept = self._filters["network"].select(counters)
        labels = ["device", "direction"]
        io = CounterMetricFamily("system_network_io_bytes_total", "Bytes received and transmitted.", labels=labels,
                                 unit="bytes")
        packets = CounterMetricFamily("system_network_packets_total", "Packets received and transmitted.",
                                      labels=labels)
        errors = CounterMetricFamily("system_network_errors_total", "Receive and transmit errors.", labels=labels)
        dropped = CounterMetricFamily("system_network_dropped_total", "Packets dropped.", labels=labels)
        for device in sorted(kept):
            c = counters[device]
            for direction, suffix in DIRECTIONS:
                io.add_metric([device, direction], getattr(c, f"bytes_{suffix}"))
                packets.add_metric([device, direction], getattr(c, f"packets_{suffix}"))
            errors.add_metric([device, "receive"], c.errin)
            errors.add_metric([device, "transmit"], c.errout)
            dropped.add_metric([device, "receive"], c.dropin)
            dropped.add_metric([device, "transmit"], c.dropout)
        yield from (io, packets, errors, dropped)

    def _connections(self) -> Iterator[Metric]:
        # Read /proc/net/tcp directly: psutil.net_connections() also walks every process's fds
        # to find owners, which costs far more on a busy host and is not needed for counts.
        counts = dict.fromkeys(TCP_STATES.values(), 0)
        for name in ("tcp", "tcp6"):
            for line in _table(f"{self._proc}/net/{name}", optional=name == "tcp6"):
                state = TCP_STATES.get(line[34:36])
                if state is None:  # wider columns on hosts with many sockets
                    parts = line.split()
                    state = TCP_STATES.get(parts[3] if len(parts) > 3 else "")
                if state is not None:
                    counts[state] += 1
        family = GaugeMetricFamily("system_network_connections", "TCP connections by state.",
                                   labels=["protocol", "state"])
        for state, count in counts.items():
            family.add_metric(["tcp", state], count)
        yield family

    def _interfaces(self) -> Iterator[Metric]:
        addrs = psutil.net_if_addrs()
        stats = psutil.net_if_stats()
        exported = self._filters["network"].exported
        family = GaugeMetricFamily(
            "system_network_interface_info",
            "One series per interface address: family, netmask, MTU and whether the link is up.",
            labels=["device", "address", "family", "netmask", "mtu", "up"],
        )
        for device in sorted(addrs):
            if not exported(device):
                continue
            stat = stats.get(device)
            mtu = str(stat.mtu) if stat else ""
            up = "true" if stat and stat.isup else "false"
            for addr in addrs[device]:
                family_name = FAMILIES.get(addr.family)
                if family_name is not None:
                    family.add_metric([device, addr.address, family_name, addr.netmask or "", mtu, up], 1)
        yield family

    def _routes(self) -> Iterator[Metric]:
        routes = list(self._read_routes())
        exported = self._filters["network"].exported
        routes = [r for r in routes if exported(r[3])]
        self._routes_over_limit = max(0, len(routes) - self.section.max_routes)
        family = GaugeMetricFamily(
            "system_network_route_info",
            "The kernel routing table (main and local tables as /proc shows them), one series per route.",
            labels=["destination", "gateway", "netmask", "device"],
        )
        for route in sorted(routes)[: self.section.max_routes]:
            family.add_metric(list(route), 1)
        yield family

    def _read_routes(self) -> Iterator[tuple[str, str, str, str]]:
        for line in _table(f"{self._proc}/net/route"):
            f = line.split()
            if len(f) < 8 or not int(f[3], 16) & RTF_UP or int(f[3], 16) & RTF_REJECT:
                continue
            yield _ipv4(f[1]), _ipv4(f[2]), _ipv4(f[7]), f[0]
        for line in _table(f"{self._proc}/net/ipv6_route", optional=True, header=False):
            f = line.split()
            if len(f) < 10 or not int(f[8], 16) & RTF_UP or int(f[8], 16) & RTF_REJECT:
                continue
            netmask = str(ipaddress.IPv6Network(f"::/{int(f[1], 16)}").netmask)
            yield _ipv6(f[0]), _ipv6(f[4]), netmask, f[9]


def _table(path: str, optional: bool = False, header: bool = True) -> Iterator[str]:
    """The lines of a /proc table; nothing for an ``optional`` one that is absent (IPv6 off)."""
    try:
        with open(path) as handle:
            if header:
                next(handle, None)
            yield from handle
    except FileNotFoundError:
        if not optional:
            raise


def _ipv4(little_endian_hex: str) -> str:
    return socket.inet_ntoa(int(little_endian_hex, 16).to_bytes(4, "little"))


def _ipv6(hex32: str) -> str:
    return str(ipaddress.IPv6Address(bytes.fromhex(hex32)))
