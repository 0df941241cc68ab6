"""Header parsing for sampled frames: link, IPv4/IPv6 (with extension headers), TCP, UDP, ICMP.

A struct-based parser rather than scapy's dissection on the hot path: it reads only the fields a
flow needs and costs a few microseconds a frame (scapy's full dissection costs tens). Malformed or
truncated frames return None and are counted by the caller, never raised.
"""

from __future__ import annotations

import socket
import struct

ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD = 0x0800, 0x86DD, 0x8100, 0x88A8
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}
IPV6_EXTENSIONS = {0, 43, 60, 51}  # hop-by-hop, routing, destination options, AH (fragment: 44)
TCP_FIN, TCP_SYN, TCP_RST = 0x01, 0x02, 0x04
# Link types (ARPHRD_*) whose frames start with the IP header, not Ethernet.
RAW_IP_LINKS = {65534, 776, 778, 823}  # none (tun, wireguard), ipip/sit, gre, ip6gre


class Packet:
    """The flow fields of a frame, and ``length``: the frame's length as its IP header states it (link header
    plus IP total length), which survives the capture's cut; 0 when the header does not say (an IPv6
    jumbogram, a GSO packet whose IPv4 total length is 0)."""

    __slots__ = ("protocol", "src", "dst", "sport", "dport", "tcp_flags", "length")

    def __init__(self, protocol: str, src: str, dst: str, sport: int, dport: int, tcp_flags: int,
                 length: int = 0) -> None:
        self.protocol = protocol
        self.src = src
        self.dst = dst
        self.sport = sport
        self.dport = dport
        self.tcp_flags = tcp_flags
        self.length = length


def parse(frame: bytes | memoryview, hatype: int = 1) -> Packet | None:
    """The flow fields of one frame, or None when it is not IP or is cut short."""
    try:
        if hatype in RAW_IP_LINKS:
            version = frame[0] >> 4
            ethertype, offset = (ETH_P_IP if version == 4 else ETH_P_IPV6 if version == 6 else 0), 0
        else:
            ethertype, offset = struct.unpack_from("!H", frame, 12)[0], 14
            while ethertype in (ETH_P_8021Q, ETH_P_8021AD):
                ethertype, offset = struct.unpack_from("!H", frame, offset + 2)[0], offset + 4
        if ethertype == ETH_P_IP:
            first = frame[offset]
            if first >> 4 != 4 or (first & 0x0F) < 5:
                return None
            total, _, fragment = struct.unpack_from("!HHH", frame, offset + 2)
            length = offset + total if total else 0
            number = frame[offset + 9]
            src = socket.inet_ntop(socket.AF_INET, bytes(frame[offset + 12:offset + 16]))
            dst = socket.inet_ntop(socket.AF_INET, bytes(frame[offset + 16:offset + 20]))
            if fragment & 0x1FFF:  # a later fragment has no transport header
                return Packet(PROTOCOLS.get(number, str(number)), src, dst, 0, 0, 0, length)
            offset += (first & 0x0F) * 4
        elif ethertype == ETH_P_IPV6:
            if frame[offset] >> 4 != 6:
                return None
            payload = struct.unpack_from("!H", frame, offset + 4)[0]
            length = offset + 40 + payload if payload else 0
            number = frame[offset + 6]
            src = socket.inet_ntop(socket.AF_INET6, bytes(frame[offset + 8:offset + 24]))
            dst = socket.inet_ntop(socket.AF_INET6, bytes(frame[offset + 24:offset + 40]))
            offset += 40
            for _ in range(8):  # bounded walk over extension headers
                if number in IPV6_EXTENSIONS:
                    number, offset = frame[offset], offset + (frame[offset + 1] + 1) * 8
                elif number == 44:  # fragment header: only the first fragment (offset 0) has ports
                    fragment_offset = struct.unpack_from("!H", frame, offset + 2)[0] & 0xFFF8
                    number, offset = frame[offset], offset + 8
                    if fragment_offset:
                        return Packet(PROTOCOLS.get(number, str(number)), src, dst, 0, 0, 0, length)
                else:
                    break
        else:
            return None
        protocol = PROTOCOLS.get(number, str(number))
        if number == 6:
            sport, dport = struct.unpack_from("!HH", frame, offset)
            return Packet(protocol, src, dst, sport, dport, frame[offset + 13], length)
        if number in (17, 132):
            sport, dport = struct.unpack_from("!HH", frame, offset)
            return Packet(protocol, src, dst, sport, dport, 0, length)
        return Packet(protocol, src, dst, 0, 0, 0, length)
    except (IndexError, struct.error, ValueError):
        return None
