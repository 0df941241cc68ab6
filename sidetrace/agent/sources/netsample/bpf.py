"""Classic BPF for AF_PACKET sockets: a capture filter followed by kernel-side 1-in-N sampling.

The kernel draws a random number per packet (the ``SKF_AD_RANDOM`` ancillary load) and passes one
matching packet in N, so user space only touches the sample. The user's filter (tcpdump syntax,
compiled by libpcap through scapy) runs first; each of its accepting returns jumps to the sampling
block instead, so filters of any length combine with sampling.
"""

from __future__ import annotations

import ctypes
import socket
import struct

# Instruction classes and fields (linux/filter.h, linux/bpf_common.h).
BPF_LD, BPF_ALU, BPF_JMP, BPF_RET = 0x00, 0x04, 0x05, 0x06
BPF_W, BPF_ABS, BPF_K = 0x00, 0x20, 0x00
BPF_MOD, BPF_JEQ, BPF_JA = 0x90, 0x10, 0x00
SKF_AD_OFF, SKF_AD_RANDOM = -0x1000, 56
SO_ATTACH_FILTER = 26
SNAPLEN = 256  # enough for link, IPv4/IPv6 with extension headers, and TCP/UDP headers

Instruction = tuple[int, int, int, int]  # (code, jt, jf, k)


def sampling_block(n: int, snaplen: int = SNAPLEN) -> list[Instruction]:
    """Accept (up to ``snaplen`` bytes) one packet in ``n``, drop the rest."""
    if n <= 1:
        return [(BPF_RET | BPF_K, 0, 0, snaplen)]
    return [
        (BPF_LD | BPF_W | BPF_ABS, 0, 0, (SKF_AD_OFF + SKF_AD_RANDOM) & 0xFFFFFFFF),
        (BPF_ALU | BPF_MOD | BPF_K, 0, 0, n),
        (BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 0),
        (BPF_RET | BPF_K, 0, 0, snaplen),
        (BPF_RET | BPF_K, 0, 0, 0),
    ]


def program(n: int, user_filter: list[Instruction] | None = None, snaplen: int = SNAPLEN) -> list[Instruction]:
    """The user filter (if any) with its accepting returns rewired to the sampling block."""
    if not user_filter:
        return sampling_block(n, snaplen)
    end = len(user_filter)
    rewired = []
    for index, (code, jt, jf, k) in enumerate(user_filter):
        if code == BPF_RET | BPF_K and k != 0:
            rewired.append((BPF_JMP | BPF_JA, 0, 0, end - index - 1))  # to the first sampling instruction
        else:
            rewired.append((code, jt, jf, k))
    return rewired + sampling_block(n, snaplen)


def compile_filter(expression: str, interface: str) -> list[Instruction]:
    """A tcpdump-syntax filter as BPF for ``interface``'s link type (libpcap, through scapy).

    Raises ValueError with libpcap's message when the expression does not compile.
    """
    from scapy.arch.common import compile_filter as scapy_compile
    from scapy.error import Scapy_Exception

    try:
        compiled = scapy_compile(expression, iface=interface)
    except Scapy_Exception as exc:
        raise ValueError(f"capture filter {expression!r} does not compile: {exc}") from None
    return [(ins.code, ins.jt, ins.jf, ins.k) for ins in compiled.bf_insns[: compiled.bf_len]]


def attach(sock: socket.socket, instructions: list[Instruction]) -> None:
    """Attach (or replace) the socket's classic BPF filter."""
    if len(instructions) > 4096:
        raise ValueError("BPF program longer than the kernel's 4096 instructions")
    blob = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in instructions))
    fprog = struct.pack("HL", len(instructions), ctypes.addressof(blob))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
