"""A web app served by pre-fork servers in the tests (gunicorn, uvicorn workers, uWSGI), with no tracing code:
each route answers with the serving worker's pid, so a test can tell which worker handled which request."""

from __future__ import annotations

import os

from fastapi import FastAPI
from flask import Flask

app = Flask(__name__)


@app.route("/pid")
def pid() -> str:
    return str(os.getpid())


asgi_app = FastAPI()


@asgi_app.get("/pid")
async def asgi_pid() -> int:
    return os.getpid()
