"""Service B, "dispatch": takes each new order from the ORDERS JetStream stream and asks the
"fulfilment" service to fulfil it, through its Dapr sidecar's HTTP API.

It calls the sidecar with `requests`, a blocking client, so from an executor thread: the way most
asyncio apps use a blocking library. No tracing code: run it under `sidetrace instrument`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

import nats
import requests
from nats.aio.msg import Msg

NATS_URL = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
DAPR_HTTP_PORT = int(os.environ.get("DAPR_HTTP_PORT", "3500"))


def fulfil(order: dict) -> dict:
    response = requests.post(f"http://127.0.0.1:{DAPR_HTTP_PORT}/v1.0/invoke/fulfilment/method/orders", json=order,
                             timeout=10)
    response.raise_for_status()
    return response.json()


async def main() -> None:
    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    await js.add_stream(name="ORDERS", subjects=["orders.*"])
    loop = asyncio.get_running_loop()

    async def handle(msg: Msg) -> None:
        order = json.loads(msg.data)
        result = await loop.run_in_executor(None, fulfil, order)
        print(f"order {order['id']} fulfilled: {result['total']}", flush=True)
        await msg.ack()

    # A durable consumer: orders published before this service started are delivered all the same.
    await js.subscribe("orders.created", durable="dispatch", cb=handle, manual_ack=True)
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    await stopping.wait()
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
