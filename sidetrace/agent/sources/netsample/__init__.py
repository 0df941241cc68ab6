"""Network traffic sampling: kernel-side 1-in-N sampling on AF_PACKET sockets, flows with error bounds,
per-process attribution and packet sizes, the way sFlow's host agent samples but down to processes.

Per interface, an AF_PACKET socket carries a classic BPF program (the optional capture filter, then
the kernel's random 1-in-N draw), so user space touches only the sample; a thread reads it (off the
event loop), parses headers and updates the flow table. With ``sampling_rate = "auto"`` N is
re-chosen every second so that about ``target_samples_per_second`` samples arrive; every estimate
uses the N in force when its sample was read (a packet queued under the old N and read just after
a change is credited with the new one: the window is the time to swap the filter, and what a drain
bounded to DRAIN_MAX_SAMPLES / DRAIN_MAX_SECONDS leaves queued). A frame longer than the SNAPLEN bytes
kept counts the length its IP header states. Kernel drops
come from PACKET_STATISTICS. Needs CAP_NET_RAW only; without it the source says so once and every
other source keeps working.

Per-process series count every sample from the first one. A sample whose flow's process is not known yet is
held on the flow; the next read of the process table started after it moves what the flow holds to the
process's series, or to its owner's ("user:NAME", see ProcessMap) when the socket is there but its process
cannot be found (another user's, to an agent without CAP_SYS_PTRACE), or to process="unknown" when the table
has no socket for the flow's local end, or when the flow is evicted first. So once nothing is held, the
per-process series of a device and direction add up exactly to its packet size histogram's ``_count`` and
``_sum``, less the counts of series retired while their name was idle: a name whose series have not grown for
``process_idle_seconds`` gives its place under ``max_processes`` up and its series leave /metrics; their
counts are kept (the last MAX_RETIRED_PROCESS_SERIES), so a name that comes back carries on from them.

With ``interfaces = []`` an interface that is gone has its sampler forgotten at the next look (every 5 s);
its traffic, size, per-process and top-flow series and its flows are dropped together at the first
housekeeping tick ``gone_interface_grace_seconds`` after that (or at once past MAX_GONE_DEVICES gone ones),
so every device that keeps series keeps all of them and its sums still hold. The flows let go are counted
as evicted with reason ``interface_gone`` (those evicted at ``max_flows`` have reason ``max_flows``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pwd
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from sidetrace.agent.components import Context
from sidetrace.agent.sources.netsample import bpf
from sidetrace.agent.sources.netsample.flows import Flow, FlowTable
from sidetrace.agent.sources.netsample.packets import parse
from sidetrace.config import NetsampleSourceSection

log = logging.getLogger("sidetrace.netsample")

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23
PACKET_OUTGOING = 4
INITIAL_AUTO_RATE = 16
MAX_RATE = 1 << 24
EXPORT_REFRESH_SECONDS = 5.0
ATTRIBUTION_REFRESH_SECONDS = 5.0
# A rate change first reads what the old filter queued (so it is credited with the old N), holding the
# source's lock: at most this many samples or this long, so a scrape never waits longer than that.
DRAIN_MAX_SAMPLES = 8192
DRAIN_MAX_SECONDS = 0.1
SIZE_BUCKETS = (64, 128, 256, 512, 1024, 1518, 4096, 9000)
# Interfaces gone but still within [sources.netsample] gone_interface_grace_seconds: past this many, the series
# of the one gone longest are dropped at once, so the devices with series are at most those present plus these.
MAX_GONE_DEVICES = 16
# Per-process series whose name went idle for [sources.netsample] process_idle_seconds leave /metrics; the counts
# of at most this many are kept (the most recently retired), so a name that comes back carries on from them.
MAX_RETIRED_PROCESS_SERIES = 4096
UNKNOWN, OTHER = "unknown", "other"
USER_PREFIX = "user:"  # a socket's owner, where its process cannot be found


# The kernel's socket tables of the agent's network namespace: /proc/net is a link to /proc/self/net, which
# stays visible where systemd's ProcSubset=pid hides /proc/net. (file, protocol, address family)
SOCKET_TABLES = (("tcp", "tcp", socket.AF_INET), ("tcp6", "tcp", socket.AF_INET6), ("udp", "udp", socket.AF_INET),
                 ("udp6", "udp", socket.AF_INET6))
SOCKET_TABLES_DIR = "/proc/self/net"


def socket_owners() -> dict[tuple[str, str, int], int]:
    """Local (protocol, address, port) -> the uid owning a socket bound there, from the kernel's socket tables.

    A line with inode 0 belongs to no open socket (TCP's TIME_WAIT, a socket closed before its connection
    ended): it has no owner, so its end is left out, as psutil leaves it out. A table the kernel does not
    have (no IPv6) is skipped."""
    owners: dict[tuple[str, str, int], int] = {}
    addresses: dict[str, str] = {}  # most ends share a few addresses: each is converted once
    for name, protocol, family in SOCKET_TABLES:
        try:
            with open(f"{SOCKET_TABLES_DIR}/{name}", encoding="ascii") as table:
                lines = table.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        words = "=I" if family == socket.AF_INET else "=4I"
        for line in lines:
            fields = line.split(maxsplit=10)
            if fields[9] == "0":
                continue
            address, port = fields[1].split(":")
            text = addresses.get(address)
            if text is None:  # the kernel prints each 32-bit word of the address as a number in host byte order
                raw = struct.pack(words, *(int(address[i:i + 8], 16) for i in range(0, len(address), 8)))
                text = addresses[address] = socket.inet_ntop(family, raw)
            owners[(protocol, text, int(port, 16))] = int(fields[7])
    return owners


def user_labels(owners: dict[tuple[str, str, int], int]) -> dict[tuple[str, str, int], str]:
    """Each end's owner as ``user:NAME``, or ``user:UID`` for a uid with no passwd entry. Names are looked up at
    each read (once per uid), as a dynamic user's uid can belong to another service later."""
    labels: dict[int, str] = {}
    for uid in set(owners.values()):
        try:
            labels[uid] = USER_PREFIX + pwd.getpwuid(uid).pw_name
        except KeyError:
            labels[uid] = f"{USER_PREFIX}{uid}"
    return {endpoint: labels[uid] for endpoint, uid in owners.items()}


class ProcessMap:
    """Local (protocol, address, port) -> process name, from psutil's connection table; or, for a socket whose
    process cannot be found, ``user:NAME`` (``user:UID`` without a passwd entry) of its owner, from the kernel's
    socket tables.

    The table walks every process's descriptors, so it is refreshed at most every few seconds and only
    when a flow is still unattributed. Another user's descriptors are closed to an agent without
    CAP_SYS_PTRACE (the shipped unit's), so psutil finds no pid for their sockets; the kernel's socket tables
    (world-readable) still give each socket's owner uid: that of the process that created the socket, which is
    not the uid of a process that took it over (one made by root, or by systemd for socket activation, and
    used after a change of user, is root's).
    """

    def __init__(self) -> None:
        self._by_endpoint: dict[tuple[str, str, int], str] = {}
        self._names: dict[int, str] = {}
        self._refreshed = 0.0
        self.refreshes = 0
        self.version = 0  # bumped once a read's table is in place: a lookup in the same version answers the same

    def refresh(self) -> int:
        """Read the table again; returns its number, counted before the walk starts, so a sample taken
        while ``refreshes`` was lower came before the walk (its socket, if still open, is in the table)."""
        self.refreshes += 1
        number = self.refreshes
        self._refreshed = time.monotonic()  # a walk that fails is tried again no sooner than a good one
        # Users first, so that a process found for the same end replaces its user's label.
        by_endpoint = user_labels(socket_owners())
        for conn in psutil.net_connections(kind="inet"):
            if not conn.laddr or conn.pid is None:
                continue
            name = self._names.get(conn.pid)
            if name is None:
                try:
                    name = self._names[conn.pid] = psutil.Process(conn.pid).name()
                except psutil.Error:
                    continue
            protocol = "tcp" if conn.type == socket.SOCK_STREAM else "udp"
            by_endpoint[(protocol, conn.laddr.ip, conn.laddr.port)] = name
        self._by_endpoint = by_endpoint
        self.version += 1
        if len(self._names) > 10_000:
            self._names.clear()
        return number

    def due(self) -> bool:
        return time.monotonic() - self._refreshed >= ATTRIBUTION_REFRESH_SECONDS

    def lookup(self, protocol: str, address: str, port: int) -> str:
        """The process of a local end: its exact address, then (IPv4) the IPv4-mapped form a dual-stack IPv6
        socket shows, then the wildcards (an IPv4 packet can reach a dual-stack socket bound to ``::``)."""
        table = self._by_endpoint
        name = table.get((protocol, address, port))
        if name:
            return name
        if ":" not in address:
            name = table.get((protocol, "::ffff:" + address, port)) or table.get((protocol, "0.0.0.0", port))
        return name or table.get((protocol, "::", port)) or ""


class Sampler:
    """One interface: its socket, its rate, its reading thread."""

    def __init__(self, device: str, source: NetsampleSource) -> None:
        self.device = device
        self.source = source
        self.rate = source.section.sampling_rate if isinstance(source.section.sampling_rate, int) \
            else INITIAL_AUTO_RATE
        self.samples = 0
        self.window_samples = 0
        self.kernel_packets = 0
        self.kernel_drops = 0
        self.malformed = 0
        self.errors = 0
        self.last_error: str | None = None
        self.sock: socket.socket | None = None
        # The same socket without a timeout, for draining: a socket with a timeout waits for data even
        # with MSG_DONTWAIT (Python polls first) and raises TimeoutError instead of BlockingIOError.
        self.drain_sock: socket.socket | None = None
        self.user_filter: list[bpf.Instruction] | None = None
        self.thread: threading.Thread | None = None
        self.state = "created"

    def open(self) -> None:
        # Protocol 0 receives nothing until bind: no packet slips in before the filter is attached.
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.source.section.receive_buffer_bytes)
            if self.device == "lo":  # each loopback packet also shows as outgoing: count it once
                sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            if self.source.section.filter:
                self.user_filter = bpf.compile_filter(self.source.section.filter, self.device)
            bpf.attach(sock, bpf.program(self.rate, self.user_filter))
            sock.bind((self.device, ETH_P_ALL))  # Python converts to network order itself
            sock.settimeout(0.25)
            drain_sock = sock.dup()
            drain_sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.sock, self.drain_sock = sock, drain_sock
        self.state = "running"

    def set_rate(self, rate: int) -> None:
        """Swap the kernel filter for one sampling 1 in ``rate``; drain what the old N sampled first."""
        sock, drain_sock = self.sock, self.drain_sock
        if sock is None or drain_sock is None or rate == self.rate:
            return
        with self.source.lock:
            self._drain(drain_sock)
            bpf.attach(sock, bpf.program(rate, self.user_filter))
            self.rate = rate

    def _drain(self, sock: socket.socket) -> int:
        """Record what is queued, up to DRAIN_MAX_SAMPLES or DRAIN_MAX_SECONDS; returns how many were read."""
        buffer = bytearray(bpf.SNAPLEN)
        deadline = time.monotonic() + DRAIN_MAX_SECONDS
        for count in range(DRAIN_MAX_SAMPLES):
            if count % 64 == 63 and time.monotonic() > deadline:
                return count
            try:
                length, address = sock.recvfrom_into(buffer, bpf.SNAPLEN, socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                return count
            self.source.record(self, buffer, length, address)
        return DRAIN_MAX_SAMPLES

    def read_statistics(self) -> None:
        if self.sock is None:
            return
        packets, drops = struct.unpack("II", self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        self.kernel_packets += packets  # the kernel resets its counters on every read
        self.kernel_drops += drops

    def run(self, stop: threading.Event) -> None:
        buffer = bytearray(bpf.SNAPLEN)
        sock = self.sock
        assert sock is not None
        while not stop.is_set():
            try:
                length, address = sock.recvfrom_into(buffer, bpf.SNAPLEN, socket.MSG_TRUNC)
            except TimeoutError:
                continue
            except OSError as exc:  # the interface went away, or the socket was closed under us
                if stop.is_set():
                    return
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.state = "failed"
                log.warning("netsample %s stopped: %s", self.device, exc)
                return
            with self.source.lock:
                self.source.record(self, buffer, length, address)

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.read_statistics()
            self.sock.close()
            self.sock = None
        if self.drain_sock is not None:
            self.drain_sock.close()
            self.drain_sock = None


class NetsampleSource:
    """The `netsample` source (see the module docstring)."""

    def __init__(self, section: NetsampleSourceSection, context: Context) -> None:
        self.section = section
        self._links = context.links
        self.lock = threading.Lock()
        self.flows = FlowTable(section.max_flows, evicted=self._evicted)
        self.processes = ProcessMap()
        self.samplers: dict[str, Sampler] = {}
        self._stop = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self._state = "created"
        self._last_error: str | None = None
        # Cumulative estimate series: labels -> [packets, bytes]. A flow is exported with its own labels
        # from the moment it joins the top set; samples of other flows go to the "other" series. A flow
        # that leaves the top set (or the table) hands its series' counts to "other" and the series is
        # dropped, so there are at most top_flows series besides "other", and every counter only grows.
        self._series: dict[tuple[str, ...], list[int]] = {}
        self._exported: dict[tuple, tuple[str, ...]] = {}
        self._sizes: dict[tuple[str, str], list[int]] = {}
        self._size_sums: dict[tuple[str, str], int] = {}
        # Per-process series: (device, direction, process) -> [packets, bytes, samples]. Flows keep a
        # reference to theirs, so a sample of a known flow costs two additions (and a count).
        self._process_series: dict[tuple[str, str, str], list[int]] = {}
        # Names with series of their own (at most max_processes) -> monotonic time one of their series last grew;
        # a name idle for process_idle_seconds gives up its place (see _retire_idle_processes).
        self._process_seen: dict[str, float] = {}
        self._process_checked: dict[tuple[str, str, str], int] = {}  # series -> its samples when last looked at
        self._retired_processes: OrderedDict[tuple[str, str, str], list[int]] = OrderedDict()
        self._unattributed = False
        self.housekeeping_errors = 0
        self._failing: dict[str, str] = {}  # housekeeping step -> the reason it failed last, until it works again
        # With interfaces = []: device -> monotonic time its sampler was forgotten, oldest first (see _drop_gone).
        self._gone: dict[str, float] = {}
        self.gone_flows = 0  # flows let go with the series of their interface (see _drop_gone)

    # component -------------------------------------------------------------------------------

    async def start(self) -> None:
        devices = list(self.section.interfaces) or [
            name for name, stats in psutil.net_if_stats().items() if stats.isup and name != "lo"]
        for device in devices:
            sampler = Sampler(device, self)
            try:
                sampler.open()
            except PermissionError:
                self._state = "no permission"
                self._last_error = ("needs CAP_NET_RAW to open AF_PACKET sockets (run as root, or grant it: "
                                    "AmbientCapabilities=CAP_NET_RAW); not sampling, other sources keep working")
                log.error("netsample %s", self._last_error)
                break
            except (OSError, ValueError) as exc:
                sampler.state, sampler.last_error = "failed", f"{type(exc).__name__}: {exc}"
                log.error("netsample cannot sample %s: %s", device, exc)
            self.samplers[device] = sampler
        for sampler in self.samplers.values():
            if sampler.sock is not None:
                sampler.thread = threading.Thread(target=sampler.run, args=(self._stop,), daemon=True,
                                                  name=f"netsample-{sampler.device}")
                sampler.thread.start()
        if self._state != "no permission":
            self._state = "running"
        self._links.flows.bind(self)
        self._task = asyncio.create_task(self._housekeeping(), name="netsample")

    async def stop(self) -> None:
        self._links.flows.unbind(self)
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for sampler in self.samplers.values():
            if sampler.thread is not None:
                await asyncio.to_thread(sampler.thread.join, 2)
            sampler.close()
        self._state = "stopped"

    def status(self) -> dict[str, Any]:
        detail = ", ".join(f"{s.device} 1:{s.rate} {s.state}" for s in self.samplers.values())
        errors = [f"{s.device}: {s.last_error}" for s in self.samplers.values() if s.last_error]
        state = self._state
        if state == "running" and self.samplers and all(s.state == "failed" for s in self.samplers.values()):
            state = "failing"  # configured to sample, yet no interface is sampled: not ready
        return {"state": state, "detail": detail or "no interface",
                "last_error": self._last_error or ("; ".join(errors) or None)}

    # sampling --------------------------------------------------------------------------------

    def record(self, sampler: Sampler, frame: bytearray, length: int, address: tuple) -> None:
        """Account one sampled frame (called with ``lock`` held)."""
        sampler.samples += 1
        sampler.window_samples += 1
        packet = parse(memoryview(frame)[: min(length, bpf.SNAPLEN)], address[3])
        if packet is None:
            sampler.malformed += 1
            return
        if length >= bpf.SNAPLEN and packet.length > length:
            # The filter's accept cut the frame to SNAPLEN and recv reports the cut length (MSG_TRUNC gives
            # the length after the cut on AF_PACKET): the IP header has the real one.
            length = packet.length
        outgoing = address[2] == PACKET_OUTGOING
        direction = "transmit" if outgoing else "receive"
        if outgoing:
            local, local_port, remote, remote_port = packet.src, packet.sport, packet.dst, packet.dport
        else:
            local, local_port, remote, remote_port = packet.dst, packet.dport, packet.src, packet.sport
        n = sampler.rate
        key = (sampler.device, direction, packet.protocol, local, local_port, remote, remote_port)
        flow = self.flows.add(key, length, n, packet.tcp_flags, time.time())
        counter = flow.counter
        if counter is None:
            if flow.process:  # its series was retired, or it was under "other" when places were freed
                counter = flow.counter = self._process_counter(sampler.device, direction, flow.process)
            elif flow.looked_up != self.processes.version:  # else: not found in this table already
                flow.looked_up = self.processes.version
                process = self.processes.lookup(packet.protocol, local, local_port)
                if process:
                    counter = self._attribute(flow, process)
        if counter is not None:
            counter[0] += n
            counter[1] += n * length
            counter[2] += 1
        else:  # held until the next read of the process table (see the module docstring)
            if not flow.held_samples:
                flow.held_epoch = self.processes.refreshes
            flow.held_packets += n
            flow.held_bytes += n * length
            flow.held_samples += 1
            self._unattributed = True
        labels = self._exported.get(key) or (sampler.device, direction, "other", "other", "", "")
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [0, 0]
        series[0] += n
        series[1] += n * length
        size_key = (sampler.device, direction)
        buckets = self._sizes.get(size_key)
        if buckets is None:
            buckets = self._sizes[size_key] = [0] * (len(SIZE_BUCKETS) + 1)
        index = next((i for i, bound in enumerate(SIZE_BUCKETS) if length <= bound), len(SIZE_BUCKETS))
        buckets[index] += n
        self._size_sums[size_key] = self._size_sums.get(size_key, 0) + n * length

    def _process_counter(self, device: str, direction: str, process: str) -> list[int]:
        """The series a flow's samples go to: its process's, or "other" past ``max_processes`` names. A series
        retired while its name was idle comes back with its counts."""
        if process not in self._process_seen and process not in (UNKNOWN, OTHER):
            if len(self._process_seen) < self.section.max_processes:
                self._process_seen[process] = time.monotonic()
            else:
                process = OTHER
        key = (device, direction, process)
        counter = self._process_series.get(key)
        if counter is None:
            counter = self._process_series[key] = self._retired_processes.pop(key, None) or [0, 0, 0]
        return counter

    def _retire_idle_processes(self) -> None:
        """Free the places of names whose series have not grown for ``process_idle_seconds`` (every 5 s).

        Their series leave /metrics but their counts are kept (up to MAX_RETIRED_PROCESS_SERIES series), so a name
        that comes back carries on from where it was and Prometheus reads the increase, never a reset. Flows that
        fed them, and flows counted under "other" for want of a place, find their series again at their next sample.
        """
        now = time.monotonic()
        with self.lock:
            seen, checked = self._process_seen, self._process_checked
            for key, counter in self._process_series.items():
                if key[2] in seen and checked.get(key) != counter[2]:
                    checked[key] = counter[2]
                    seen[key[2]] = now
            idle = {name for name, at in seen.items() if now - at >= self.section.process_idle_seconds}
            if not idle:
                return
            released = {id(counter) for key, counter in self._process_series.items() if key[2] == OTHER}
            for key in [key for key in self._process_series if key[2] in idle]:
                counter = self._process_series.pop(key)
                checked.pop(key, None)
                released.add(id(counter))
                self._retired_processes[key] = counter
            while len(self._retired_processes) > MAX_RETIRED_PROCESS_SERIES:
                self._retired_processes.popitem(last=False)
            for name in idle:
                del seen[name]
            for flow in self.flows.flows.values():
                if flow.counter is not None and id(flow.counter) in released:
                    flow.counter = None

    @staticmethod
    def _release(flow: Flow, counter: list[int]) -> None:
        """Move what ``flow`` holds to ``counter``."""
        counter[0] += flow.held_packets
        counter[1] += flow.held_bytes
        counter[2] += flow.held_samples
        flow.held_packets = flow.held_bytes = flow.held_samples = 0

    def _attribute(self, flow: Flow, process: str) -> list[int]:
        flow.process = process
        counter = flow.counter = self._process_counter(flow.key[0], flow.key[1], process)
        self._release(flow, counter)
        return counter

    def _evicted(self, flow: Flow) -> None:
        """A flow leaves the table (``lock`` held): what it still holds is "unknown"; its top-flow series, if it
        has one, goes to "other"."""
        if flow.held_samples:
            self._release(flow, self._process_counter(flow.key[0], flow.key[1], UNKNOWN))
        labels = self._exported.pop(flow.key, None)
        if labels is not None and labels not in self._exported.values():  # two flows can share labels
            self._retire(labels)

    async def _housekeeping(self) -> None:
        last = time.monotonic()
        last_export = 0.0
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            await asyncio.to_thread(self._tick, now - last, now - last_export >= EXPORT_REFRESH_SECONDS)
            if now - last_export >= EXPORT_REFRESH_SECONDS:
                last_export = now
            last = now

    def _failed(self, step: str, exc: Exception) -> None:
        """One housekeeping step failed: counted, shown by status, and logged once while it fails the same way
        (again when its reason changes, or after it has worked); the other steps still run."""
        self.housekeeping_errors += 1
        reason = f"{type(exc).__name__}: {exc}"
        self._last_error = f"housekeeping ({step}): {reason}"
        if self._failing.get(step) != reason:
            self._failing[step] = reason
            log.error("netsample housekeeping failed (%s): %s (counted in sidetrace_network_housekeeping_errors_total;"
                      " logged again only if the reason changes or after it has worked)", step, reason)

    def _revive(self, sampler: Sampler) -> None:
        """Reopen a sampler whose interface went away, once an interface of that name is back."""
        stats = psutil.net_if_stats().get(sampler.device)
        if stats is None or not stats.isup:
            return
        sampler.close()
        try:
            sampler.open()
        except (OSError, ValueError) as exc:
            sampler.state, sampler.last_error = "failed", f"{type(exc).__name__}: {exc}"
            return
        sampler.last_error = None
        sampler.thread = threading.Thread(target=sampler.run, args=(self._stop,), daemon=True,
                                          name=f"netsample-{sampler.device}")
        sampler.thread.start()
        log.info("netsample %s is back; sampling again", sampler.device)

    def _tick(self, seconds: float, refresh_export: bool) -> None:
        """Each step on its own: a failing one (a rate change, a process table read) stops none of the others."""
        for sampler in list(self.samplers.values()):
            self._step(f"sampler {sampler.device}", lambda sampler=sampler: self._tick_sampler(sampler, seconds))
        self._step("process table", self._attribute_held)
        if refresh_export and not self.section.interfaces and self._state == "running":
            self._step("interfaces", self._discover)
        self._step("gone interfaces", self._drop_gone)
        self._step("flow rates and top flows", lambda: self._roll_flows(seconds, refresh_export))
        if refresh_export:
            self._step("idle process names", self._retire_idle_processes)

    def _step(self, step: str, action: Callable[[], object]) -> None:
        """Run one housekeeping step, failing alone (see _failed); it returns False when it had nothing to do."""
        try:
            done = action()
        except Exception as exc:
            self._failed(step, exc)
        else:
            if done is not False:
                self._failing.pop(step, None)

    def _roll_flows(self, seconds: float, refresh_export: bool) -> None:
        with self.lock:
            self.flows.roll_rates(seconds)
            if refresh_export:
                self._refresh_exported()

    def _refresh_exported(self) -> None:
        """The top set again (``lock`` held): flows that left it hand their series to "other"."""
        top = [flow.key for flow in self.flows.top_recent(self.section.top_flows)]
        previous = self._exported
        self._exported = {key: previous.get(key) or self._labels(key) for key in top}
        in_use = set(self._exported.values())
        for labels in set(previous.values()) - in_use:
            self._retire(labels)

    def _retire(self, labels: tuple[str, ...]) -> None:
        """Drop a top-flow series, adding its counts to the "other" series of its device and direction, so
        every sum stays the same and "other" only grows."""
        series = self._series.pop(labels, None)
        if series is None:
            return
        other_labels = (labels[0], labels[1], "other", "other", "", "")
        other = self._series.get(other_labels)
        if other is None:
            other = self._series[other_labels] = [0, 0]
        other[0] += series[0]
        other[1] += series[1]

    def _discover(self) -> None:
        """With ``interfaces = []``: start sampling each interface that came up since, and forget the samplers of
        interfaces that are gone (a container's veth), so their number stays that of the host's (every 5 s)."""
        present = psutil.net_if_stats()
        gone = [s for s in self.samplers.values() if s.state == "failed" and s.device not in present]
        if gone:
            for sampler in gone:
                sampler.close()
            with self.lock:
                self.samplers = {d: s for d, s in self.samplers.items() if s not in gone}
            now = time.monotonic()
            for sampler in gone:
                self._gone[sampler.device] = now
        for device, stats in present.items():
            if device == "lo" or device in self.samplers or not stats.isup or self._stop.is_set():
                continue
            sampler = Sampler(device, self)
            try:
                sampler.open()
            except (OSError, ValueError) as exc:
                sampler.state, sampler.last_error = "failed", f"{type(exc).__name__}: {exc}"
                log.error("netsample cannot sample %s: %s", device, exc)
            else:
                sampler.thread = threading.Thread(target=sampler.run, args=(self._stop,), daemon=True,
                                                  name=f"netsample-{device}")
                sampler.thread.start()
                log.info("netsample %s is up; sampling it", device)
            with self.lock:
                self.samplers = {**self.samplers, device: sampler}
            self._gone.pop(device, None)  # back within the grace: its series go on

    def _drop_gone(self) -> None:
        """Drop every series of an interface gone for ``gone_interface_grace_seconds`` (or of the one gone longest
        past MAX_GONE_DEVICES) and let its flows go; a device that comes back later starts its counters again."""
        grace = self.section.gone_interface_grace_seconds
        now = time.monotonic()
        excess = len(self._gone) - MAX_GONE_DEVICES
        due = [d for i, (d, since) in enumerate(self._gone.items()) if i < excess or now - since >= grace]
        for device in due:
            del self._gone[device]
        dropped = {device for device in due if device not in self.samplers}
        if not dropped:
            return
        with self.lock:  # one pass for every device due: the flow table is walked once
            keys = [key for key in self.flows.flows if key[0] in dropped]
            for key in keys:
                del self.flows.flows[key]
            self.gone_flows += len(keys)
            self._exported = {key: labels for key, labels in self._exported.items() if key[0] not in dropped}
            self._series = {labels: v for labels, v in self._series.items() if labels[0] not in dropped}
            self._sizes = {key: v for key, v in self._sizes.items() if key[0] not in dropped}
            self._size_sums = {key: v for key, v in self._size_sums.items() if key[0] not in dropped}
            self._process_series = {key: v for key, v in self._process_series.items() if key[0] not in dropped}
            self._process_checked = {key: v for key, v in self._process_checked.items() if key[0] not in dropped}
            self._retired_processes = OrderedDict((key, v) for key, v in self._retired_processes.items()
                                                  if key[0] not in dropped)
        log.info("netsample: the series of %s (gone) are dropped", ", ".join(sorted(dropped)))

    def _tick_sampler(self, sampler: Sampler, seconds: float) -> None:
        if sampler.state == "failed" and self._state == "running":
            self._revive(sampler)
        with contextlib.suppress(OSError):
            sampler.read_statistics()
        window, sampler.window_samples = sampler.window_samples, 0
        if self.section.sampling_rate == "auto" and sampler.sock is not None:
            observed = window / max(seconds, 1e-3)
            target = self.section.target_samples_per_second
            if observed > target * 1.25 or (observed < target / 1.25 and sampler.rate > 1):
                wanted = max(1, min(MAX_RATE, round(sampler.rate * max(observed, 1.0) / target)))
                sampler.set_rate(wanted)

    def _attribute_held(self) -> bool:
        """Read the process table if a flow waits for it and a read is due; False if not read."""
        if not (self._unattributed and self.processes.due()):
            return False
        self._unattributed = False
        try:
            number = self.processes.refresh()
        except BaseException:
            self._unattributed = True  # the next tick tries again
            raise
        with self.lock:
            for flow in self.flows.flows.values():
                if flow.counter is not None or not flow.held_samples:
                    continue
                process = self.processes.lookup(flow.key[2], flow.key[3], flow.key[4])
                if process:
                    self._attribute(flow, process)
                elif flow.held_epoch < number:  # its socket was gone (or never local) when the walk began
                    self._release(flow, self._process_counter(flow.key[0], flow.key[1], UNKNOWN))
                else:  # sampled during the walk: the next read decides
                    self._unattributed = True
        return True

    def _labels(self, key: tuple) -> tuple[str, ...]:
        flow = self.flows.flows.get(key)
        device, direction, protocol, _, _, remote, remote_port = key
        return (device, direction, protocol, remote, str(remote_port or ""),
                (flow.process if flow else "") or "unknown")

    # views ---------------------------------------------------------------------------------------

    def top_flows(self, count: int) -> list[dict[str, Any]]:
        with self.lock:
            return [flow.as_dict() for flow in self.flows.top(count)]

    def debug(self, count: int) -> dict[str, Any]:
        return {
            "interfaces": {s.device: {"sampling_rate": s.rate, "samples": s.samples, "kernel_drops": s.kernel_drops,
                                      "state": s.state, "last_error": s.last_error}
                           for s in self.samplers.values()},
            "flows": self.top_flows(count),
            "flow_count": len(self.flows.flows),
            "evicted_flows": self.flows.evicted + self.gone_flows,
        }

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            samplers = list(self.samplers.values())
            series = [(labels, list(values)) for labels, values in self._series.items()]
            sizes = [(key, list(buckets), self._size_sums.get(key, 0)) for key, buckets in self._sizes.items()]
            processes = [(key, list(values)) for key, values in self._process_series.items()]
            evicted, gone_flows = self.flows.evicted, self.gone_flows
        per_device = (
            ("sidetrace_network_sampled_packets_total", "Packets sampled (read by user space).", "samples", "counter"),
            ("sidetrace_network_sampling_rate", "N of the 1-in-N sampling in force.", "rate", "gauge"),
            ("sidetrace_network_sampler_kernel_drops_total", "Sampled packets the kernel dropped (socket buffer full).",
             "kernel_drops", "counter"),
            ("sidetrace_network_sampler_malformed_packets_total", "Sampled frames that were not parsable IP.",
             "malformed", "counter"),
            ("sidetrace_network_sampler_errors_total", "Read errors (an interface that went away).", "errors",
             "counter"),
        )
        for name, doc, attribute, kind in per_device:
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, doc, labels=["device"])
            for sampler in samplers:
                family.add_metric([sampler.device], getattr(sampler, attribute))
            yield family
        labels = ["device", "direction", "protocol", "remote", "remote_port", "process"]
        packets = CounterMetricFamily("sidetrace_network_estimated_packets_total",
                                      "Packets estimated from samples (samples x N), top flows and other.",
                                      labels=labels)
        octets = CounterMetricFamily("sidetrace_network_estimated_bytes_total", "Bytes estimated from samples.",
                                     labels=labels, unit="bytes")
        for label_values, (count, size) in series:
            packets.add_metric(list(label_values), count)
            octets.add_metric(list(label_values), size)
        yield packets
        yield octets
        histogram = HistogramMetricFamily("sidetrace_network_packet_size_bytes",
                                          "Estimated packets by size (samples x N).",
                                          labels=["device", "direction"], unit="bytes")
        for (device, direction), buckets, total in sizes:
            cumulative, running = [], 0
            for bound, count in zip(SIZE_BUCKETS, buckets, strict=False):
                running += count
                cumulative.append((str(bound), running))
            cumulative.append(("+Inf", running + buckets[-1]))
            histogram.add_metric([device, direction], cumulative, total)
        yield histogram
        process_packets = CounterMetricFamily(
            "sidetrace_network_process_packets_total",
            "Packets estimated from samples (samples x N) by local process; user:NAME: the socket's owner, its "
            "process not found; unknown: no local socket found.",
            labels=["device", "direction", "process"])
        process_bytes = CounterMetricFamily("sidetrace_network_process_bytes_total",
                                            "Bytes estimated from samples by local process.",
                                            labels=["device", "direction", "process"], unit="bytes")
        overflow = 0
        for (device, direction, process), (count, size, samples) in processes:
            process_packets.add_metric([device, direction, process], count)
            process_bytes.add_metric([device, direction, process], size)
            if process == OTHER:
                overflow += samples
        yield process_packets
        yield process_bytes
        yield CounterMetricFamily("sidetrace_network_process_overflow_samples_total",
                                  'Samples counted under process="other": their process came after '
                                  "[sources.netsample] max_processes others.", value=overflow)
        flows_evicted = CounterMetricFamily(
            "sidetrace_network_evicted_flows_total", "Flows let go: reason max_flows (the table was full, the least "
            "recently seen went) or interface_gone (their interface was gone for gone_interface_grace_seconds).",
            labels=["reason"])
        flows_evicted.add_metric(["max_flows"], evicted)
        flows_evicted.add_metric(["interface_gone"], gone_flows)
        yield flows_evicted
        yield CounterMetricFamily("sidetrace_network_housekeeping_errors_total",
                                  "Housekeeping steps (a rate change, a process table read) that failed; the "
                                  "others still ran.", value=self.housekeeping_errors)
        yield CounterMetricFamily("sidetrace_network_attribution_refreshes_total",
                                  "Reads of the process connection table.", value=self.processes.refreshes)

