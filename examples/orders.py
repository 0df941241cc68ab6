"""Service A, "orders": takes orders over HTTP and runs each as a Temporal workflow, whose activity
publishes the order to the ORDERS JetStream stream.

No tracing code: run it under `sidetrace instrument` (examples/run_demo.py does).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from datetime import timedelta

from temporalio import activity, workflow

with workflow.unsafe.imports_passed_through():
    import nats
    from aiohttp import web
    from nats.js import JetStreamContext
    from temporalio.client import Client
    from temporalio.worker import Worker

NATS_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
TEMPORAL_ADDRESS = os.environ.get("TEMPORAL_ADDRESS", "127.0.0.1:7233")
PORT = int(os.environ.get("PORT", "8001"))
TASK_QUEUE = "orders"


class OrderActivities:
    def __init__(self, js: JetStreamContext) -> None:
        self.js = js

    @activity.defn
    async def publish_order(self, order: dict) -> int:
        ack = await self.js.publish("orders.created", json.dumps(order).encode())
        return ack.seq


@workflow.defn
class PlaceOrder:
    @workflow.run
    async def run(self, order: dict) -> int:
        return await workflow.execute_activity_method(OrderActivities.publish_order, order,
                                                      start_to_close_timeout=timedelta(seconds=10))


async def place_order(request: web.Request) -> web.Response:
    order = await request.json()
    order.setdefault("id", uuid.uuid4().hex[:8])
    await request.app["temporal"].start_workflow(PlaceOrder.run, order, id=f"order-{order['id']}",
                                                 task_queue=TASK_QUEUE)
    return web.json_response({"id": order["id"]}, status=202)


async def main() -> None:
    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    await js.add_stream(name="ORDERS", subjects=["orders.*"])
    client = await Client.connect(TEMPORAL_ADDRESS)
    app = web.Application()
    app["temporal"] = client
    app.router.add_post("/orders", place_order)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", PORT).start()
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    async with Worker(client, task_queue=TASK_QUEUE, workflows=[PlaceOrder],
                      activities=[OrderActivities(js).publish_order]):
        await stopping.wait()
    await runner.cleanup()
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
