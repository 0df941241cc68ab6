"""Temporal instrumentation for temporalio: clients, workflows, activities and handlers, wired automatically.

``TemporalInstrumentor().instrument()`` adds :class:`TracingInterceptor` to every client made with
``temporalio.client.Client.connect`` (its client half) and to every ``temporalio.worker.Worker``: no
interceptors to pass by hand. A client or worker that already has temporalio's own OpenTelemetry
interceptor or plugin is left to it (no double spans); a worker that has one in its own
``interceptors=`` or ``plugins=`` makes its spans through it alone, even on a client we trace. A worker
on a client made before ``instrument()`` works with a copy of that client that we trace, so what it
starts through its client (``activity.client()``, ``nexus.client()``) continues its spans' traces.
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
through its id generator); with another tracer implementation they are skipped.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import temporalio.client
import temporalio.worker
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from wrapt import wrap_function_wrapper

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


_BRIDGE = CoreMetricsBridge()


def _official(thing: Any) -> bool:
    """Whether ``thing`` is temporalio's own OpenTelemetry interceptor or plugin (OpenTelemetryPlugin)."""
    return type(thing).__module__.startswith("temporalio.contrib.opentelemetry")


class _ClientSide(temporalio.client.Interceptor):
    """The client half of a :class:`TracingInterceptor`: what ``instrument()`` adds to a client.

    temporalio hands every client interceptor that is also a worker interceptor to each worker built on
    the client, ahead of the worker's own. Ours is not one, so a worker whose own ``interceptors=`` or
    ``plugins=`` carry temporalio's OpenTelemetry interceptor or plugin is left to it; any other worker
    gets the worker half of the same interceptor from the ``Worker`` wrapper.
    """

    def __init__(self, interceptor: TracingInterceptor) -> None:
        self.interceptor = interceptor

    def intercept_client(self, next: temporalio.client.OutboundInterceptor) -> temporalio.client.OutboundInterceptor:
        return self.interceptor.intercept_client(next)


def _traced_already(interceptors: Any, plugins: Any = ()) -> bool:
    """Whether ours or temporalio's own OpenTelemetry interceptor is among ``interceptors``, or its
    ``OpenTelemetryPlugin`` among ``plugins`` (which adds its interceptor only inside connect)."""
    return any(isinstance(i, TracingInterceptor) or _official(i) for i in interceptors or ()) or \
        any(_official(p) for p in plugins or ())


def _connect_wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    interceptors = list(kwargs.get("interceptors") or [])
    if not any(isinstance(i, _ClientSide) for i in interceptors) and \
            not _traced_already(interceptors, kwargs.get("plugins")):
        interceptors.append(_ClientSide(TracingInterceptor(namespace=kwargs.get("namespace", "default"),
                                                           **_PROVIDERS)))
        kwargs = {**kwargs, "interceptors": interceptors}
    _BRIDGE.start()
    return wrapped(*args, **kwargs)


def _worker_wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Worker(...): trace its side unless the worker or its client carries a tracing interceptor that
    temporalio hands the worker (ours passed by hand, temporalio's own interceptor or plugin)."""
    try:
        client = args[0] if args else kwargs.get("client")
        config = client.config() if client is not None else {}
        if not _traced_already(config.get("interceptors"), config.get("plugins")) and \
                not _traced_already(kwargs.get("interceptors"), kwargs.get("plugins")):
            own = list(kwargs.get("interceptors", ()))
            side = next((i for i in config.get("interceptors") or () if isinstance(i, _ClientSide)), None)
            if side is not None:  # first, where temporalio puts the interceptors it takes from a client
                kwargs = {**kwargs, "interceptors": [side.interceptor, *own]}
            else:
                interceptor = TracingInterceptor(namespace=client.namespace, **_PROVIDERS)
                kwargs = {**kwargs, "interceptors": [*own, interceptor]}
                args, kwargs = _with_traced_client(args, kwargs, client, config, interceptor)
    except Exception as exc:  # never keep a worker from being built
        log.warning("sidetrace: could not add tracing to a Temporal worker: %s", exc)
    return wrapped(*args, **kwargs)


def _with_traced_client(args: tuple, kwargs: dict, client: Any, config: dict,
                        interceptor: TracingInterceptor) -> tuple[tuple, dict]:
    """The Worker's arguments with a copy of its untraced ``client`` (same class, connection and settings)
    that carries ``interceptor``'s client half: what the worker starts through its client (a Nexus
    workflow-run operation's workflow, calls through ``activity.client()`` or ``nexus.client()``)
    continues the handler's or the attempt's trace. A client whose class cannot be made from its own
    ``config()`` is kept as it is (counted and logged once)."""
    try:
        traced = type(client)(**{**config, "interceptors": [*config["interceptors"], _ClientSide(interceptor)]})
    except Exception as exc:
        interceptor.guard.failed("copying a worker's client made before instrument()", exc)
        return args, kwargs
    return ((traced, *args[1:]), kwargs) if args else (args, {**kwargs, "client": traced})


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
        _PROVIDERS.clear()
        original = _ORIGINALS.pop("connect", None)
        if original is not None:
            temporalio.client.Client.connect = original
        original = _ORIGINALS.pop("worker", None)
        if original is not None:
            temporalio.worker.Worker.__init__ = original


__all__ = ["TemporalInstrumentor", "TracingInterceptor"]
