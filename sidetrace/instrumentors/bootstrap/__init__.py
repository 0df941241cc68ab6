"""Zero-code start-up for apps: `sidetrace instrument -- python app.py` puts this package's directory
on PYTHONPATH, so Python imports its ``sitecustomize`` before the app, which calls :func:`start`.

``start`` does what ``opentelemetry-instrument`` does, with the agent on this host as the default
destination: the SDK is configured by OpenTelemetry's own configurator, so every standard ``OTEL_*``
variable applies (service name, resource attributes, exporters, protocol, endpoint, sampler, batch
settings), and every installed instrumentation registered under the ``opentelemetry_instrumentor``
entry points is switched on after the same dependency check, minus
``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS``. On top of that:

- an agent that is down costs the app at most :data:`SHUTDOWN_BUDGET_SECONDS` at exit (the stock
  exporters keep retrying for their whole timeout, 10 s by default) and one printed warning;
- one instrumentation failing keeps neither the others nor the app from starting;
- a multiprocessing child sends its last spans and metrics before it exits, and a Pool worker also when its
  pool terminates it (the end of a ``with Pool()`` block), within the same exit budget;
- a uvicorn server (plain, or a gunicorn ``UvicornWorker``) stopped by SIGTERM or SIGINT sends its last spans
  and metrics before it dies of the signal it raises again, within the same budget, and a ``UvicornWorker``
  sends them when gunicorn's fast stop sends it SIGQUIT;
- a ``threading.Thread`` subclass that overrides ``run()`` continues the caller's trace, as ``Thread`` does;
- spans the exporter could not deliver are counted where the app can see them: :func:`dropped_spans`, and
  the ``sidetrace.exporter.dropped_spans`` counter on the app's own MeterProvider.

It never raises: a failure is logged once and the app starts as usual.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from opentelemetry.instrumentation.auto_instrumentation._load import (
    _EntryPointDistFinder,
    _load_configurators,
    _load_distro,
    _load_instrumentors,
)
from opentelemetry.instrumentation.dependencies import (
    DependencyConflictError,
    get_dependency_conflicts,
    get_dist_dependency_conflicts,
)
from opentelemetry.instrumentation.distro import BaseDistro
from opentelemetry.instrumentation.environment_variables import (
    OTEL_PYTHON_CONFIGURATOR,
    OTEL_PYTHON_DISABLED_INSTRUMENTATIONS,
    OTEL_PYTHON_DISTRO,
)

log = logging.getLogger("sidetrace.bootstrap")

DEFAULT_ENDPOINT = "http://127.0.0.1:4317"
DEFAULT_HTTP_ENDPOINT = "http://127.0.0.1:4318"
ENDPOINT_VARIABLE = "SIDETRACE_AGENT_ENDPOINT"
# What the exporters get at exit to deliver what is left before they stop retrying: the agent is on this
# host, so a live one takes milliseconds, and a dead one must not hold the app's exit for the exporter's
# full timeout.
SHUTDOWN_BUDGET_SECONDS = 0.3
# An agent that answers (no export problem seen) may take longer when the host is loaded: the exporters are
# left to finish for up to this long, so a busy machine does not cost the app its last spans.
LIVE_AGENT_BUDGET_SECONDS = 3.0
# An export problem this recent counts as "the agent is down or refusing" at exit.
PROBLEM_MEMORY_SECONDS = 30.0
# The loggers through which the stock exporters and batch processors report failed exports.
EXPORT_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.sdk._shared_internal",
    "opentelemetry.sdk.metrics._internal.export",
)


class OneWarning(logging.Filter):
    """Lets the first export problem through and drops (and counts) the rest: an agent that is down makes
    the stock exporters log on every retry of every batch, which would flood the app's stderr."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.shown = False
        self.suppressed = 0
        self.last_problem: float | None = None  # time.monotonic() of the latest export problem

    def problem(self) -> None:
        self.last_problem = time.monotonic()

    def recent_problem(self) -> bool:
        last = self.last_problem
        return last is not None and time.monotonic() - last < PROBLEM_MEMORY_SECONDS

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        self.problem()
        with self.lock:
            if not self.shown:
                self.shown = True
                record.msg = f"sidetrace: {record.msg} (further export problems are not printed)"
                return True
            self.suppressed += 1
            return False


EXPORT_PROBLEMS = OneWarning()


class ExitBudget:
    """Shuts every exporter down :data:`SHUTDOWN_BUDGET_SECONDS` after the app's exit began if an export
    problem was seen (the agent down or refusing), which stops their retries: the SDK's own exit handlers then
    return at once instead of waiting out the export timeout. With no problem seen the agent is answering, so
    the exporters get up to :data:`LIVE_AGENT_BUDGET_SECONDS` to deliver what is left, and are stopped as soon
    as a problem shows."""

    def __init__(self) -> None:
        self.exporters: list[Any] = []

    def track(self, exporter: Any) -> Any:
        self.exporters.append(exporter)
        return exporter

    def arm(self) -> None:
        # atexit runs handlers last-registered first: registered after the SDK's, this one starts the clock
        # before the SDK's providers begin their final flush.
        atexit.register(self._start_clock)

    def _start_clock(self, seconds: float = SHUTDOWN_BUDGET_SECONDS) -> None:
        clock = threading.Thread(target=self._run_clock, args=(seconds,), name="sidetrace-exit-budget", daemon=True)
        try:
            clock.start()
        except RuntimeError:  # an interpreter that refuses new threads at exit: the stock timeouts apply
            return

    def _run_clock(self, seconds: float) -> None:
        started = time.monotonic()
        time.sleep(seconds)
        while not EXPORT_PROBLEMS.recent_problem() and time.monotonic() - started < LIVE_AGENT_BUDGET_SECONDS:
            time.sleep(0.05)
        self._stop_exporters()

    def _stop_exporters(self) -> None:
        for exporter in self.exporters:
            try:
                exporter.shutdown()
            except Exception as exc:  # an exporter that cannot stop early keeps its own timeout
                log.debug("sidetrace: could not stop %r early: %s", exporter, exc)


EXIT_BUDGET = ExitBudget()


class DropCountingExporter:
    """Passes spans to the exporter it wraps and counts those of every export that failed: the batch
    processor lets them go, and with the warnings held back to one line, this count is what tells the app
    how much an agent that was away cost it."""

    def __init__(self, exporter: Any) -> None:
        from opentelemetry import metrics

        self.exporter = exporter
        self.lock = threading.Lock()
        self.dropped = 0
        # Made now, from the global provider's proxy, which hands it to the app's MeterProvider once the
        # configurator sets that: a meter asked for at a drop during exit would meet a provider already shut down.
        self.counter = metrics.get_meter("sidetrace.bootstrap").create_counter(
            "sidetrace.exporter.dropped_spans", unit="{span}",
            description="Spans the app's exporter failed to deliver (the agent away or refusing).")

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            result = self.exporter.export(spans)
        except Exception:
            self._count(len(spans))
            raise
        if result is not SpanExportResult.SUCCESS:
            self._count(len(spans))
        return result

    def _count(self, spans: int) -> None:
        EXPORT_PROBLEMS.problem()
        with self.lock:
            self.dropped += spans
        try:
            self.counter.add(spans)
        except Exception as exc:  # noqa: BLE001 - the count above stands; a metrics fault must not reach the app
            log.debug("sidetrace: could not count dropped spans as a metric: %s", exc)

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


_EXPORTERS: list[DropCountingExporter] = []


def dropped_spans() -> int:
    """How many spans this process's exporters failed to deliver since `sidetrace instrument` started it."""
    return sum(exporter.dropped for exporter in _EXPORTERS)


def _export_span_processor(exporter: Any) -> Any:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    counting = DropCountingExporter(exporter)
    _EXPORTERS.append(counting)
    return BatchSpanProcessor(EXIT_BUDGET.track(counting))


def _track_metric_exporters() -> None:
    from opentelemetry import metrics

    # The SDK's configurator builds the periodic readers itself and offers no hook for them: their exporters
    # are reached through the reader, and a provider of another shape is left to its own timeouts.
    provider = metrics.get_meter_provider()
    # Where the readers are kept moved between SDK releases (1.45 keeps them on the provider itself).
    readers = getattr(provider, "_metric_readers", None) or getattr(
        getattr(provider, "_sdk_config", None), "metric_readers", ())
    for reader in readers:
        exporter = getattr(reader, "_exporter", None)
        if exporter is not None:
            EXIT_BUDGET.track(exporter)


CHILD_FLUSH_MILLIS = 1000  # what a child process may spend sending its last spans and metrics before it exits
# How long a terminated Pool worker waits for its flush before it dies of the signal: the exit budget has stopped
# the exporters by then, so only a flush stuck on a lock the interrupted code held is cut short.
TERMINATED_FLUSH_SECONDS = LIVE_AGENT_BUDGET_SECONDS + 0.5
_CHILD_FLUSHING = threading.Event()  # set once this child has begun its last flush
_CHILD_FLUSHED = threading.Event()  # set once that flush is over
_TERMINATED_BY: list[int] = []  # a deadly signal that came during that flush: the process dies of it once it is over


def _flush_child_processes() -> None:
    """Make a multiprocessing child (Process, Pool and ProcessPoolExecutor workers, any start method) flush its
    spans and metrics before it exits: a fork or forkserver child leaves through os._exit, so no exit handler of
    the SDK ever runs (a spawn child runs them after this flush, with nothing left to send). A Pool
    worker also flushes when its pool terminates it (as the end of a ``with Pool()`` block does), then dies of
    the SIGTERM as it would have."""
    import multiprocessing.process

    bootstrap = multiprocessing.process.BaseProcess._bootstrap
    if getattr(bootstrap, "_sidetrace_flushes", False):
        return

    def flushing_bootstrap(self: Any, *args: Any, **kwargs: Any) -> int:
        if _is_pool_worker(self):
            _flush_when_terminated()
        try:
            return bootstrap(self, *args, **kwargs)
        finally:
            _flush_child()
            if _TERMINATED_BY:
                os.kill(os.getpid(), _TERMINATED_BY[0])

    flushing_bootstrap._sidetrace_flushes = True  # type: ignore[attr-defined]
    multiprocessing.process.BaseProcess._bootstrap = flushing_bootstrap  # type: ignore[method-assign]


def _is_pool_worker(process: Any) -> bool:
    target = getattr(process, "_target", None)
    return (getattr(target, "__module__", ""), getattr(target, "__name__", "")) == ("multiprocessing.pool", "worker")


def _flush_child() -> None:
    if _CHILD_FLUSHING.is_set():
        return
    _CHILD_FLUSHING.set()
    try:
        # A flush's timeout does not bound an export already retrying toward an agent that is down (the stock
        # exporters give up only after their own timeout, 10 s): stopping the exporters does.
        EXIT_BUDGET._start_clock(CHILD_FLUSH_MILLIS / 1000)
        _flush_providers(CHILD_FLUSH_MILLIS)
    finally:
        _CHILD_FLUSHED.set()


def _flush_then_die(signum: int, frame: Any) -> None:
    """A signal handler standing in for the default action of a deadly signal: flush this process's spans and
    metrics, then die of the signal as the process would have (its parent sees the same status). The flush runs
    in a thread the handler waits for, bounded, so a lock held by the code the signal interrupted cannot keep the
    process alive. A process already leaving through its last flush dies of the signal once that flush is over,
    rather than going on to the interpreter's teardown; a second signal ends it at once."""
    signal.signal(signum, signal.SIG_DFL)
    if _CHILD_FLUSHING.is_set():  # already on its way out through the flush at its end
        if not _CHILD_FLUSHED.is_set():
            _TERMINATED_BY.append(signum)  # handlers run in the main thread, which is flushing: it dies when done
            return
        os.kill(os.getpid(), signum)
    try:
        flusher = threading.Thread(target=_flush_child, name="sidetrace-terminated-flush", daemon=True)
        flusher.start()
        flusher.join(TERMINATED_FLUSH_SECONDS)
    except Exception as exc:  # noqa: BLE001 - the process must still die of the signal it was sent
        log.warning("sidetrace: could not flush spans before dying of signal %d: %s", signum, exc)
    os.kill(os.getpid(), signum)


def _flush_when_terminated() -> None:
    """Flush a Pool worker's spans and metrics when SIGTERM comes, then let the signal end it
    (:func:`_flush_then_die`). A handler the app set stays."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:  # the app's own handler stays
        return
    try:
        signal.signal(signal.SIGTERM, _flush_then_die)
    except (ValueError, OSError) as exc:  # not the main thread, or no such signal here
        log.debug("sidetrace: a pool worker will not flush when terminated: %s", exc)


def _flush_uvicorn_servers() -> None:
    """Make uvicorn servers flush before a signal ends them. uvicorn catches SIGINT and SIGTERM while it serves,
    shuts down gracefully, then raises the signal again with the handler it found: where that is the default
    action (a gunicorn UvicornWorker resets them all; SIGTERM in any process) the process dies of it inside
    ``asyncio.run``, and no exit handler of the SDK runs. :func:`_flush_then_die` stands in for that default
    while uvicorn serves. A gunicorn UvicornWorker also flushes when its arbiter's fast stop sends SIGQUIT, which
    uvicorn's worker takes without stopping (its arbiter kills it after the graceful timeout)."""
    import wrapt

    wrapt.register_post_import_hook(_guarded(_flush_when_uvicorn_stops), "uvicorn.server")
    wrapt.register_post_import_hook(_guarded(_flush_when_uvicorn_worker_quits), "uvicorn.workers")


def _guarded(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    def guarded(module: Any) -> None:
        try:
            hook(module)
        except Exception as exc:  # noqa: BLE001 - the app imports and runs uvicorn whatever happens here
            log.warning("sidetrace: %s will not flush spans when it is stopped: %s", module.__name__, exc)

    return guarded


def _flush_when_uvicorn_stops(module: Any) -> None:
    capture_signals = module.Server.capture_signals
    if getattr(capture_signals, "_sidetrace_flushes", False):
        return
    handled = tuple(getattr(module, "HANDLED_SIGNALS", (signal.SIGINT, signal.SIGTERM)))

    @contextlib.contextmanager
    def flushing_capture_signals(self: Any) -> Iterator[None]:
        stood_in = _stand_in_for_default_actions(handled)
        try:
            with capture_signals(self):
                yield
        finally:
            for signum in stood_in:  # the server stopped without a signal: the default actions are back
                if signal.getsignal(signum) is _flush_then_die:
                    signal.signal(signum, signal.SIG_DFL)

    flushing_capture_signals._sidetrace_flushes = True  # type: ignore[attr-defined]
    module.Server.capture_signals = flushing_capture_signals


def _stand_in_for_default_actions(signals: tuple[int, ...]) -> list[int]:
    stood_in = []
    for signum in signals:
        try:
            if signal.getsignal(signum) is signal.SIG_DFL:
                signal.signal(signum, _flush_then_die)
                stood_in.append(signum)
        except Exception as exc:  # noqa: BLE001 - not the main thread (uvicorn captures nothing then either)
            log.debug("sidetrace: signal %d will not flush spans: %s", signum, exc)
    return stood_in


def _flush_when_uvicorn_worker_quits(module: Any) -> None:
    worker = module.UvicornWorker
    handle_exit = worker.handle_exit
    if getattr(handle_exit, "_sidetrace_flushes", False):
        return

    def flushing_handle_exit(self: Any, *args: Any, **kwargs: Any) -> Any:
        # The worker goes on serving until its arbiter kills it: the exporters stay up, and the flush runs beside it.
        try:
            threading.Thread(target=_flush_providers, args=(CHILD_FLUSH_MILLIS,), name="sidetrace-quit-flush",
                             daemon=True).start()
        except Exception as exc:  # noqa: BLE001 - the worker's own handling goes on
            log.warning("sidetrace: could not flush a quitting uvicorn worker's spans: %s", exc)
        return handle_exit(self, *args, **kwargs)

    flushing_handle_exit._sidetrace_flushes = True  # type: ignore[attr-defined]
    worker.handle_exit = flushing_handle_exit


def _flush_providers(timeout_millis: int) -> None:
    from opentelemetry import metrics, trace

    for provider in (trace.get_tracer_provider(), metrics.get_meter_provider()):
        flush = getattr(provider, "force_flush", None)
        if flush is None:
            continue
        try:
            flush(timeout_millis)
        except Exception as exc:  # noqa: BLE001 - a child's exit must go on whatever the exporter does
            log.debug("sidetrace: could not flush %r at a child's exit: %s", provider, exc)


def _default_environment() -> None:
    """Point the standard OTEL_* settings the user left unset at the agent on this host."""
    os.environ.setdefault("OTEL_TRACES_EXPORTER", "otlp")
    os.environ.setdefault("OTEL_METRICS_EXPORTER", "otlp")
    os.environ.setdefault("OTEL_LOGS_EXPORTER", "none")  # the agent takes traces and metrics, not logs
    if os.environ["OTEL_LOGS_EXPORTER"].strip().lower() == "none":
        # The logging instrumentation would otherwise put a handler on the root logger that feeds a logs
        # pipeline exporting nowhere, and an app that never configured logging would lose its warnings on
        # stderr (Python prints them only while the root logger has no handler). Trace ids on log records stay.
        os.environ.setdefault("OTEL_PYTHON_LOG_AUTO_INSTRUMENTATION", "false")
    endpoint = os.environ.get(ENDPOINT_VARIABLE)
    if endpoint:  # `sidetrace instrument --endpoint` names the agent: it wins over the environment
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    elif "OTEL_EXPORTER_OTLP_ENDPOINT" not in os.environ:
        # Per signal, as each signal's exporter reads its own protocol: OTLP/HTTP goes to the agent's 4318.
        generic = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc").strip()
        for signal, path in (("TRACES", "/v1/traces"), ("METRICS", "/v1/metrics")):
            protocol = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", generic).strip()
            os.environ.setdefault(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT",
                                  DEFAULT_HTTP_ENDPOINT + path if protocol.startswith("http") else DEFAULT_ENDPOINT)


class SidetraceDistro(BaseDistro):
    """The distro `sidetrace instrument` uses unless OTEL_PYTHON_DISTRO names another: the agent as default
    destination, and each instrumentation's own dependency check run even when its distribution declares
    none (sidetrace's do not: one distribution carries all three)."""

    def _configure(self, **kwargs: Any) -> None:
        _default_environment()

    def load_instrumentor(self, entry_point: EntryPoint, **kwargs: Any) -> None:
        kwargs.pop("skip_dep_check", None)
        instrumentor = entry_point.load()()
        try:
            instrumentor.instrument(raise_exception_on_conflict=True, **kwargs)
        except (DependencyConflictError, ImportError):
            raise  # the loader's own handling: skipped quietly when the library is absent
        except Exception as exc:  # one instrumentation failing must not keep the others or the app from starting
            log.warning("sidetrace: could not instrument %s: %s", entry_point.name, exc)


def _configure_sdk() -> None:
    if os.environ.get(OTEL_PYTHON_CONFIGURATOR):
        _load_configurators()
        return
    from opentelemetry.instrumentation.version import __version__ as auto_version
    from opentelemetry.sdk._configuration import _OTelSDKConfigurator

    kwargs: dict[str, Any] = {"auto_instrumentation_version": auto_version}
    if not os.environ.get("OTEL_CONFIG_FILE"):  # a declarative config file builds its own processors
        kwargs["export_span_processor"] = _export_span_processor
    _OTelSDKConfigurator().configure(**kwargs)
    _track_metric_exporters()
    EXIT_BUDGET.arm()


def start() -> None:
    """Configure the SDK toward the agent and switch on every installed instrumentation."""
    for name in EXPORT_LOGGERS:
        logging.getLogger(name).addFilter(EXPORT_PROBLEMS)
    distro: BaseDistro = _load_distro() if os.environ.get(OTEL_PYTHON_DISTRO) else SidetraceDistro()
    distro.configure()
    try:
        _configure_sdk()
    except ImportError as exc:
        log.warning("sidetrace: the OpenTelemetry SDK or its OTLP exporter is not installed (pip install "
                    "'sidetrace[sdk]'); spans are not exported: %s", exc)
    except Exception as exc:
        log.warning("sidetrace: could not configure the OpenTelemetry SDK: %s", exc)
    _flush_child_processes()
    try:
        _flush_uvicorn_servers()
    except Exception as exc:  # uvicorn runs as it would without us
        log.warning("sidetrace: uvicorn servers will not flush spans when they are stopped: %s", exc)
    _load_instrumentors(distro)
    try:
        _carry_context_into_run_overrides()
    except Exception as exc:  # the threading instrumentation's own coverage stands
        log.warning("sidetrace: Thread subclasses that override run() will not continue the caller's trace: %s", exc)


def _carry_context_into_run_overrides() -> None:
    """The threading instrumentation keeps the caller's context at ``Thread.start()`` and attaches it in
    ``Thread.run``, which a subclass that overrides ``run()`` never calls: attach that kept context around the
    thread's whole body instead, which every thread goes through. Threads it did not see start (the
    instrumentation disabled) are left as they are."""
    from opentelemetry import context

    bootstrap_inner = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]
    if getattr(bootstrap_inner, "_sidetrace_context", False):
        return

    def bootstrap_inner_in_context(self: threading.Thread) -> None:
        kept = getattr(self, "_otel_context", None)
        if kept is None:
            return bootstrap_inner(self)
        try:
            token = context.attach(kept)
        except Exception:  # noqa: BLE001 - the thread runs whatever our part does
            return bootstrap_inner(self)
        try:
            return bootstrap_inner(self)
        finally:
            context.detach(token)

    bootstrap_inner_in_context._sidetrace_context = True  # type: ignore[attr-defined]
    threading.Thread._bootstrap_inner = bootstrap_inner_in_context  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Instrumentation:
    """One ``opentelemetry_instrumentor`` entry point and what `sidetrace instrument` would do with it."""

    name: str
    distribution: str
    enabled: bool
    reason: str


def _disabled() -> set[str]:
    return {name.strip() for name in os.environ.get(OTEL_PYTHON_DISABLED_INSTRUMENTATIONS, "").split(",")
            if name.strip()}


def _assess(entry_point: EntryPoint, dist: Any, disabled: set[str]) -> tuple[bool, str]:
    if "*" in disabled or entry_point.name in disabled:
        return False, f"disabled by {OTEL_PYTHON_DISABLED_INSTRUMENTATIONS}"
    libraries = _instrumented_libraries(dist)
    conflict = get_dist_dependency_conflicts(dist) if dist is not None else None
    if conflict is None:
        try:
            instrumentor_class: Callable[[], Any] = entry_point.load()
        except ImportError as exc:
            return False, f"cannot be imported: {exc}"
        dependencies = list(instrumentor_class().instrumentation_dependencies())
        libraries = libraries or dependencies
        conflict = get_dependency_conflicts(dependencies)
    if conflict is not None:
        if conflict.found or conflict.found_any:
            return False, f"version conflict: needs {conflict.required or ', '.join(conflict.required_any)}, " \
                          f"found {conflict.found or ', '.join(conflict.found_any)}"
        return False, f"{conflict.required or ', '.join(conflict.required_any)} is not installed"
    return True, "instruments " + (", ".join(libraries) or "no particular library")


def _instrumented_libraries(dist: Any) -> list[str]:
    if dist is None:
        return []
    return [requirement.split(";")[0].strip() for requirement in dist.requires or ()
            if ";" in requirement and "instruments" in requirement.split(";", 1)[1]]


def survey() -> Iterator[Instrumentation]:
    """Every installed instrumentation, in entry point order, with whether `sidetrace instrument` switches it on
    in this interpreter and why (without switching anything on)."""
    finder = _EntryPointDistFinder()
    disabled = _disabled()
    for entry_point in entry_points(group="opentelemetry_instrumentor"):
        dist = finder.dist_for(entry_point)
        enabled, reason = _assess(entry_point, dist, disabled)
        label = f"{dist.metadata['Name']} {dist.version}" if dist is not None else "?"
        yield Instrumentation(entry_point.name, label, enabled, reason)
