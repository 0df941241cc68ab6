"""What a call to the Dapr sidecar is: its building block, component and low-cardinality span name.

Two doors lead to the sidecar: the gRPC API (``/dapr.proto.runtime.v1.Dapr/<Method>``, whose request
message names the store, pub/sub, binding or app) and the HTTP API (``/v1.0/<block>/...`` URL
templates, https://docs.dapr.io/reference/api/). Both are mapped here to one :class:`Operation`, so
spans and metrics look the same whichever door a call took. Pure functions: no OpenTelemetry here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

DAPR_SERVICE = "dapr.proto.runtime.v1.Dapr"
GRPC_PREFIX = f"/{DAPR_SERVICE}/"

# building blocks (the `dapr.building_block` metric attribute) and Dapr's component types
INVOCATION, PUBSUB, STATE, BINDINGS, SECRETS, CONFIGURATION, LOCK, OTHER = (
    "invocation", "pubsub", "state", "bindings", "secrets", "configuration", "lock", "other")
COMPONENT_TYPE = {PUBSUB: "pubsub", STATE: "state", BINDINGS: "bindings", SECRETS: "secretstores",
                  CONFIGURATION: "configuration", LOCK: "lock"}


@dataclass(slots=True)
class Operation:
    name: str                   # span name, e.g. "state.save statestore"
    block: str                  # building block
    operation: str              # e.g. "save", "publish", "invoke"
    api: str                    # route template or full gRPC method: the `dapr.api` attribute
    component: str | None = None  # store, pub/sub or binding name; the target app id for invocation
    producer: bool = False      # a pub/sub publish is a PRODUCER span, everything else CLIENT
    attributes: dict[str, Any] = field(default_factory=dict)
    per_call: dict[str, Any] | None = None  # attributes that change from call to call (batch sizes)

    def span_attributes(self) -> dict[str, Any]:
        """The attributes every call of this operation shares (``per_call`` not included)."""
        attributes = {"dapr.api": self.api, **self.attributes}
        if self.component is not None and self.block != INVOCATION:
            attributes["dapr.component.name"] = self.component
            attributes["dapr.component.type"] = COMPONENT_TYPE.get(self.block, self.block)
        return attributes

    def call_attributes(self) -> dict[str, Any]:
        """All the attributes of one call: the shared ones and ``per_call``."""
        return {**self.span_attributes(), **(self.per_call or {})}


_DIGIT = re.compile(r"\d")
_VERSION_SEGMENT = re.compile(r"v\d+(?:\.\d+)*(?:(?:alpha|beta)\d*)?\Z")


def method_name(method: str) -> str:
    """The low-cardinality form of an invoked method path, for span names: each segment holding a
    digit (``42``, ``u7``, ``ORD-2024-9``, a UUID, a hash) is ``{id}``, except a version (``v1``,
    ``v2.1``, ``v1beta1``). ``orders/42`` is ``orders/{id}``, as the callee's route template says.

    The caller cannot know the callee's routes (OpenTelemetry's HTTP conventions forbid the raw path
    as a span name for that reason), and an id made of letters only (``alice``) still passes: the
    ``dapr.method`` attribute keeps the path whole."""
    if _DIGIT.search(method) is None:  # most method names ("process", "orders/list"): nothing to do
        return method.strip("/")
    return "/".join("{id}" if _DIGIT.search(segment) and not _VERSION_SEGMENT.match(segment) else segment
                    for segment in method.strip("/").split("/"))


def _invoke(api: str, app_id: str, method: str) -> Operation:
    # The method path differs from call to call (orders/1, orders/2) where the name does not: per call,
    # so that the attributes cached per span name never carry another call's path.
    return Operation(f"invoke {app_id}/{method_name(method)}", INVOCATION, "invoke", api, app_id,
                     attributes={"dapr.app_id": app_id}, per_call={"dapr.method": method})


def _publish(api: str, pubsub: str, topic: str, count: int | None = None) -> Operation:
    attributes: dict[str, Any] = {
        "messaging.system": "dapr", "messaging.operation.type": "send", "messaging.operation.name": "publish",
        "messaging.destination.name": topic}
    return Operation(f"publish {pubsub}/{topic}", PUBSUB, "publish", api, pubsub, producer=True,
                     attributes=attributes,
                     per_call={"messaging.batch.message_count": count} if count is not None else None)


def _state(api: str, operation: str, store: str) -> Operation:
    return Operation(f"state.{operation} {store}", STATE, operation, api, store, attributes={
        "db.system.name": "dapr", "db.namespace": store, "db.operation.name": operation})


def _named(block: str, operation: str, api: str, component: str, label: str | None = None) -> Operation:
    return Operation(f"{label or operation} {component}", block, operation, api, component)


def _binding(api: str, name: str, operation: str) -> Operation:
    found = _named(BINDINGS, "invoke", api, name, "binding")
    if operation:  # chosen per call (create, get, delete, ...): not part of the shared attributes
        found.per_call = {"dapr.binding.operation": operation}
    return found


# --- gRPC ----------------------------------------------------------------------------------------

def _grpc_table() -> dict[str, Any]:
    def state(operation: str, store_field: str = "store_name"):  # noqa: ANN202
        return lambda api, r: _state(api, operation, getattr(r, store_field))

    return {
        "InvokeService": lambda api, r: _invoke(api, r.id, r.message.method),
        "PublishEvent": lambda api, r: _publish(api, r.pubsub_name, r.topic),
        "BulkPublishEvent": lambda api, r: _publish(api, r.pubsub_name, r.topic, len(r.entries)),
        "BulkPublishEventAlpha1": lambda api, r: _publish(api, r.pubsub_name, r.topic, len(r.entries)),
        "GetState": state("get"),
        "GetBulkState": state("get_bulk"),
        "SaveState": state("save"),
        "DeleteState": state("delete"),
        "DeleteBulkState": state("delete_bulk"),
        "ExecuteStateTransaction": state("transaction", "storeName"),
        "QueryStateAlpha1": state("query"),
        "QueryState": state("query"),
        "InvokeBinding": lambda api, r: _binding(api, r.name, r.operation),
        "GetSecret": lambda api, r: _named(SECRETS, "get", api, r.store_name, "secret"),
        "GetBulkSecret": lambda api, r: _named(SECRETS, "get_bulk", api, r.store_name, "secret"),
        "GetConfiguration": lambda api, r: _named(CONFIGURATION, "get", api, r.store_name, "configuration"),
        "GetConfigurationAlpha1": lambda api, r: _named(CONFIGURATION, "get", api, r.store_name, "configuration"),
        "UnsubscribeConfiguration": lambda api, r: _named(CONFIGURATION, "unsubscribe", api, r.store_name,
                                                          "configuration"),
        "TryLockAlpha1": lambda api, r: _named(LOCK, "lock", api, r.store_name),
        "UnlockAlpha1": lambda api, r: _named(LOCK, "unlock", api, r.store_name),
    }


_GRPC = _grpc_table()


def grpc_operation(method: str, request: Any) -> Operation | None:
    """The operation of a unary call to the Dapr gRPC API, or None if ``method`` is not one.

    Methods without a table entry (metadata, actors, workflows, jobs, ...) are named
    ``dapr {Method}``; a request message missing an expected field raises (the caller guards).
    """
    if not method.startswith(GRPC_PREFIX):
        return None
    short = method[len(GRPC_PREFIX):]
    make = _GRPC.get(short)
    if make is None:
        return Operation(f"dapr {short}", OTHER, short, method)
    return make(method, request)


# --- HTTP ----------------------------------------------------------------------------------------

_VERSION = re.compile(r"v1\.0(?:-(?:alpha|beta)\d+)?\Z")
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1", "ip6-localhost"})


def _state_http(version: str, verb: str, rest: list[str]) -> Operation | None:
    store = rest[0]
    base = f"/{version}/state/{{storeName}}"
    if len(rest) == 1:
        return _state(base, "save" if verb in ("POST", "PUT") else verb.lower(), store)
    tail = "/".join(rest[1:])
    if verb == "POST" and tail in ("bulk", "transaction", "query"):
        return _state(f"{base}/{tail}", {"bulk": "get_bulk"}.get(tail, tail), store)
    return _state(f"{base}/{{key}}", "delete" if verb == "DELETE" else "get", store)


def http_operation(verb: str, path: str, headers: Any = None) -> Operation | None:
    """The operation of an HTTP request to the sidecar's API path, or None if it is not one.

    ``headers`` (any mapping with ``get``) is looked at only for ``dapr-app-id`` invocation, where an
    app calls ``http://localhost:3500/<path>`` with the target's id in that header.
    """
    verb = verb.upper()
    parts = path.split("/")
    if len(parts) < 4 or not _VERSION.match(parts[1]):
        app_id = headers.get("dapr-app-id") if headers is not None else None
        if app_id:
            method = path.lstrip("/")
            return _invoke("dapr-app-id: {appId} /{method}", app_id, method)
        return None
    version, block, rest = parts[1], parts[2], parts[3:]
    if not rest[0]:
        return None
    if block == "invoke" and len(rest) >= 3 and rest[1] == "method":
        return _invoke(f"/{version}/invoke/{{appId}}/method/{{method}}", rest[0], "/".join(rest[2:]))
    if block == "publish":
        if rest[0] == "bulk" and len(rest) >= 3:
            return _publish(f"/{version}/publish/bulk/{{pubsubName}}/{{topic}}", rest[1], "/".join(rest[2:]))
        if len(rest) >= 2:
            return _publish(f"/{version}/publish/{{pubsubName}}/{{topic}}", rest[0], "/".join(rest[1:]))
        return None
    if block == "state":
        return _state_http(version, verb, rest)
    if block == "bindings":
        return _named(BINDINGS, "invoke", f"/{version}/bindings/{{name}}", rest[0], "binding")
    if block == "secrets":
        if len(rest) >= 2 and rest[1] == "bulk":
            return _named(SECRETS, "get_bulk", f"/{version}/secrets/{{secretStoreName}}/bulk", rest[0], "secret")
        return _named(SECRETS, "get", f"/{version}/secrets/{{secretStoreName}}/{{name}}", rest[0], "secret")
    if block == "configuration":
        return _named(CONFIGURATION, "get", f"/{version}/configuration/{{storeName}}", rest[0], "configuration")
    if block in ("lock", "unlock"):
        return _named(LOCK, block, f"/{version}/{block}/{{storeName}}", rest[0])
    return None


def sidecar_address(url: str) -> tuple[str, int] | None:
    """(host, port) of ``url`` if it can be the Dapr sidecar: a loopback host (how apps reach their
    sidecar in Kubernetes and self-hosted mode), DAPR_RUNTIME_HOST, or the DAPR_HTTP_ENDPOINT origin."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    if host in _LOOPBACK or host.startswith("127.") or host == os.environ.get("DAPR_RUNTIME_HOST", "").lower():
        return host, port
    endpoint = os.environ.get("DAPR_HTTP_ENDPOINT")
    if endpoint:
        try:
            expected = urlsplit(endpoint)
            if (expected.hostname or "").lower() == host and (
                    expected.port or (443 if expected.scheme == "https" else 80)) == port:
                return host, port
        except ValueError:
            return None
    return None
