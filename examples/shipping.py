"""Service D, "shipping": subscribed through Dapr pub/sub to ``orders.fulfilled`` (the sidecar
delivers each event as a CloudEvent to POST /orders-fulfilled).

No tracing code: run it under `sidetrace instrument`.
"""

from __future__ import annotations

import os

import uvicorn
from fastapi import FastAPI

APP_PORT = int(os.environ.get("APP_PORT", "8004"))

app = FastAPI()


@app.post("/orders-fulfilled")
async def order_fulfilled(event: dict) -> dict:
    order = event["data"]
    print(f"shipping order {order['id']}: {order['quantity']} x {order['item']}", flush=True)
    return {"status": "SUCCESS"}  # what Dapr expects from a subscriber that took the event


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=APP_PORT, log_level="warning")
