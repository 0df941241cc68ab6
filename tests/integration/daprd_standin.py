"""A STAND-IN for daprd, the Dapr sidecar: no daprd binary can be installed on these machines.

It is not Dapr. It serves the part of the Dapr API the tests use, in its own process like daprd:

- the gRPC API from the dapr SDK's own generated servicer (``dapr.proto.runtime.v1.Dapr``):
  InvokeService, PublishEvent, BulkPublishEventAlpha1/BulkPublishEvent, Get/Save/Delete/GetBulk
  State, ExecuteStateTransaction, InvokeBinding, GetSecret, GetConfiguration, SubscribeConfiguration
  (one message), TryLockAlpha1, UnlockAlpha1;
- the documented HTTP routes (https://docs.dapr.io/reference/api/): ``/v1.0/invoke/{app}/method/
  {method}``, ``/v1.0/publish/{pubsub}/{topic}``, ``/v1.0/state/{store}[/{key}]``,
  ``/v1.0/bindings/{name}``, ``/v1.0/secrets/{store}/{key}``, ``/v1.0/healthz[/outbound]``, and
  invocation by ``dapr-app-id`` header on any other path.

Like daprd it forwards service invocations to the target app (HTTP, or gRPC ``AppCallback.OnInvoke``)
with ``dapr-caller-app-id``/``dapr-callee-app-id`` and the caller's trace context (W3C headers; gRPC
apps also get ``grpc-trace-bin``, which grpcio consumes itself and never shows the app), passes the
app's status through, and delivers published messages to subscribers as CloudEvents
(``application/cloudevents+json``) whose ``traceparent`` field is the publisher's context. Unlike
daprd it makes no spans of its own: it forwards the context it received, so the callee's span is
the caller's child. Errors follow daprd's shapes: HTTP ``{"errorCode", "message"}`` bodies
(``ERR_STATE_STORE_NOT_FOUND`` 400, ``ERR_STATE_SAVE``/``ERR_STATE_GET`` 500, ``ERR_DIRECT_INVOKE``
500 for an unknown app id), gRPC status with a google.rpc.ErrorInfo detail (reason
``DAPR_STATE_NOT_FOUND``) for an unknown store.

Stores: ``statestore`` (in memory) and ``failingstore`` (every operation fails). It records every
request it receives and sends, with headers: ``GET /_standin/seen``. Apps and subscriptions are set
with ``POST /_standin/config`` ``{"app_id", "apps": {id: {"protocol", "port"}}, "subscriptions":
[{"pubsub", "topic", "app", "route", "trace_headers"}]}``.

Usage: python daprd_standin.py HTTP_PORT GRPC_PORT (prints "ready" when both listen).
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from typing import Any

import grpc
import grpc.aio
from aiohttp import ClientSession, web
from dapr.proto import api_service_v1, api_v1, appcallback_service_v1, appcallback_v1, common_v1
from google.protobuf import any_pb2, empty_pb2, struct_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

HOP_BY_HOP = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}
TRACE_KEYS = ("traceparent", "tracestate")


class StandIn:
    def __init__(self) -> None:
        self.app_id = "callerapp"
        self.apps: dict[str, dict[str, Any]] = {}
        self.subscriptions: list[dict[str, Any]] = []
        self.stores: dict[str, dict[str, bytes]] = {"statestore": {}}
        self.seen: list[dict[str, Any]] = []
        self.session: ClientSession | None = None
        self.deliveries: set[asyncio.Task] = set()

    def record(self, direction: str, api: str, target: str, headers: dict[str, Any]) -> None:
        self.seen.append({"direction": direction, "api": api, "target": target,
                          "headers": {k.lower(): (v.hex() if isinstance(v, bytes) else v) for k, v in headers.items()}})

    # --- forwarding to apps ------------------------------------------------------------------

    async def invoke_app(self, app_id: str, verb: str, method: str, body: bytes, content_type: str,
                         trace: dict[str, str], extra: dict[str, str] | None = None,
                         query: str = "") -> tuple[int, bytes, str]:
        app = self.apps[app_id]
        dapr_headers = {"dapr-caller-app-id": self.app_id, "dapr-callee-app-id": app_id}
        if app["protocol"] == "grpc":
            metadata = dict(dapr_headers, **trace, **_grpc_trace_bin(trace))
            self.record("out", "grpc", f"{app_id}/OnInvoke {method}", metadata)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app['port']}") as channel:
                request = common_v1.InvokeRequest(method=method, data=any_pb2.Any(value=body),
                                                  content_type=content_type,
                                                  http_extension=common_v1.HTTPExtension(
                                                      verb=common_v1.HTTPExtension.Verb.Value(verb.upper())))
                try:
                    response = await appcallback_service_v1.AppCallbackStub(channel).OnInvoke(
                        request, metadata=tuple(metadata.items()))
                except grpc.aio.AioRpcError as error:
                    return 500, json.dumps({"errorCode": "ERR_DIRECT_INVOKE",
                                            "message": f"fail to invoke, id: {app_id}, err: {error.details()}"}
                                           ).encode(), "application/json"
            return 200, response.data.value, response.content_type or "application/json"
        headers = {k: v for k, v in (extra or {}).items() if k.lower() not in HOP_BY_HOP}
        headers.update(trace)
        headers.update(dapr_headers)
        if content_type:
            headers["content-type"] = content_type
        url = f"http://127.0.0.1:{app['port']}/{method}" + (f"?{query}" if query else "")
        self.record("out", "http", f"{verb} {url}", headers)
        assert self.session is not None
        async with self.session.request(verb, url, data=body, headers=headers) as response:
            return response.status, await response.read(), response.headers.get("content-type", "")

    def publish(self, pubsub: str, topic: str, data: bytes, content_type: str, trace: dict[str, str]) -> None:
        for subscription in self.subscriptions:
            if subscription["pubsub"] == pubsub and subscription["topic"] == topic:
                task = asyncio.get_running_loop().create_task(
                    self.deliver(subscription, data, content_type, trace))
                self.deliveries.add(task)
                task.add_done_callback(self.deliveries.discard)

    async def deliver(self, subscription: dict[str, Any], data: bytes, content_type: str,
                      trace: dict[str, str]) -> None:
        pubsub, topic = subscription["pubsub"], subscription["topic"]
        event: dict[str, Any] = {
            "specversion": "1.0", "id": str(uuid.uuid4()), "source": self.app_id, "type": "com.dapr.event.sent",
            "datacontenttype": content_type or "application/json", "topic": topic, "pubsubname": pubsub,
            "traceid": trace.get("traceparent", ""), "traceparent": trace.get("traceparent", ""),
            "tracestate": trace.get("tracestate", "")}
        try:
            event["data"] = json.loads(data) if "json" in (content_type or "application/json") else data.decode()
        except ValueError:
            event["data"] = data.decode(errors="replace")
        app = self.apps[subscription["app"]]
        headers = dict(trace) if subscription.get("trace_headers", True) else {}
        if app["protocol"] == "grpc":
            extensions = struct_pb2.Struct()
            extensions.update({k: event[k] for k in ("traceid", "traceparent", "tracestate")})
            metadata = dict(headers, **_grpc_trace_bin(headers))
            self.record("out", "grpc", f"{subscription['app']}/OnTopicEvent {pubsub}/{topic}", metadata)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app['port']}") as channel:
                await appcallback_service_v1.AppCallbackStub(channel).OnTopicEvent(appcallback_v1.TopicEventRequest(
                    id=event["id"], source=event["source"], type=event["type"], spec_version="1.0",
                    data_content_type=event["datacontenttype"], data=data, topic=topic, pubsub_name=pubsub,
                    path=subscription.get("route", ""), extensions=extensions), metadata=tuple(metadata.items()))
            return
        headers["content-type"] = "application/cloudevents+json"
        url = f"http://127.0.0.1:{app['port']}{subscription['route']}"
        self.record("out", "http", f"POST {url}", headers)
        assert self.session is not None
        async with self.session.post(url, data=json.dumps(event).encode(), headers=headers) as response:
            await response.read()

    # --- HTTP API -----------------------------------------------------------------------------

    def http_app(self) -> web.Application:
        app = web.Application()
        app.middlewares.append(self._record_middleware)
        app.router.add_get("/_standin/seen", lambda r: web.json_response(self.seen))
        app.router.add_post("/_standin/config", self.configure)
        app.router.add_get("/v1.0/healthz", lambda r: web.Response(status=204))
        app.router.add_get("/v1.0/healthz/outbound", lambda r: web.Response(status=204))
        app.router.add_route("*", "/v1.0/invoke/{app}/method/{method:.*}", self.http_invoke)
        app.router.add_post("/v1.0/publish/{pubsub}/{topic}", self.http_publish)
        app.router.add_post("/v1.0/state/{store}", self.http_save)
        app.router.add_get("/v1.0/state/{store}/{key}", self.http_get)
        app.router.add_delete("/v1.0/state/{store}/{key}", self.http_delete)
        app.router.add_post("/v1.0/bindings/{name}", self.http_binding)
        app.router.add_get("/v1.0/secrets/{store}/{key}", self.http_secret)
        app.router.add_route("*", "/{path:.*}", self.http_proxy)  # invocation by dapr-app-id header
        return app

    @web.middleware
    async def _record_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith("/_standin"):
            self.record("in", "http", f"{request.method} {request.path}", dict(request.headers))
        return await handler(request)

    async def configure(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.app_id = body.get("app_id", self.app_id)
        self.apps = body.get("apps", {})
        self.subscriptions = body.get("subscriptions", [])
        self.seen.clear()
        return web.Response(status=204)

    async def http_invoke(self, request: web.Request) -> web.Response:
        app_id, method = request.match_info["app"], request.match_info["method"]
        if app_id not in self.apps:
            return _dapr_error(500, "ERR_DIRECT_INVOKE",
                               f"fail to invoke, id: {app_id}, err: couldn't find service: {app_id}")
        trace = {k: request.headers[k] for k in TRACE_KEYS if k in request.headers}
        status, body, content_type = await self.invoke_app(
            app_id, request.method, method, await request.read(), request.content_type if request.can_read_body
            else "", trace, dict(request.headers), request.query_string)
        return web.Response(status=status, body=body, headers={"content-type": content_type} if content_type else {})

    async def http_proxy(self, request: web.Request) -> web.Response:
        """Service invocation by header: any other path, with the target in ``dapr-app-id``."""
        app_id = request.headers.get("dapr-app-id")
        if app_id is None:
            return web.Response(status=404)
        if app_id not in self.apps:
            return _dapr_error(500, "ERR_DIRECT_INVOKE",
                               f"fail to invoke, id: {app_id}, err: couldn't find service: {app_id}")
        trace = {k: request.headers[k] for k in TRACE_KEYS if k in request.headers}
        status, body, content_type = await self.invoke_app(
            app_id, request.method, request.match_info["path"], await request.read(),
            request.content_type if request.can_read_body else "", trace,
            {k: v for k, v in request.headers.items() if k.lower() != "dapr-app-id"}, request.query_string)
        return web.Response(status=status, body=body, headers={"content-type": content_type} if content_type else {})

    async def http_publish(self, request: web.Request) -> web.Response:
        trace = {k: request.headers[k] for k in TRACE_KEYS if k in request.headers}
        self.publish(request.match_info["pubsub"], request.match_info["topic"], await request.read(),
                     request.content_type, trace)
        return web.Response(status=204)

    def _store(self, name: str) -> dict[str, bytes] | web.Response:
        if name == "failingstore":
            return _dapr_error(500, "ERR_STATE_SAVE", f"failed saving state in state store {name}: stand-in failure")
        if name not in self.stores:
            return _dapr_error(400, "ERR_STATE_STORE_NOT_FOUND", f"state store {name} is not found")
        return self.stores[name]

    async def http_save(self, request: web.Request) -> web.Response:
        store = self._store(request.match_info["store"])
        if isinstance(store, web.Response):
            return store
        for item in await request.json():
            store[item["key"]] = json.dumps(item.get("value")).encode()
        return web.Response(status=204)

    async def http_get(self, request: web.Request) -> web.Response:
        name = request.match_info["store"]
        if name == "failingstore":
            return _dapr_error(500, "ERR_STATE_GET", f"fail to get {request.match_info['key']} from state store "
                                                     f"{name}: stand-in failure")
        store = self._store(name)
        if isinstance(store, web.Response):
            return store
        value = store.get(request.match_info["key"])
        return web.Response(status=204) if value is None else web.Response(body=value,
                                                                           content_type="application/json")

    async def http_delete(self, request: web.Request) -> web.Response:
        store = self._store(request.match_info["store"])
        if isinstance(store, web.Response):
            return store
        store.pop(request.match_info["key"], None)
        return web.Response(status=204)

    async def http_binding(self, request: web.Request) -> web.Response:
        return web.json_response({"echo": (await request.json()).get("data")})

    async def http_secret(self, request: web.Request) -> web.Response:
        return web.json_response({request.match_info["key"]: "s3cr3t"})


class DaprServicer(api_service_v1.DaprServicer):
    """The gRPC API: the SDK's generated servicer with the methods the tests use."""

    def __init__(self, standin: StandIn) -> None:
        self.standin = standin

    def _seen(self, context: grpc.aio.ServicerContext, method: str) -> dict[str, str]:
        metadata = {k: v for k, v in context.invocation_metadata() or ()}
        self.standin.record("in", "grpc", method, metadata)
        return {k: metadata[k] for k in TRACE_KEYS if k in metadata}

    async def _store(self, name: str, context: grpc.aio.ServicerContext, operation: str) -> dict[str, bytes]:
        if name == "failingstore":
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"failed {operation} state in state store {name}: stand-in failure")
        if name not in self.standin.stores:
            info = any_pb2.Any()
            info.Pack(error_details_pb2.ErrorInfo(reason="DAPR_STATE_NOT_FOUND", domain="dapr.io",
                                                  metadata={"storeName": name}))
            await context.abort_with_status(rpc_status.to_status(status_pb2.Status(
                code=code_pb2.INVALID_ARGUMENT, message=f"state store {name} is not found", details=[info])))
        return self.standin.stores[name]

    async def InvokeService(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        trace = self._seen(context, "InvokeService")
        if request.id not in self.standin.apps:
            await context.abort(grpc.StatusCode.INTERNAL, f"fail to invoke, id: {request.id}, err: couldn't find "
                                                          f"service: {request.id}")
        message = request.message
        verb = common_v1.HTTPExtension.Verb.Name(message.http_extension.verb) if message.HasField(
            "http_extension") else "POST"
        status, body, content_type = await self.standin.invoke_app(
            request.id, verb if verb != "NONE" else "POST", message.method, message.data.value,
            message.content_type, trace)
        if status >= 400:
            await context.abort(grpc.StatusCode.UNKNOWN, f"app answered {status}: {body[:200]!r}")
        return common_v1.InvokeResponse(data=any_pb2.Any(value=body), content_type=content_type)

    async def PublishEvent(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        trace = self._seen(context, "PublishEvent")
        self.standin.publish(request.pubsub_name, request.topic, request.data, request.data_content_type, trace)
        return empty_pb2.Empty()

    async def BulkPublishEventAlpha1(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        trace = self._seen(context, "BulkPublishEvent")
        for entry in request.entries:
            self.standin.publish(request.pubsub_name, request.topic, entry.event, entry.content_type, trace)
        return api_v1.BulkPublishResponse()

    BulkPublishEvent = BulkPublishEventAlpha1

    async def GetState(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        self._seen(context, "GetState")
        store = await self._store(request.store_name, context, "getting")
        return api_v1.GetStateResponse(data=store.get(request.key, b""))

    async def SaveState(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        self._seen(context, "SaveState")
        store = await self._store(request.store_name, context, "saving")
        for item in request.states:
            store[item.key] = item.value
        return empty_pb2.Empty()

    async def DeleteState(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        self._seen(context, "DeleteState")
        (await self._store(request.store_name, context, "deleting")).pop(request.key, None)
        return empty_pb2.Empty()

    async def GetBulkState(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        self._seen(context, "GetBulkState")
        store = await self._store(request.store_name, context, "getting")
        return api_v1.GetBulkStateResponse(items=[api_v1.BulkStateItem(key=k, data=store.get(k, b""))
                                                  for k in request.keys])

    async def ExecuteStateTransaction(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        self._seen(context, "ExecuteStateTransaction")
        store = await self._store(request.storeName, context, "executing")
        for operation in request.operations:
            if operation.operationType == "upsert":
                store[operation.request.key] = operation.request.value
            else:
                store.pop(operation.request.key, None)
        return empty_pb2.Empty()

    async def InvokeBinding(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        self._seen(context, "InvokeBinding")
        return api_v1.InvokeBindingResponse(data=request.data)

    async def GetConfiguration(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        self._seen(context, "GetConfiguration")
        return api_v1.GetConfigurationResponse(
            items={key: common_v1.ConfigurationItem(value="on", version="1") for key in request.keys})

    GetConfigurationAlpha1 = GetConfiguration

    async def TryLockAlpha1(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        self._seen(context, "TryLockAlpha1")
        return api_v1.TryLockResponse(success=True)

    async def UnlockAlpha1(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        self._seen(context, "UnlockAlpha1")
        return api_v1.UnlockResponse(status=api_v1.UnlockResponse.Status.SUCCESS)

    async def SubscribeConfiguration(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        self._seen(context, "SubscribeConfiguration")
        yield api_v1.SubscribeConfigurationResponse(id="subscription-1")

    async def GetSecret(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        self._seen(context, "GetSecret")
        return api_v1.GetSecretResponse(data={request.key: "s3cr3t"})


def _dapr_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"errorCode": code, "message": message}, status=status)


def _grpc_trace_bin(trace: dict[str, str]) -> dict[str, Any]:
    """W3C traceparent as daprd's gRPC ``grpc-trace-bin`` (OpenCensus binary format)."""
    parent = trace.get("traceparent", "")
    parts = parent.split("-")
    if len(parts) != 4:
        return {}
    return {"grpc-trace-bin": b"\x00\x00" + bytes.fromhex(parts[1]) + b"\x01" + bytes.fromhex(parts[2])
            + b"\x02" + bytes.fromhex(parts[3])}


async def main(http_port: int, grpc_port: int) -> None:
    standin = StandIn()
    standin.session = ClientSession()
    runner = web.AppRunner(standin.http_app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", http_port).start()
    server = grpc.aio.server()
    api_service_v1.add_DaprServicer_to_server(DaprServicer(standin), server)
    server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    await server.start()
    print("ready", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop(0)
        await runner.cleanup()
        await standin.session.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
