"""Temporal instrumentation for temporalio: clients, workflows, activities and handlers, wired automatically.

``TemporalInstrumentor().instrument()`` adds :class:`TracingInterceptor` to every client made with
``temporalio.client.Client.connect`` (its client half) and to every ``temporalio.worker.Worker``: no
interceptors to pass by hand. A client or worker that already has a tracing interceptor (temporalio's
own OpenTelemetry interceptor or plugin or a subclass, or ours, given directly or added by a plugin) is
left to it (no double spans); a worker that has one in its own ``interceptors=`` or ``plugins=`` makes
its spans through it alone, even on a client we trace. A worker on a client made before
``instrument()`` works with a copy of that client that we trace (made without re-running the client's
plugins), so what it starts through its client (``activity.client()``, ``nexus.client()``) continues
its spans' traces. After ``uninstrument()`` the client halves it added pass every call through.
What it traces:

- client calls: ``StartWorkflow:{type}``, ``SignalWithStartWorkflow:{type}``,
  ``StartUpdateWithStartWorkflow:{type}`` (the started run and the update are both its children),
  ``SignalWorkflow:{name}``, ``QueryWorkflow:{name}``, ``StartWorkflowUpdate:{name}`` (CLIENT), with
  ``temporal.namespace``, ``temporal.workflow.id``, ``temporal.workflow.type`` and
  ``temporal.task_queue``;
- activities: ``RunActivity:{type}`` (SERVER), one span per attempt, with the namespace, task queue,
  workflow id, run id and type, activity id and type, ``temporal.activity.attempt`` and
  ``temporal.activity.queue_time`` (seconds from the attempt's scheduling to its start); failures set
  status ERROR, record the exception and set ``error.type`` (the application error's type, the
  timeout type, or ``cancelled``); heartbeats are ``heartbeat`` events, at most one a second.

- workflows: two spans per run. ``WorkflowStarted:{type}`` (INTERNAL), from the run's start to its
  first workflow task on a worker, is made at that task: it is the parent of everything the run does
  (its activities, children, ``RunWorkflow``) and is exported whether or not any worker ever sees the
  run end. ``RunWorkflow:{type}`` (SERVER), its child, has the run's real duration, from its start to
  its completion, and is made once, when the run completes (not when it starts), whatever workers it
  moved across and however often it was replayed. Both have ids derived from the run id, so they are
  the same on every worker and replay. ``temporal.outcome`` on ``RunWorkflow`` says how the run
  ended: completed, failed (a workflow failure: ERROR), cancelled or continued_as_new (the next run
  is a sibling in the same trace, linked to this one). A workflow task failure is a
  ``workflow_task.failed`` event, never a failure. A run still running, timed out or terminated has
  no ``RunWorkflow`` span (no worker sees it end); what it made hangs under its ``WorkflowStarted``
  span, so no exported span points at a parent that is never exported. Nothing is created during
  replay.
- calls from workflows: ``StartActivity:{type}``, ``StartChildWorkflow:{type}``,
  ``SignalChildWorkflow:{name}``, ``SignalExternalWorkflow:{name}`` and ``SignalWithStartWorkflow:{type}``
  (temporalio's system Nexus operation) (CLIENT), made when the workflow makes the call (outside
  replay) and ended at once, so they are exported before the activity's attempts, the child's run or
  the receiving handler, their children, can point at them: a signal from one workflow to another
  continues the sender's trace.
- handlers: ``HandleSignal:{name}``, ``ValidateUpdate:{name}``, ``HandleUpdate:{name}`` (outside
  replay) and ``HandleQuery:{name}`` (SERVER), children of the call that sent them, linked to the
  receiving run's WorkflowStarted span.
- Nexus, where the installed temporalio has it: ``StartNexusOperation:{service}/{operation}`` (CLIENT),
  a call from a workflow made like the others above, with ``temporal.nexus.endpoint``,
  ``temporal.nexus.service`` and ``temporal.nexus.operation``; its context travels in the operation's
  Nexus headers (``traceparent``, as temporalio's own interceptor sends it). On the handler's worker,
  ``RunStartNexusOperationHandler:{service}/{operation}`` and ``RunCancelNexusOperationHandler:{service}/{operation}``
  (SERVER), children of that call, with the same attributes and the worker's namespace and task queue;
  a workflow a workflow-run operation starts is a child of the handler's span (through the worker's
  client, or the copy of it we trace).

Metrics through the OpenTelemetry meter: ``temporal.activity.execution.duration``,
``temporal.activity.queue_time`` (the saturation signal of a task queue),
``temporal.activity.attempts`` and ``temporal.workflow.outcomes``; and the SDK core's own
``temporal_*`` metrics bridged into the same MeterProvider (:class:`CoreMetricsBridge`).

Context crosses the Temporal server in the ``_tracer-data`` header in the format of
``temporalio.contrib.opentelemetry.TracingInterceptor``, so services still using that interceptor
join the same traces. Workflow spans need the OpenTelemetry SDK's tracer (their ids are preset
through its id generator); with another tracer implementation (temporalio's replay-safe provider
included) they are skipped, and what a run sends carries the context the run was given, so no span
exported points at a workflow span never made.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import temporalio.client
import temporalio.worker
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from wrapt import wrap_function_wrapper

from sidetrace.instrumentors.temporal._client import _ClientOutbound
from sidetrace.instrumentors.temporal._core_metrics import CoreMetricsBridge as CoreMetricsBridge
from sidetrace.instrumentors.temporal._interceptor import TracingInterceptor
from sidetrace.instrumentors.temporal._telemetry import GUARD as GUARD
from sidetrace.instrumentors.temporal._telemetry import HEADER as HEADER
from sidetrace.instrumentors.temporal._telemetry import context_from_headers as context_from_headers
from sidetrace.instrumentors.temporal._telemetry import context_to_headers as context_to_headers
from sidetrace.instrumentors.temporal._telemetry import error_type as error_type
from sidetrace.instrumentors.temporal._telemetry import log
from sidetrace.instrumentors.temporal._workflow import run_span_id as run_span_id
from sidetrace.instrumentors.temporal._workflow import workflow_span_context as workflow_span_context

_INSTRUMENTS = ("temporalio >= 1.5",)
_ORIGINALS: dict[str, Any] = {}
# instrument()'s tracer_provider and meter_provider, given to every interceptor the wrappers add
_PROVIDERS: dict[str, Any] = {}
# whether instrument() is in force: the client halves it put on clients pass through while it is not
_INSTRUMENTED = [False]


_BRIDGE = CoreMetricsBridge()


def _official(thing: Any) -> bool:
    """Whether ``thing`` is temporalio's own OpenTelemetry interceptor or plugin, or of a subclass of one."""
    return any(cls.__module__.startswith("temporalio.contrib.opentelemetry") for cls in type(thing).__mro__)


def _tracing(interceptor: Any) -> bool:
    """Whether ``interceptor`` makes tracing spans of its own: ours or temporalio's (or a subclass)."""
    return isinstance(interceptor, TracingInterceptor) or _official(interceptor)


class _ClientSide(temporalio.client.Interceptor):
    """The client half of a :class:`TracingInterceptor`: what ``instrument()`` adds to a client.

    temporalio hands every client interceptor that is also a worker interceptor to each worker built on
    the client, ahead of the worker's own. Ours is not one: the ``Worker`` wrapper adds the worker half
    (through :class:`_WorkerSide`) unless the worker's final interceptors already trace. It passes every
    call through untouched (no span, no header) while uninstrumented, or once it is found ``aside``:
    its client's plugins added another tracing interceptor.
    """

    def __init__(self, interceptor: TracingInterceptor) -> None:
        self.interceptor = interceptor
        self.aside = False

    @property
    def active(self) -> bool:
        return _INSTRUMENTED[0] and not self.aside

    def intercept_client(self, next: temporalio.client.OutboundInterceptor) -> temporalio.client.OutboundInterceptor:
        return _ClientOutbound(next, self.interceptor, self)


# worker plugins came with temporalio 1.16 or so; before them, the Worker wrapper adds the worker half itself
_WorkerPlugin: Any = getattr(temporalio.worker, "Plugin", None)


class _WorkerSide(_WorkerPlugin or object):  # type: ignore[misc]
    """Puts a :class:`TracingInterceptor`'s worker half on a worker, last among its plugins: it sees the
    interceptors every plugin added (the client's and the worker's own) and the ones temporalio takes
    from the client, and stands aside when one of them traces already."""

    def __init__(self, interceptor: TracingInterceptor, first: bool, copied: _ClientSide | None) -> None:
        self.interceptor = interceptor
        self.first = first  # where temporalio puts the interceptors it takes from a client
        self.copied = copied  # the client half of the copy of the worker's client we made, if any

    def name(self) -> str:
        return "sidetrace.TemporalInstrumentor"

    def configure_worker(self, config: Any) -> Any:
        try:
            from_client = _active_config(config["client"])["interceptors"]
            if any(_tracing(i) for i in (*from_client, *config.get("interceptors", ()))):
                if self.copied is not None:
                    self.copied.aside = True
                return config
            own = list(config.get("interceptors", ()))
            config["interceptors"] = [self.interceptor, *own] if self.first else [*own, self.interceptor]
        except Exception as exc:  # never keep a worker from being built
            self.interceptor.guard.failed("adding tracing to a worker", exc)
        return config

    async def run_worker(self, worker: Any, next: Any) -> None:
        await next(worker)

    def configure_replayer(self, config: Any) -> Any:
        return config

    def run_replayer(self, replayer: Any, histories: Any, next: Any) -> Any:
        return next(replayer, histories)


def _active_config(client: Any) -> dict:
    """The config ``client`` runs with: after its plugins added their interceptors (temporalio before
    plugins has no ``active_config``: its config is the one it runs with)."""
    return client.config(active_config=True) if _WorkerPlugin is not None else client.config()


def _connect_wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    interceptors = list(kwargs.get("interceptors") or [])
    side = None
    if not any(isinstance(i, _ClientSide) for i in interceptors) and \
            not any(_tracing(i) for i in interceptors) and not any(_official(p) for p in kwargs.get("plugins") or ()):
        side = _ClientSide(TracingInterceptor(namespace=kwargs.get("namespace", "default"), **_PROVIDERS))
        kwargs = {**kwargs, "interceptors": [*interceptors, side]}
    _BRIDGE.start()
    if side is None:
        return wrapped(*args, **kwargs)
    return _connected(wrapped(*args, **kwargs), side)


async def _connected(connecting: Any, side: _ClientSide) -> Any:
    """The client ``connecting`` makes, with ``side`` set aside if one of its plugins added a tracing
    interceptor of its own (temporalio's, a subclass, or ours in a ``SimplePlugin``)."""
    client = await connecting
    try:
        side.aside = any(_tracing(i) for i in _active_config(client)["interceptors"])
    except Exception as exc:
        side.interceptor.guard.failed("reading a Temporal client's interceptors", exc)
    return client


def _worker_wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Worker(...): trace its side unless the worker or its client carries a tracing interceptor that
    temporalio hands the worker (ours passed by hand, temporalio's own interceptor or plugin)."""
    try:
        args, kwargs = _traced_worker_arguments(args, kwargs)
    except Exception as exc:  # never keep a worker from being built
        log.warning("sidetrace: could not add tracing to a Temporal worker: %s", exc)
    return wrapped(*args, **kwargs)


def _traced_worker_arguments(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    client = args[0] if args else kwargs.get("client")
    if client is None:
        return args, kwargs
    config = _active_config(client)
    side = next((i for i in config["interceptors"] if isinstance(i, _ClientSide)), None)
    if (side is not None and not side.active) or any(_tracing(i) for i in config["interceptors"]) or \
            any(_tracing(i) for i in kwargs.get("interceptors") or ()) or \
            any(_official(p) for p in kwargs.get("plugins") or ()):
        return args, kwargs
    copied = None
    if side is not None:
        interceptor = side.interceptor
    else:
        interceptor = TracingInterceptor(namespace=client.namespace, **_PROVIDERS)
        args, kwargs, copied = _with_traced_client(args, kwargs, client, interceptor)
    if _WorkerPlugin is None:
        own = list(kwargs.get("interceptors", ()))
        return args, {**kwargs, "interceptors": [interceptor, *own] if side is not None else [*own, interceptor]}
    plugins = [*kwargs.get("plugins", ()), _WorkerSide(interceptor, side is not None, copied)]
    return args, {**kwargs, "plugins": plugins}


def _with_traced_client(args: tuple, kwargs: dict, client: Any,
                        interceptor: TracingInterceptor) -> tuple[tuple, dict, _ClientSide | None]:
    """The Worker's arguments with a copy of its untraced ``client`` (same class, connection and settings)
    that carries ``interceptor``'s client half: what the worker starts through its client (a Nexus
    workflow-run operation's workflow, calls through ``activity.client()`` or ``nexus.client()``)
    continues the handler's or the attempt's trace. The copy is made from the client's active config
    (what its plugins made of it) without its plugins, so their ``configure_client`` is never called a
    second time; those that are worker plugins too are given to the worker ahead of its own, as temporalio
    would have taken them from the client. A client whose class cannot be made from its own ``config()``
    is kept as it is (counted and logged once)."""
    config = _active_config(client)
    side = _ClientSide(interceptor)
    try:
        unplugged = {"plugins": []} if "plugins" in config else {}
        traced = type(client)(**{**config, **unplugged, "interceptors": [*config["interceptors"], side]})
    except Exception as exc:
        interceptor.guard.failed("copying a worker's client made before instrument()", exc)
        return args, kwargs, None
    if config.get("plugins"):
        from_client = [p for p in config["plugins"] if isinstance(p, _WorkerPlugin)]
        kwargs = {**kwargs, "plugins": [*from_client, *kwargs.get("plugins", ())]}
    return ((traced, *args[1:]), kwargs, side) if args else (args, {**kwargs, "client": traced}, side)


class TemporalInstrumentor(BaseInstrumentor):
    """Adds :class:`TracingInterceptor` to every ``Client.connect`` and every ``Worker``.

    ``instrument(tracer_provider=..., meter_provider=...)`` sends every span and metric there
    instead of to the global providers. ``instrument(core_metrics=False)`` leaves the SDK core's
    metrics alone; by default they are bridged into the MeterProvider (:class:`CoreMetricsBridge`).
    Client calls and activity attempts made under ``suppress_instrumentation()`` are not traced.
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        return _INSTRUMENTS

    def _instrument(self, **kwargs: Any) -> None:
        _INSTRUMENTED[0] = True
        _PROVIDERS.update(tracer_provider=kwargs.get("tracer_provider"), meter_provider=kwargs.get("meter_provider"))
        if kwargs.get("core_metrics", True):
            _BRIDGE.install(kwargs.get("meter_provider"))
        # Kept as found in the class (a classmethod object, in a dict so no descriptor binds it):
        # unwrapping through getattr would put back a method bound to Client, shared by subclasses.
        _ORIGINALS["connect"] = temporalio.client.Client.__dict__["connect"]
        _ORIGINALS["worker"] = temporalio.worker.Worker.__dict__["__init__"]
        wrap_function_wrapper("temporalio.client", "Client.connect", _connect_wrapper)
        wrap_function_wrapper("temporalio.worker", "Worker.__init__", _worker_wrapper)

    def _uninstrument(self, **kwargs: Any) -> None:
        _INSTRUMENTED[0] = False
        _PROVIDERS.clear()
        original = _ORIGINALS.pop("connect", None)
        if original is not None:
            temporalio.client.Client.connect = original
        original = _ORIGINALS.pop("worker", None)
        if original is not None:
            temporalio.worker.Worker.__init__ = original


__all__ = ["TemporalInstrumentor", "TracingInterceptor"]
