"""Imported by Python at start-up when `sidetrace instrument` put this directory on PYTHONPATH."""

import importlib.machinery
import importlib.util
import os
import sys

try:
    from sidetrace.instrumentors.bootstrap import start
except ImportError as exc:
    print(f"sidetrace: not instrumenting: this Python ({sys.executable}) cannot import {exc.name or 'sidetrace'}; "
          f"install it there ({sys.executable} -m pip install 'sidetrace[sdk]') or run the app with the Python "
          "sidetrace is installed in", file=sys.stderr)
else:
    try:
        start()
    except Exception as exc:  # the app starts whatever happens here
        print(f"sidetrace: instrumentation not started: {exc}", file=sys.stderr)


def _run_shadowed_sitecustomize() -> None:
    """Python imports only the first sitecustomize on the path: run the one this one shadows, if any.

    It is run from its file rather than imported, because the import system is still importing this module
    under the same name and expects to find it in sys.modules afterwards.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


_run_shadowed_sitecustomize()
