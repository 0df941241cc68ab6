"""Service C, "fulfilment": a method that Dapr invokes (POST /orders). It prices the order with the
"pricing" service over plain HTTP, saves it in the Dapr state store and publishes an
``orders.fulfilled`` event through Dapr pub/sub, all with aiohttp.

No tracing code: run it under `sidetrace instrument`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

from aiohttp import ClientSession, web

APP_PORT = int(os.environ.get("APP_PORT", "8003"))
DAPR = f"http://127.0.0.1:{os.environ.get('DAPR_HTTP_PORT', '3501')}"
PRICING_URL = os.environ.get("PRICING_URL", "http://127.0.0.1:8005")


async def fulfil(request: web.Request) -> web.Response:
    order = await request.json()
    session: ClientSession = request.app["session"]
    async with session.get(f"{PRICING_URL}/prices/{order['item']}") as response:
        response.raise_for_status()
        price = (await response.json())["price"]
    fulfilled = {**order, "total": price * order["quantity"]}
    async with session.post(f"{DAPR}/v1.0/state/statestore",
                            json=[{"key": f"order-{order['id']}", "value": fulfilled}]) as response:
        response.raise_for_status()
    async with session.post(f"{DAPR}/v1.0/publish/pubsub/orders.fulfilled", json=fulfilled) as response:
        response.raise_for_status()
    return web.json_response(fulfilled)


async def client_session(app: web.Application) -> AsyncIterator[None]:
    async with ClientSession() as session:
        app["session"] = session
        yield


if __name__ == "__main__":
    app = web.Application()
    app.cleanup_ctx.append(client_session)
    app.router.add_post("/orders", fulfil)
    web.run_app(app, host="127.0.0.1", port=APP_PORT, print=None)
