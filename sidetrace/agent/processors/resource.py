"""Resource enrichment: host.name, host.id, os.type, the agent's version and its container id.

Attributes are added only where the app did not set them: the app's own values always win. A
request whose spans need no other change is enriched on its wire bytes (``enrich_encoded``): only
each ResourceSpans' resource is decoded and the missing attributes appended, so the spans are
copied once and never re-encoded.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from sidetrace import __version__
from sidetrace._protowire import fields, varint
from sidetrace.config import ResourceProcessorSection

_CONTAINER_ID = re.compile(r"([0-9a-f]{64})")


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def container_id(cgroup: str, mountinfo: str) -> str:
    """The 64-hex id of the container this process runs in, from cgroup v1 or the mount table (v2)."""
    for line in cgroup.splitlines():
        match = _CONTAINER_ID.search(line.rsplit(":", 1)[-1])
        if match:
            return match.group(1)
    for line in mountinfo.splitlines():
        if "/containers/" in line or "/docker/" in line:
            match = _CONTAINER_ID.search(line)
            if match:
                return match.group(1)
    return ""


def host_attributes(extra: dict[str, str]) -> dict[str, str]:
    found = {
        "host.name": socket.gethostname(),
        "host.id": _read("/etc/machine-id").strip(),
        "os.type": "linux",
        "sidetrace.agent.version": __version__,
        "container.id": container_id(_read("/proc/self/cgroup"), _read("/proc/self/mountinfo")),
    }
    return {key: value for key, value in {**found, **extra}.items() if value}


class ResourceProcessor:
    """Adds the host's attributes to each resource that lacks them."""

    def __init__(self, section: ResourceProcessorSection) -> None:
        self.attributes = host_attributes(section.attributes)
        # Each attribute as an encoded Resource.attributes field (field 1, a KeyValue), to append as it is.
        self._encoded = {key: b"\x0a" + varint(len(kv)) + kv for key, kv in (
            (key, Resource(attributes=[{"key": key, "value": {"string_value": value}}]).attributes[0]
             .SerializeToString()) for key, value in self.attributes.items())}

    def enrich_encoded(self, raw: bytes) -> bytes | None:
        """``raw`` (an encoded ExportTraceServiceRequest) with the missing attributes added, decoding only the
        resources; None when its encoding is one this reader does not handle (decode and ``apply`` then)."""
        data = memoryview(raw)
        try:
            parts: list[bytes | memoryview] = []
            for number, start, value, end in fields(data):
                if number != 1:  # not resource_spans: kept as it is
                    parts.append(data[start:end])
                    continue
                enriched = self._resource_spans(data[value:end])
                parts += [b"\x0a", varint(len(enriched)), enriched]
        except ValueError:
            return None
        return b"".join(parts)

    def _resource_spans(self, data: memoryview) -> bytes:
        resources = [(start, value, end) for number, start, value, end in fields(data) if number == 1]
        present: set[str] = set()
        for _, value, end in resources:
            present.update(kv.key for kv in Resource.FromString(data[value:end]).attributes)
        missing = b"".join(encoded for key, encoded in self._encoded.items() if key not in present)
        if not missing:
            return bytes(data)
        if not resources:  # no resource at all: one holding only the host's attributes, in front
            return b"\x0a" + varint(len(missing)) + missing + bytes(data)
        start, value, end = resources[-1]  # a resource sent in parts is merged: appending to the last is enough
        resource = bytes(data[value:end]) + missing
        return b"".join((data[:start], b"\x0a", varint(len(resource)), resource, data[end:]))

    def apply(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            self.enrich(resource_spans.resource)

    def enrich(self, resource: Resource) -> None:
        present = {kv.key for kv in resource.attributes}
        for key, value in self.attributes.items():
            if key not in present:
                kv = resource.attributes.add()
                kv.key = key
                kv.value.string_value = value
