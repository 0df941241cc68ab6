from __future__ import annotations

import pytest
from scapy.all import ICMP, IP, TCP, UDP, Dot1Q, Ether, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, raw

from sidetrace.agent.sources.netsample import bpf
from sidetrace.agent.sources.netsample.flows import FlowTable, error_bound_percent
from sidetrace.agent.sources.netsample.packets import parse


def test_sampling_block_draws_one_in_n_in_the_kernel() -> None:
    assert bpf.program(1) == [(bpf.BPF_RET | bpf.BPF_K, 0, 0, bpf.SNAPLEN)]
    load, mod, jump, accept, drop = bpf.program(100)
    assert load == (0x20, 0, 0, (-0x1000 + 56) & 0xFFFFFFFF)  # ld #SKF_AD_RANDOM
    assert mod == (0x94, 0, 0, 100) and jump == (0x15, 0, 1, 0)
    assert accept == (0x06, 0, 0, bpf.SNAPLEN) and drop == (0x06, 0, 0, 0)


def test_user_filter_accepts_are_rewired_into_the_sampling_block() -> None:
    user = [(0x28, 0, 0, 12), (0x15, 0, 1, 0x800), (0x06, 0, 0, 262144), (0x06, 0, 0, 0)]
    combined = bpf.program(10, user)
    assert combined[:2] == user[:2]
    assert combined[2] == (bpf.BPF_JMP | bpf.BPF_JA, 0, 0, 1)  # to index 4: the sampling block
    assert combined[3] == (0x06, 0, 0, 0)  # the filter's reject stays
    assert combined[4:] == bpf.sampling_block(10)


def test_filters_compile_through_libpcap_and_errors_say_so() -> None:
    assert len(bpf.compile_filter("udp port 53", "lo")) > 4
    with pytest.raises(ValueError, match="does not compile"):
        bpf.compile_filter("udp portt 53", "lo")


@pytest.mark.parametrize("frame, expected", [
    (Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1234, dport=80, flags="S"),
     ("tcp", "10.0.0.1", "10.0.0.2", 1234, 80, 0x02)),
    (Ether() / Dot1Q(vlan=7) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=5, dport=53),
     ("udp", "10.0.0.1", "10.0.0.2", 5, 53, 0)),
    (Ether() / IPv6(src="fe80::1", dst="fe80::2") / IPv6ExtHdrHopByHop() / TCP(sport=9, dport=443, flags="FA"),
     ("tcp", "fe80::1", "fe80::2", 9, 443, 0x11)),
    (Ether() / IPv6(src="::1", dst="::1") / IPv6ExtHdrFragment(offset=10, m=1) / UDP(sport=1, dport=2),
     ("udp", "::1", "::1", 0, 0, 0)),
    (Ether() / IP(src="1.1.1.1", dst="2.2.2.2", frag=10) / UDP(sport=1, dport=2),
     ("udp", "1.1.1.1", "2.2.2.2", 0, 0, 0)),
    (Ether() / IP(src="1.1.1.1", dst="2.2.2.2") / ICMP(), ("icmp", "1.1.1.1", "2.2.2.2", 0, 0, 0)),
])
def test_parse_reads_the_flow_fields(frame, expected) -> None:  # noqa: ANN001
    packet = parse(raw(frame))
    assert (packet.protocol, packet.src, packet.dst, packet.sport, packet.dport, packet.tcp_flags) == expected


def test_parse_of_raw_ip_links_and_junk() -> None:
    packet = parse(raw(IP(src="10.1.1.1", dst="10.1.1.2") / UDP(sport=7, dport=8)), hatype=65534)
    assert (packet.src, packet.dport) == ("10.1.1.1", 8)
    full = raw(Ether() / IP() / TCP())
    assert all(parse(full[:cut]) is None for cut in range(0, 34 + 4))  # cut inside the link or IP header
    assert parse(b"\xff" * 60) is None


def test_flow_estimates_bounds_and_eviction() -> None:
    gone: list = []
    table = FlowTable(max_flows=2, evicted=gone.append)
    key = ("lo", "receive", "udp", "127.0.0.1", 1, "127.0.0.1", 2)
    for _ in range(100):
        table.add(key, 100, 10, 0, 1.0)
    flow = table.flows[key]
    assert (flow.packets, flow.bytes, flow.samples) == (1000, 100_000, 100)
    assert flow.as_dict()["error_bound_percent"] == 19.6
    table.add(("lo", "receive", "udp", "127.0.0.1", 3, "127.0.0.1", 4), 50, 10, 0x02, 2.0)
    table.add(("lo", "receive", "udp", "127.0.0.1", 5, "127.0.0.1", 6), 50, 10, 0, 3.0)
    assert key not in table.flows and table.evicted == 1  # the least recently seen went
    assert [flow.key for flow in gone] == [key] and gone[0].packets == 1000  # handed over whole, once
    assert error_bound_percent(0) == float("inf") and round(error_bound_percent(10_000), 2) == 1.96


@pytest.mark.parametrize("frame, length", [
    (Ether() / IP() / UDP() / (b"x" * 5000), 14 + 20 + 8 + 5000),
    (Ether() / Dot1Q(vlan=7) / IPv6() / IPv6ExtHdrHopByHop() / UDP() / (b"x" * 3000), 18 + 40 + 8 + 8 + 3000),
    (IP() / TCP() / (b"x" * 1000), 20 + 20 + 1000),  # a raw-IP link (tun)
])
def test_the_ip_header_gives_the_length_of_a_frame_cut_short(frame: object, length: int) -> None:
    hatype = 65534 if isinstance(frame, IP) else 1
    packet = parse(raw(frame)[: bpf.SNAPLEN], hatype)
    assert packet is not None and packet.length == length


def test_top_recent_ranks_by_the_bytes_since_the_last_choice() -> None:
    table = FlowTable(max_flows=10)
    big, small, idle = (("lo", "receive", "udp", "127.0.0.1", port, "127.0.0.1", 9) for port in (1, 2, 3))
    for _ in range(100):
        table.add(big, 1000, 1, 0, 1.0)
    table.add(idle, 10, 1, 0, 1.0)
    table.roll_rates(1.0)
    assert [f.key for f in table.top_recent(2)] == [big, idle]
    table.add(small, 100, 1, 0, 2.0)  # the big flow sends nothing more
    table.roll_rates(1.0)
    table.roll_rates(1.0)  # every window rolled since the last choice counts
    assert [f.key for f in table.top_recent(2)] == [small, big]  # then by bytes since first seen
    assert [f.key for f in table.top(1)] == [big]  # /debug/flows still ranks by bytes since first seen
    assert [f.key for f in table.top_recent(3)] == [big, small, idle]  # a new window: nothing sent in it yet


def test_socket_owners_reads_each_open_ends_address_as_psutil_writes_it_and_its_uid() -> None:
    import os
    import socket
    from contextlib import ExitStack

    import psutil

    from sidetrace.agent.sources.netsample import socket_owners

    ends = (("udp", socket.AF_INET6, socket.SOCK_DGRAM, "::1"), ("tcp", socket.AF_INET6, socket.SOCK_STREAM,
            "::ffff:127.0.0.1"), ("udp", socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1"),
            ("tcp", socket.AF_INET, socket.SOCK_STREAM, "0.0.0.0"))
    with ExitStack() as stack:
        bound = []
        for protocol, family, kind, address in ends:
            sock = stack.enter_context(socket.socket(family, kind))
            sock.bind((address, 0))
            if kind == socket.SOCK_STREAM:
                sock.listen()  # a TCP socket only bound is in no table
            bound.append((protocol, address, sock.getsockname()[1]))
        owners = socket_owners()
        listed = {("tcp" if c.type == socket.SOCK_STREAM else "udp", c.laddr.ip, c.laddr.port)
                  for c in psutil.net_connections(kind="inet") if c.laddr}
    assert {end: owners.get(end) for end in bound} == {end: os.getuid() for end in bound}
    assert set(bound) <= listed  # written as psutil writes them (the keys the process names are looked up by)
