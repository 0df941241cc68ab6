"""The Dapr instrumentor's pure parts: route and method tables, error codes, inbound context."""

from __future__ import annotations

import pytest
from dapr.proto import api_v1, common_v1
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from opentelemetry import trace

from sidetrace.instrumentors.dapr._operations import grpc_operation, http_operation, method_name, sidecar_address
from sidetrace.instrumentors.dapr._telemetry import (
    error_info_reason,
    extract_parent,
    grpc_trace_bin,
    http_error_code,
)

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
SPAN_ID = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"


@pytest.mark.parametrize(("verb", "path", "name", "api", "attributes"), [
    ("POST", "/v1.0/invoke/workerapp/method/process", "invoke workerapp/process",
     "/v1.0/invoke/{appId}/method/{method}", {"dapr.app_id": "workerapp", "dapr.method": "process"}),
    ("GET", "/v1.0/invoke/orders.prod/method/api/v2/list", "invoke orders.prod/api/v2/list",
     "/v1.0/invoke/{appId}/method/{method}", {"dapr.method": "api/v2/list"}),
    ("POST", "/v1.0/publish/pubsub/orders", "publish pubsub/orders", "/v1.0/publish/{pubsubName}/{topic}",
     {"messaging.system": "dapr", "messaging.destination.name": "orders", "dapr.component.name": "pubsub",
      "dapr.component.type": "pubsub"}),
    ("POST", "/v1.0-alpha1/publish/bulk/pubsub/orders", "publish pubsub/orders",
     "/v1.0-alpha1/publish/bulk/{pubsubName}/{topic}", {}),
    ("POST", "/v1.0/state/statestore", "state.save statestore", "/v1.0/state/{storeName}",
     {"db.system.name": "dapr", "db.namespace": "statestore", "db.operation.name": "save",
      "dapr.component.type": "state"}),
    ("GET", "/v1.0/state/statestore/order-1", "state.get statestore", "/v1.0/state/{storeName}/{key}", {}),
    ("DELETE", "/v1.0/state/statestore/order-1", "state.delete statestore", "/v1.0/state/{storeName}/{key}", {}),
    ("GET", "/v1.0/state/statestore/bulk", "state.get statestore", "/v1.0/state/{storeName}/{key}", {}),
    ("POST", "/v1.0/state/statestore/bulk", "state.get_bulk statestore", "/v1.0/state/{storeName}/bulk", {}),
    ("POST", "/v1.0/state/statestore/transaction", "state.transaction statestore",
     "/v1.0/state/{storeName}/transaction", {}),
    ("POST", "/v1.0-alpha1/state/statestore/query", "state.query statestore",
     "/v1.0-alpha1/state/{storeName}/query", {}),
    ("POST", "/v1.0/bindings/kafka-out", "binding kafka-out", "/v1.0/bindings/{name}",
     {"dapr.component.type": "bindings"}),
    ("GET", "/v1.0/secrets/vault/db-password", "secret vault", "/v1.0/secrets/{secretStoreName}/{name}",
     {"dapr.component.type": "secretstores"}),
    ("GET", "/v1.0/configuration/appconfig", "configuration appconfig", "/v1.0/configuration/{storeName}", {}),
    ("POST", "/v1.0-alpha1/lock/redislock", "lock redislock", "/v1.0-alpha1/lock/{storeName}", {}),
    ("POST", "/v1.0-alpha1/unlock/redislock", "unlock redislock", "/v1.0-alpha1/unlock/{storeName}", {}),
])
def test_http_routes_are_named_by_template(verb: str, path: str, name: str, api: str, attributes: dict) -> None:
    op = http_operation(verb, path)
    assert op is not None
    assert (op.name, op.api) == (name, api)
    assert attributes.items() <= op.call_attributes().items()
    assert op.span_attributes()["dapr.api"] == api


@pytest.mark.parametrize("path", ["/", "/orders/1", "/v1.0", "/v1.0/state/", "/v2.0/state/store",
                                  "/v1.0/healthz", "/v1.0/metadata", "/v1.0/publish/pubsub"])
def test_other_paths_are_not_dapr_operations(path: str) -> None:
    assert http_operation("GET", path) is None


def test_dapr_app_id_header_invocation() -> None:
    op = http_operation("POST", "/orders/new", {"dapr-app-id": "checkout"})
    assert op is not None and op.name == "invoke checkout/orders/new"
    op = http_operation("GET", "/orders/42", {"dapr-app-id": "checkout"})
    assert op is not None and (op.name, op.call_attributes()["dapr.method"]) == ("invoke checkout/orders/{id}",
                                                                                 "orders/42")


@pytest.mark.parametrize(("method", "name"), [
    ("process", "process"),
    ("orders/list", "orders/list"),
    ("orders/42", "orders/{id}"),
    ("/orders/42/", "orders/{id}"),
    ("orders/42/items/7", "orders/{id}/items/{id}"),
    ("users/u7", "users/{id}"),
    ("orders/ORD-2024-9", "orders/{id}"),
    ("orders/8f14e45f-ceea-467f-a0e6-0d9a6c5e2b1c", "orders/{id}"),
    ("blobs/5f2b9c0e1a3d4b6c8e7f9a0b", "blobs/{id}"),
    ("42", "{id}"),
    ("api/v2/list", "api/v2/list"),
    ("api/v2.1/orders/9", "api/v2.1/orders/{id}"),
    ("apis/v1beta1/jobs", "apis/v1beta1/jobs"),
    ("users/alice", "users/alice"),  # an id of letters only is not recognised (the callee's route names it)
])
def test_invoked_method_names_hold_no_id(method: str, name: str) -> None:
    assert method_name(method) == name
    op = http_operation("POST", f"/v1.0/invoke/app/method/{method.lstrip('/')}")
    assert op is not None and op.name == f"invoke app/{name}"
    assert op.call_attributes()["dapr.method"] == method.lstrip("/")


def test_sidecar_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DAPR_HTTP_ENDPOINT", raising=False)
    monkeypatch.delenv("DAPR_RUNTIME_HOST", raising=False)
    assert sidecar_address("http://localhost:3500/v1.0/state/s") == ("localhost", 3500)
    assert sidecar_address("http://127.0.0.1:3500/v1.0/state/s") == ("127.0.0.1", 3500)
    assert sidecar_address("http://[::1]:3500/v1.0/state/s") == ("::1", 3500)
    assert sidecar_address("https://api.example.com/v1.0/state/s") is None
    monkeypatch.setenv("DAPR_HTTP_ENDPOINT", "https://api.example.com")
    assert sidecar_address("https://api.example.com/v1.0/state/s") == ("api.example.com", 443)
    assert sidecar_address("https://other.example.com/v1.0/state/s") is None
    monkeypatch.setenv("DAPR_RUNTIME_HOST", "dapr-sidecar")
    assert sidecar_address("http://dapr-sidecar:3500/v1.0/state/s") == ("dapr-sidecar", 3500)


def test_grpc_methods_from_the_sdk_request_messages() -> None:
    prefix = "/dapr.proto.runtime.v1.Dapr/"
    invoke = grpc_operation(prefix + "InvokeService", api_v1.InvokeServiceRequest(
        id="workerapp", message=common_v1.InvokeRequest(method="process")))
    assert invoke.name == "invoke workerapp/process" and invoke.component == "workerapp"
    save = grpc_operation(prefix + "SaveState", api_v1.SaveStateRequest(store_name="statestore"))
    assert save.name == "state.save statestore" and save.span_attributes()["db.operation.name"] == "save"
    transaction = grpc_operation(prefix + "ExecuteStateTransaction",
                                 api_v1.ExecuteStateTransactionRequest(storeName="statestore"))
    assert transaction.name == "state.transaction statestore"
    bulk = grpc_operation(prefix + "BulkPublishEvent", api_v1.BulkPublishRequest(
        pubsub_name="pubsub", topic="t", entries=[api_v1.BulkPublishRequestEntry(entry_id="1")] * 3))
    assert bulk.producer and bulk.per_call == {"messaging.batch.message_count": 3}
    binding = grpc_operation(prefix + "InvokeBinding", api_v1.InvokeBindingRequest(name="out", operation="create"))
    assert binding.name == "binding out" and binding.per_call == {"dapr.binding.operation": "create"}
    assert grpc_operation(prefix + "GetMetadata", None).name == "dapr GetMetadata"
    assert grpc_operation("/grpc.health.v1.Health/Check", None) is None


def test_http_error_code_bodies() -> None:
    assert http_error_code(b'{"errorCode":"ERR_STATE_STORE_NOT_FOUND","message":"state store x is not found"}') == (
        "ERR_STATE_STORE_NOT_FOUND", "state store x is not found")
    assert http_error_code(b"not json") == (None, None)
    assert http_error_code(b"[1]") == (None, None)
    assert http_error_code(b"") == (None, None)
    assert http_error_code(b'{"errorCode": "' + b"x" * 70000 + b'"}') == (None, None)  # not inspected


def test_error_info_reason_from_rich_status() -> None:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason="DAPR_STATE_NOT_FOUND", domain="dapr.io"))
    status = status_pb2.Status(code=3, message="state store x is not found", details=[detail])
    assert error_info_reason([("grpc-status-details-bin", status.SerializeToString())]) == "DAPR_STATE_NOT_FOUND"
    assert error_info_reason([("other", "x")]) is None
    assert error_info_reason(None) is None


def test_grpc_trace_bin_decoding() -> None:
    value = b"\x00\x00" + TRACE_ID.to_bytes(16, "big") + b"\x01" + SPAN_ID.to_bytes(8, "big") + b"\x02\x01"
    context = grpc_trace_bin(value)
    assert context is not None
    assert (context.trace_id, context.span_id, int(context.trace_flags), context.is_remote) == (
        TRACE_ID, SPAN_ID, 1, True)
    assert grpc_trace_bin(b"\x01" + value[1:]) is None  # unknown version
    assert grpc_trace_bin(value[:10]) is None  # truncated


def test_inbound_parent_order_header_then_binary_then_cloudevent() -> None:
    other = f"00-{'1' * 32}-{'2' * 16}-01"
    binary = b"\x00\x00" + TRACE_ID.to_bytes(16, "big") + b"\x01" + SPAN_ID.to_bytes(8, "big") + b"\x02\x01"

    def parent(headers: dict, cloudevent: dict | None = None) -> tuple[int, int]:
        context = trace.get_current_span(extract_parent(headers, cloudevent)).get_span_context()
        return context.trace_id, context.span_id

    assert parent({"traceparent": TRACEPARENT}, {"traceparent": other}) == (TRACE_ID, SPAN_ID)
    assert parent({"grpc-trace-bin": binary}, {"traceparent": other}) == (TRACE_ID, SPAN_ID)
    assert parent({}, {"traceparent": TRACEPARENT}) == (TRACE_ID, SPAN_ID)
    assert parent({}, {"traceparent": "garbage"}) == (0, 0)
    assert parent({}) == (0, 0)


def test_an_installed_but_unusable_library_is_skipped_quietly(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """dapr >= 1.19 ships dapr.ext.grpc in the core wheel, but importing it without the dapr[grpc]
    extra raises ImportError; an older version lacks a method: those hooks are skipped without a
    warning, the others still apply."""
    import sidetrace.instrumentors.dapr as dapr_instrumentation
    from sidetrace.instrumentors.dapr import DaprInstrumentor

    (tmp_path / "sidetrace_unusable_ext.py").write_text("raise ImportError('missing optional dependency')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(dapr_instrumentation, "_PATCHES", (
        ("sidetrace_unusable_ext", "sidetrace_unusable_ext", "App.run", "_server:on_invoke_wrapper"),
        ("requests", "requests.sessions", "Session.no_such_method", "_http_client:requests_send_wrapper"),
        ("requests", "requests.sessions", "Session.send", "_http_client:requests_send_wrapper"),
    ))
    DaprInstrumentor().instrument()
    try:
        assert dapr_instrumentation._APPLIED == [("requests.sessions", "Session.send")]
    finally:
        DaprInstrumentor().uninstrument()
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]


def test_inbound_spans_under_a_web_framework_span() -> None:
    """With a framework instrumentation's SERVER span current: an invocation enriches it; a delivery
    is a CONSUMER child of it, or of the CloudEvent's producer when the headers carried no context."""
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from sidetrace.instrumentors._messaging import Guard
    from sidetrace.instrumentors.dapr._server import _http_spec, serve
    from sidetrace.instrumentors.dapr._telemetry import Telemetry

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    telemetry = Telemetry(provider.get_tracer("sidetrace"), NoOpMeterProvider().get_meter("x"), Guard("dapr"))
    framework = provider.get_tracer("framework")
    event = b'{"topic": "orders", "pubsubname": "pubsub", "traceparent": "' + TRACEPARENT.encode() + b'"}'
    headers = {"traceparent": f"00-{'1' * 32}-{'2' * 16}-01"}
    invocation = {**headers, "dapr-callee-app-id": "worker"}
    delivery_headers = {**headers, "content-type": "application/cloudevents+json"}
    parent = extract_parent(headers)

    with framework.start_as_current_span("POST", context=parent, kind=SpanKind.SERVER) as request_span, \
            serve(telemetry, _http_spec, invocation, "POST", "/process", None) as ours:
        assert ours is None
    assert request_span.name == "invoke worker/process"
    assert request_span.attributes["dapr.app_id"] == "worker"

    with framework.start_as_current_span("POST", context=parent, kind=SpanKind.SERVER) as request_span, \
            serve(telemetry, _http_spec, delivery_headers, "POST", "/orders", event) as delivery:
        pass
    assert delivery.parent.span_id == request_span.get_span_context().span_id

    with framework.start_as_current_span("POST", kind=SpanKind.SERVER), \
            serve(telemetry, _http_spec, {"content-type": "application/cloudevents+json"}, "POST", "/orders",
                  event) as delivery:
        pass
    assert (delivery.parent.trace_id, delivery.parent.span_id) == (TRACE_ID, SPAN_ID)
    assert delivery.name == "process pubsub/orders" and delivery.kind is SpanKind.CONSUMER
