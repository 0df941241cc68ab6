"""Service E, "pricing": a Flask app that answers GET /prices/<item> over plain HTTP.

No tracing code: run it under `sidetrace instrument`.
"""

from __future__ import annotations

import os

from flask import Flask, abort

PORT = int(os.environ.get("PORT", "8005"))
PRICES = {"teapot": 12.5, "kettle": 30.0}

app = Flask(__name__)


@app.get("/prices/<item>")
def price(item: str) -> dict:
    if item not in PRICES:
        abort(404)
    return {"item": item, "price": PRICES[item]}


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=PORT)
