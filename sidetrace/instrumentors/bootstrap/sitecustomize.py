"""Imported by Python at start-up when `sidetrace instrument` put this directory on PYTHONPATH."""

import contextlib
import importlib
import os
import sys

try:
    from sidetrace.instrumentors.bootstrap import start

    start()
except Exception as exc:  # the app starts whatever happens here
    print(f"sidetrace: instrumentation not started: {exc}", file=sys.stderr)

# Python imports only the first sitecustomize on the path: run the one this one shadows, if any.
_here = os.path.dirname(os.path.abspath(__file__))
_saved = sys.path[:]
try:
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    del sys.modules["sitecustomize"]
    with contextlib.suppress(ImportError):
        importlib.import_module("sitecustomize")
finally:
    sys.path = _saved
