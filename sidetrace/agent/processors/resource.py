"""Resource enrichment: host.name, host.id, os.type, the agent's version and its container id.

Attributes are added only where the app did not set them: the app's own values always win.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from sidetrace import __version__
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
