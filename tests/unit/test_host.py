from __future__ import annotations

import logging
from pathlib import Path

import psutil
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sidetrace.agent.components import Context
from sidetrace.agent.sources.host import DeviceFilter, HostSource
from sidetrace.config import Config, HostSection

ROUTE = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0100A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t0000A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
veth9\t0011A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth0\t0000000A\t00000000\t0200\t0\t0\t0\t000000FF\t0\t0\t0
"""
IPV6_ROUTE = (
    "fe800000000000000000000000000000 40 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n"
    "00000000000000000000000000000000 00 00000000000000000000000000000000 00 "
    "00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n"
)
TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2328 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100007F:2328 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0100007F:C350 0100007F:2328 01 00000000:00000000 00:00000000 00000000     0        0 3 1
   3: 0100007F:C351 0100007F:2328 06 00000000:00000000 00:00000000 00000000     0        0 0 1
"""
SWAPS = """\
Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority
/swapfile                               file\t\t1024\t\t256\t\t-2
"""


def fake_proc(tmp_path: Path, ipv6: bool = True) -> Path:
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "route").write_text(ROUTE)
    (tmp_path / "net" / "tcp").write_text(TCP)
    if ipv6:
        (tmp_path / "net" / "ipv6_route").write_text(IPV6_ROUTE)
        (tmp_path / "net" / "tcp6").write_text(TCP.splitlines()[0] + "\n")
    (tmp_path / "swaps").write_text(SWAPS)
    return tmp_path


def make_source(proc: Path | str = "/proc", **host: object) -> tuple[HostSource, CollectorRegistry]:
    registry = CollectorRegistry(auto_describe=False)
    context = Context(config=Config(), registry=registry, daemon_status=dict, not_ready=list)
    source = HostSource(HostSection(**host), context, proc=str(proc))
    registry.register(source)
    return source, registry


# Every collector of the host source: each has a sidetrace_source_errors_total series from the start.
COLLECTORS = ("cpu", "load", "memory", "paging", "filesystem", "disk", "network", "connections", "interfaces", "routes")


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    text = generate_latest(registry).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_device_filter_include_exclude_full_match() -> None:
    devices = DeviceFilter(include=["eth.*", "lo"], exclude=["eth9"], limit=10)
    assert devices.select(["eth0", "eth9", "lo", "lo2", "veth1", "xeth0"]) == {"eth0", "lo"}
    assert devices.over_limit == 0


def test_device_filter_cap_keeps_long_lived_devices() -> None:
    devices = DeviceFilter(include=[], exclude=[], limit=3)
    assert devices.select(["lo", "eth0", "wlan0"]) == {"lo", "eth0", "wlan0"}
    # A burst of veths sorts before the old devices but cannot push them out.
    burst = ["lo", "eth0", "wlan0", "aveth1", "aveth2"]
    assert devices.select(burst) == {"lo", "eth0", "wlan0"}
    assert devices.over_limit == 2
    # A device that left frees its place for the first newcomer in name order.
    assert devices.select(["lo", "eth0", "aveth1", "aveth2"]) == {"lo", "eth0", "aveth1"}
    assert devices.over_limit == 1


def test_routes_connections_and_swap_from_proc(tmp_path: Path) -> None:
    source, registry = make_source(fake_proc(tmp_path), exclude_devices=["veth.*"])
    source.scan()
    routes = samples(registry, "system_network_route_info")
    exported = {dict(labels)["device"] for labels in routes}
    assert exported <= set(psutil.net_io_counters(pernic=True)) - {"veth9"}  # only exported devices
    lo_routes = {labels for labels in routes if dict(labels)["device"] == "lo"}
    assert lo_routes == set(), "the RTF_REJECT ::/0 route on lo must be skipped"
    connections = samples(registry, "system_network_connections")
    assert connections[(("protocol", "tcp"), ("state", "LISTEN"))] == 1
    assert connections[(("protocol", "tcp"), ("state", "ESTABLISHED"))] == 2
    assert connections[(("protocol", "tcp"), ("state", "TIME_WAIT"))] == 1
    assert connections[(("protocol", "tcp"), ("state", "CLOSING"))] == 0
    swap = samples(registry, "system_paging_usage_bytes")
    assert swap == {(("device", "/swapfile"), ("state", "used")): 256 * 1024,
                    (("device", "/swapfile"), ("state", "free")): 768 * 1024}


def route_rows(source: HostSource) -> list[str]:
    (family,) = source._routes()
    return sorted(f"{s.labels['destination']}/{s.labels['netmask']} via {s.labels['gateway']} @{s.labels['device']}"
                  for s in family.samples)


def test_route_parsing_with_every_device_exported(tmp_path: Path) -> None:
    source, _ = make_source(fake_proc(tmp_path))
    source._filters["network"].select(["eth0", "veth9", "lo"])
    assert route_rows(source) == [
        "0.0.0.0/0.0.0.0 via 192.168.0.1 @eth0",
        "192.168.0.0/255.255.255.0 via 0.0.0.0 @eth0",
        "192.168.17.0/255.255.255.0 via 0.0.0.0 @veth9",
        "fe80::/ffff:ffff:ffff:ffff:: via :: @eth0",
    ]


def test_routes_over_limit_counted(tmp_path: Path) -> None:
    source, registry = make_source(fake_proc(tmp_path, ipv6=False), max_routes=1)
    source._filters["network"].select(["eth0", "veth9"])
    assert route_rows(source) == ["0.0.0.0/0.0.0.0 via 192.168.0.1 @eth0"]
    assert source._routes_over_limit == 2


def test_failing_collector_is_counted_logged_once_and_others_stay(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    source, registry = make_source()

    def vanished(pernic: bool = False) -> dict:
        raise FileNotFoundError(2, "No such device", "veth42")

    monkeypatch.setattr(psutil, "net_io_counters", vanished)
    with caplog.at_level(logging.WARNING, logger="sidetrace.host"):
        for _ in range(3):
            source.scan()
    logged = [r for r in caplog.records if "network collector failed" in r.getMessage()]
    assert len(logged) == 1
    errors = samples(registry, "sidetrace_source_errors_total")
    assert errors == {(("collector", name), ("source", "host")): 3 if name == "network" else 0 for name in COLLECTORS}
    assert samples(registry, "system_network_io_bytes_total") == {}
    assert samples(registry, "system_memory_limit_bytes") == {(): psutil.virtual_memory().total}
    assert len(samples(registry, "system_cpu_time_seconds_total")) >= 8
    assert source.status()["last_error"] == "network: FileNotFoundError: [Errno 2] No such device: 'veth42'"


def test_missing_proc_table_is_a_counted_fault(tmp_path: Path) -> None:
    source, registry = make_source(tmp_path)  # an empty /proc: no route, tcp or swaps tables
    source.scan()
    errors = samples(registry, "sidetrace_source_errors_total")
    assert errors == {(("collector", name), ("source", "host")): 1 if name in ("paging", "connections", "routes") else 0
                      for name in COLLECTORS}
    assert samples(registry, "system_network_io_bytes_total")  # the psutil collectors still report


def test_loopback_counters_exported_with_hostmetrics_names() -> None:
    source, registry = make_source(include_devices=["lo"])
    source.scan()
    io = samples(registry, "system_network_io_bytes_total")
    assert set(io) == {(("device", "lo"), ("direction", "receive")), (("device", "lo"), ("direction", "transmit"))}
    received = io[(("device", "lo"), ("direction", "receive"))]
    assert 0 < received <= psutil.net_io_counters(pernic=True)["lo"].bytes_recv
    info = samples(registry, "system_network_interface_info")
    mtu = str(psutil.net_if_stats()["lo"].mtu)
    assert (("address", "127.0.0.1"), ("device", "lo"), ("family", "ipv4"), ("mtu", mtu), ("netmask", "255.0.0.0"),
            ("up", "true")) in info
    assert {dict(labels)["device"] for labels in info} == {"lo"}
