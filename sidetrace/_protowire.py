"""Protobuf wire format, read and written by hand where decoding whole messages would cost too much:
the resource processor enriches requests and the load-balancing exporter splits them without
decoding their spans (each tested against the protobuf library's own decoding)."""

from __future__ import annotations


def varint(value: int) -> bytes:
    """``value`` as a protobuf varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; ValueError when it runs past the end."""
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def fields(data: memoryview) -> list[tuple[int, int, int, int]]:
    """The top-level fields of an encoded message: (field number, start, value start, end). ValueError on
    what this reader does not handle (groups), so the caller falls back to decoding."""
    found = []
    pos = 0
    while pos < len(data):
        start = pos
        tag, pos = read_varint(data, pos)
        wire = tag & 7
        if wire == 0:
            _, pos = read_varint(data, pos)
            value = start
        elif wire == 2:
            length, value = read_varint(data, pos)
            pos = value + length
        elif wire in (1, 5):
            value, pos = pos, pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated")
        found.append((tag >> 3, start, value, pos))
    return found
