"""Temporal instrumentation for temporalio: clients, workflows, activities and handlers, wired automatically.

``TemporalInstrumentor().instrument()`` adds :class:`TracingInterceptor` to every client made with
``temporalio.client.Client.connect`` (and so to every worker built on such a client) and to every
``temporalio.worker.Worker`` whose client lacks it: no interceptors to pass by hand. A client or
worker that already has temporalio's own OpenTelemetry interceptor is left to it (no double spans).
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
  ``SignalChildWorkflow:{name}`` and ``SignalExternalWorkflow:{name}`` (CLIENT), made when the
  workflow makes the call (outside replay) and ended at once, so they are exported before the
  activity's attempts, the child's run or the receiving handler, their children, can point at them:
  a signal from one workflow to another continues the sender's trace.
- handlers: ``HandleSignal:{name}``, ``ValidateUpdate:{name}``, ``HandleUpdate:{name}`` (outside
  replay) and ``HandleQuery:{name}`` (SERVER), children of the call that sent them, linked to the
  receiving run's WorkflowStarted span.

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

import asyncio
import contextlib
import contextvars
import copy
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import temporalio.activity
import temporalio.client
import temporalio.converter
import temporalio.exceptions
import temporalio.worker
import temporalio.workflow
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    Tracer,
    TracerProvider,
)
from temporalio.api.common.v1 import Payload
from wrapt import wrap_function_wrapper

from sidetrace import __version__
from sidetrace.instrumentors._messaging import Guard

log = logging.getLogger("sidetrace.instrumentors.temporal")
GUARD = Guard("temporal")
EMITTED_REMEMBERED = 10_000  # workflow-side span ids remembered per worker (about 1 MB)
TASK_FAILURES_REMEMBERED = 1_000  # runs whose workflow task failures a worker keeps for their span
TASK_FAILURES_PER_RUN = 10  # the first ones: a task failing forever must not grow the memory
HEADER = "_tracer-data"  # the official interceptor's header: both can read each other's context
_INSTRUMENTS = ("temporalio >= 1.5",)
# (trace id, span id) the next span of our workflow tracer must have: a workflow's span is made only
# when the workflow completes, but its id must be known from the start (its activities point to it).
_PRESET: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("sidetrace_temporal_preset",
                                                                                 default=None)


class _PresetIds:
    """The SDK tracer's id generator, except where _PRESET asks for given ids (our workflow spans only).

    Duck-typed to the SDK's IdGenerator, so that importing an instrumentor needs only the API.
    """

    def __init__(self, fallback: Any) -> None:
        self.fallback = fallback

    def generate_span_id(self) -> int:
        preset = _PRESET.get()
        return preset[1] if preset else self.fallback.generate_span_id()

    def generate_trace_id(self) -> int:
        preset = _PRESET.get()
        return preset[0] if preset else self.fallback.generate_trace_id()

    def is_trace_id_random(self) -> bool:
        """Asked by the SDK for root spans only. A preset trace id is derived from a run id, not drawn at
        random, so it never claims W3C's random-trace-id flag (the calls' contexts, built from the same
        ids, do not claim it either)."""
        if _PRESET.get():
            return False
        return bool(getattr(self.fallback, "is_trace_id_random", lambda: False)())


def _digest(text: str, size: int) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:size], "big") or 1


def workflow_span_context(run_id: str, parent: otel_context.Context | None) -> SpanContext:
    """The span context of a workflow run's WorkflowStarted span, the parent of everything the run does,
    the same on every worker and replay."""
    parent_context = trace.get_current_span(parent).get_span_context() if parent is not None else None
    if parent_context is not None and parent_context.is_valid:
        return SpanContext(parent_context.trace_id, _digest(run_id, 8), is_remote=True,
                           trace_flags=parent_context.trace_flags, trace_state=parent_context.trace_state)
    return SpanContext(_digest("trace:" + run_id, 16), _digest(run_id, 8), is_remote=True,
                       trace_flags=TraceFlags(TraceFlags.SAMPLED))


def run_span_id(run_id: str) -> int:
    """The span id of a workflow run's RunWorkflow span, the same on every worker and replay."""
    return _digest("end:" + run_id, 8)


def context_to_headers(headers: Mapping[str, Payload], ctx: otel_context.Context | None = None,
                       guard: Guard = GUARD) -> Mapping[str, Payload]:
    """A copy of ``headers`` carrying ``ctx`` (default: the current context); ``headers`` if that fails."""
    try:
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=ctx)
        if not carrier:
            return headers
        (payload,) = temporalio.converter.PayloadConverter.default.to_payloads([carrier])
        return {**headers, HEADER: payload}
    except Exception as exc:
        guard.failed("inject", exc)
        return headers


def context_from_headers(headers: Mapping[str, Payload], guard: Guard = GUARD) -> otel_context.Context | None:
    """The context in ``headers``, or None when absent or unreadable (a foreign or broken header)."""
    payload = headers.get(HEADER)
    if payload is None:
        return None
    try:
        (carrier,) = temporalio.converter.PayloadConverter.default.from_payloads([payload])
        return propagate.extract(carrier) if isinstance(carrier, dict) else None
    except Exception as exc:
        guard.failed("extract", exc)
        return None


def error_type(exc: BaseException) -> str:
    if isinstance(exc, temporalio.exceptions.ApplicationError):
        return exc.type or "ApplicationError"
    if isinstance(exc, temporalio.exceptions.TimeoutError):
        return f"timeout.{exc.type.name.lower()}" if exc.type is not None else "timeout"
    if type(exc).__name__ == "CancelledError":  # Temporal's and asyncio's
        return "cancelled"
    return type(exc).__qualname__


@contextlib.contextmanager
def _span(tracer: Tracer, guard: Guard, name: str, kind: SpanKind, attributes: dict[str, Any],
          parent: otel_context.Context | None = None) -> Iterator[Span]:
    """A current span around the caller's work; if making it fails, the work runs without one."""
    try:
        span = tracer.start_span(name, context=parent, kind=kind, attributes=attributes)
        token = otel_context.attach(trace.set_span_in_context(span))
    except Exception as exc:
        guard.failed("span", exc)
        yield trace.INVALID_SPAN
        return
    try:
        yield span
    except BaseException as exc:
        with contextlib.suppress(Exception):
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, str(exc) or type(exc).__name__))
            span.set_attribute("error.type", error_type(exc))
        raise
    finally:
        try:
            otel_context.detach(token)
            span.end()
        except Exception as exc:
            guard.failed("span end", exc)


class TracingInterceptor(temporalio.client.Interceptor, temporalio.worker.Interceptor):
    """Client and worker interceptor (see the module docstring); pass it in ``interceptors=`` to wire
    it by hand instead of using :class:`TemporalInstrumentor`."""

    def __init__(self, tracer: Tracer | None = None, namespace: str | None = None,
                 meter: metrics.Meter | None = None, *, tracer_provider: TracerProvider | None = None,
                 meter_provider: metrics.MeterProvider | None = None) -> None:
        """``tracer`` (else one of ``tracer_provider``, else of the global provider) makes every span,
        workflow spans included; ``meter`` (else one of ``meter_provider``, else of the global provider)
        every metric and the count of our own failures (``sidetrace.instrumentation.errors``)."""
        self._given_tracer = tracer
        self._tracer_provider = tracer_provider
        self.tracer = tracer or trace.get_tracer(__name__, __version__, tracer_provider=tracer_provider)
        self.namespace = namespace
        self._workflow_tracers: dict[int, Tracer | None] = {}
        self._emitted: OrderedDict[int, None] = OrderedDict()
        self._emitted_lock = threading.Lock()  # workflow activations run on several threads
        self._task_failures: OrderedDict[str, list] = OrderedDict()  # run id -> [count, first events]
        meter = meter or metrics.get_meter(__name__, __version__, meter_provider=meter_provider)
        self.guard = Guard("temporal", meter)
        self.activity_duration = meter.create_histogram(
            "temporal.activity.execution.duration", unit="s", description="Duration of each activity attempt.")
        self.activity_queue_time = meter.create_histogram(
            "temporal.activity.queue_time", unit="s",
            description="Time from an attempt's scheduling to its start: how saturated the task queue is.")
        self.activity_attempts = meter.create_counter(
            "temporal.activity.attempts", unit="{attempt}", description="Activity attempts, by outcome.")
        self.workflow_outcomes = meter.create_counter(
            "temporal.workflow.outcomes", unit="{run}", description="Workflow runs completed, by outcome.")

    def first_emission(self, span_id: int) -> bool:
        """Whether this worker has not yet emitted the workflow-side span ``span_id`` (and remembers it).

        A query to a worker without a workflow cache replays the history, and events after the last
        completed workflow task replay as new: an activity's result that arrived with its task pending
        would end its StartActivity span a second time. The ids are deterministic, so a bounded memory of
        the ones emitted catches it (a query answered by another worker process is not covered).
        """
        with self._emitted_lock:
            if span_id in self._emitted:
                return False
            self._emitted[span_id] = None
            if len(self._emitted) > EMITTED_REMEMBERED:
                self._emitted.popitem(last=False)
            return True

    def task_failed(self, run_id: str, exc: BaseException) -> None:
        """Remember a workflow task failure of ``run_id`` until its RunWorkflow span is made here."""
        with self._emitted_lock:
            failures = self._task_failures.setdefault(run_id, [0, []])
            failures[0] += 1
            if len(failures[1]) < TASK_FAILURES_PER_RUN:
                failures[1].append({"exception.type": type(exc).__qualname__, "exception.message": str(exc),
                                    "temporal.workflow_task.attempt": failures[0], "time": time.time_ns()})
            if len(self._task_failures) > TASK_FAILURES_REMEMBERED:
                self._task_failures.popitem(last=False)

    def task_failures(self, run_id: str) -> list[dict[str, Any]]:
        """The task failures of ``run_id`` this worker saw (and forgets them)."""
        with self._emitted_lock:
            return self._task_failures.pop(run_id, [0, []])[1]

    def workflow_tracer(self) -> Tracer | None:
        """A copy of our SDK tracer whose ids can be preset, or None when the tracer is not the SDK's."""
        source: Any = self._given_tracer or self._tracer_provider or trace.get_tracer_provider()
        key = id(source)  # the global provider is looked up each time: it may be set after instrument()
        if key not in self._workflow_tracers:
            base = source if source is self._given_tracer else source.get_tracer(__name__ + ".workflow",
                                                                                 __version__)
            generator = getattr(base, "id_generator", None)
            if generator is not None:
                tracer = copy.copy(base)  # shares the SDK tracer's processors, sampler and resource
                tracer.id_generator = _PresetIds(generator)
                self._workflow_tracers[key] = tracer
            else:
                self._workflow_tracers[key] = None
        return self._workflow_tracers[key]

    def intercept_client(self, next: temporalio.client.OutboundInterceptor) -> temporalio.client.OutboundInterceptor:
        return _ClientOutbound(next, self)

    def intercept_activity(
        self, next: temporalio.worker.ActivityInboundInterceptor
    ) -> temporalio.worker.ActivityInboundInterceptor:
        return _ActivityInbound(next, self)

    def workflow_interceptor_class(
        self, input: temporalio.worker.WorkflowInterceptorClassInput
    ) -> type[temporalio.worker.WorkflowInboundInterceptor]:
        root = self

        class _Bound(_WorkflowInbound):
            interceptor = root

        return _Bound


class _ClientOutbound(temporalio.client.OutboundInterceptor):
    def __init__(self, next: temporalio.client.OutboundInterceptor, root: TracingInterceptor) -> None:
        super().__init__(next)
        self.root = root

    def _attributes(self, workflow_id: str, **extra: Any) -> dict[str, Any]:
        attributes = {"temporal.workflow.id": workflow_id, **{k: v for k, v in extra.items() if v}}
        if self.root.namespace:
            attributes["temporal.namespace"] = self.root.namespace
        return attributes

    async def _call(self, name: str, attributes: dict[str, Any], input: Any, call: Any,
                    carriers: tuple[Any, ...] = ()) -> Any:
        """``call(input)`` inside a CLIENT span whose context ``input.headers`` (or each of ``carriers``'
        headers) carries."""
        if not is_instrumentation_enabled():
            return await call(input)
        with _span(self.root.tracer, self.root.guard, name, SpanKind.CLIENT, attributes):
            for carrier in carriers or (input,):
                carrier.headers = context_to_headers(carrier.headers, guard=self.root.guard)
            return await call(input)

    async def start_workflow(self, input: temporalio.client.StartWorkflowInput) -> Any:
        attributes = self._attributes(input.id, **{"temporal.workflow.type": input.workflow,
                                                   "temporal.task_queue": input.task_queue})
        kind = "SignalWithStartWorkflow" if input.start_signal else "StartWorkflow"
        return await self._call(f"{kind}:{input.workflow}", attributes, input, super().start_workflow)

    async def start_update_with_start_workflow(self, input: Any) -> Any:
        """Update-with-start (temporalio >= 1.9): the start and the update both carry the span's context."""
        start = input.start_workflow_input
        attributes = self._attributes(start.id, **{"temporal.workflow.type": start.workflow,
                                                   "temporal.task_queue": start.task_queue})
        return await self._call(f"StartUpdateWithStartWorkflow:{start.workflow}", attributes, input,
                                super().start_update_with_start_workflow, (start, input.update_workflow_input))

    async def signal_workflow(self, input: temporalio.client.SignalWorkflowInput) -> None:
        return await self._call(f"SignalWorkflow:{input.signal}", self._attributes(input.id), input,
                                super().signal_workflow)

    async def query_workflow(self, input: temporalio.client.QueryWorkflowInput) -> Any:
        return await self._call(f"QueryWorkflow:{input.query}", self._attributes(input.id), input,
                                super().query_workflow)

    async def start_workflow_update(self, input: temporalio.client.StartWorkflowUpdateInput) -> Any:
        return await self._call(f"StartWorkflowUpdate:{input.update}", self._attributes(input.id), input,
                                super().start_workflow_update)


# The running attempt's span and when it last got a heartbeat event: [span, monotonic seconds].
_ATTEMPT: contextvars.ContextVar[list | None] = contextvars.ContextVar("sidetrace_temporal_attempt", default=None)
HEARTBEAT_EVENT_SECONDS = 1.0  # at most one heartbeat event a second per attempt: heartbeats can be frequent


class _ActivityOutbound(temporalio.worker.ActivityOutboundInterceptor):
    def heartbeat(self, *details: Any) -> None:
        attempt = _ATTEMPT.get()
        if attempt is not None:
            now = time.monotonic()
            if now - attempt[1] >= HEARTBEAT_EVENT_SECONDS:
                attempt[1] = now
                attempt[0].add_event("heartbeat", {"temporal.activity.heartbeat.details": len(details)})
        super().heartbeat(*details)


class _ActivityInbound(temporalio.worker.ActivityInboundInterceptor):
    def __init__(self, next: temporalio.worker.ActivityInboundInterceptor, root: TracingInterceptor) -> None:
        super().__init__(next)
        self.root = root

    def init(self, outbound: temporalio.worker.ActivityOutboundInterceptor) -> None:
        super().init(_ActivityOutbound(outbound))

    async def execute_activity(self, input: temporalio.worker.ExecuteActivityInput) -> Any:
        if not is_instrumentation_enabled():
            return await super().execute_activity(input)
        info = temporalio.activity.info()
        attributes: dict[str, Any] = {
            "temporal.namespace": info.workflow_namespace,
            "temporal.task_queue": info.task_queue,
            "temporal.workflow.id": info.workflow_id,
            "temporal.workflow.run_id": info.workflow_run_id,
            "temporal.workflow.type": info.workflow_type,
            "temporal.activity.id": info.activity_id,
            "temporal.activity.type": info.activity_type,
            "temporal.activity.attempt": info.attempt,
        }
        with contextlib.suppress(Exception):  # activity.client() exists in recent temporalio only
            attributes["temporal.worker.identity"] = temporalio.activity.client().identity
        scheduled = getattr(info, "current_attempt_scheduled_time", None)
        if scheduled is not None and info.started_time is not None:
            attributes["temporal.activity.queue_time"] = max(0.0, (info.started_time - scheduled).total_seconds())
        parent = context_from_headers(input.headers, self.root.guard)
        metric_attributes = {"temporal.namespace": info.workflow_namespace, "temporal.task_queue": info.task_queue,
                             "temporal.activity.type": info.activity_type}
        if "temporal.activity.queue_time" in attributes:
            try:
                self.root.activity_queue_time.record(attributes["temporal.activity.queue_time"], metric_attributes)
            except Exception as exc:
                self.root.guard.failed("activity metrics", exc)
        started = time.perf_counter()
        outcome = "completed"
        with _span(self.root.tracer, self.root.guard, f"RunActivity:{info.activity_type}", SpanKind.SERVER, attributes,
                   parent) as span:
            token = _ATTEMPT.set([span, -HEARTBEAT_EVENT_SECONDS])
            try:
                return await super().execute_activity(input)
            except BaseException as exc:
                outcome = "cancelled" if error_type(exc) == "cancelled" else "failed"
                raise
            finally:
                _ATTEMPT.reset(token)
                try:
                    outcome_attributes = {**metric_attributes, "temporal.outcome": outcome}
                    self.root.activity_duration.record(time.perf_counter() - started, outcome_attributes)
                    self.root.activity_attempts.add(1, outcome_attributes)
                except Exception as exc:
                    self.root.guard.failed("activity metrics", exc)


class _WorkflowInbound(temporalio.worker.WorkflowInboundInterceptor):
    """Runs in the workflow sandbox. Outbound calls carry the WorkflowStarted span's context, whose ids
    are derived from the run id, and that span is made at the run's first workflow task, so whatever
    points at it is never orphaned; the RunWorkflow span is made once, when the workflow completes
    outside replay, with the run's start time, so it has its real duration however many workers and
    replays the run went through. Handler spans are made only outside replay."""

    interceptor: TracingInterceptor

    def init(self, outbound: temporalio.worker.WorkflowOutboundInterceptor) -> None:
        self._outbound = _WorkflowOutbound(outbound, self)
        self._workflow_context: SpanContext | None = None
        self._calls = 0  # activities and child workflows started so far: the same count on every replay
        super().init(self._outbound)

    def client_call(self, name: str, attributes: dict[str, Any]) -> Payload | None:
        """The context header for a call from the workflow (an activity, a child, a signal), whose span is made now.

        The span's ids derive from the run id and the call's position in the run, so a replay
        reproduces them; it is made at scheduling, outside replay, and ended at once, so it is exported
        before any attempt or child run that points at it, whether or not the run ever ends here.
        """
        workflow_context = self._workflow_context
        if workflow_context is None:
            return None
        self._calls += 1  # counted before anything can fail, so replays number calls alike
        try:
            return self._client_call(name, attributes, workflow_context)
        except Exception as exc:  # never break the workflow: the call goes on untraced
            with temporalio.workflow.unsafe.sandbox_unrestricted():
                self.interceptor.guard.failed("workflow call", exc)
            return None

    def _client_call(self, name: str, attributes: dict[str, Any], workflow_context: SpanContext) -> Payload | None:
        info = temporalio.workflow.info()
        context = SpanContext(workflow_context.trace_id, _digest(f"{info.run_id}:{self._calls}", 8), is_remote=True,
                              trace_flags=workflow_context.trace_flags)
        header = context_to_headers({}, trace.set_span_in_context(NonRecordingSpan(context)),
                                    self.interceptor.guard).get(HEADER)
        if not temporalio.workflow.unsafe.is_replaying():
            self._make_span(name, SpanKind.CLIENT, context, trace.set_span_in_context(NonRecordingSpan(
                workflow_context)), attributes, None, None, instant=True)
        return header

    def _make_span(self, name: str, kind: SpanKind, context: SpanContext, parent: otel_context.Context | None,
                   attributes: dict[str, Any], started: int | None, error: BaseException | None,
                   links: list[Link] | None = None, events: list[dict[str, Any]] | None = None,
                   instant: bool = False) -> None:
        """End, now, a span that began at ``started`` (or now) and has the ids of ``context``; an
        ``instant`` one ends when it starts."""
        with temporalio.workflow.unsafe.sandbox_unrestricted():
            try:
                started = time.time_ns() if started is None else started
                self._end_span(name, kind, context, parent, attributes, started, error, links, events or [],
                               started if instant else None)
            except Exception as exc:  # never fail the workflow task for a span
                self.interceptor.guard.failed("workflow span", exc)

    def _end_span(self, name: str, kind: SpanKind, context: SpanContext, parent: otel_context.Context | None,
                  attributes: dict[str, Any], started: int, error: BaseException | None,
                  links: list[Link] | None, events: list[dict[str, Any]], ended: int | None) -> None:
        tracer = self.interceptor.workflow_tracer()
        if tracer is None or not self.interceptor.first_emission(context.span_id):
            return
        token = _PRESET.set((context.trace_id, context.span_id))
        try:
            # An empty context, not the current one, when the run has no parent: a run started without
            # trace context (CLI, schedule, an uninstrumented client) is the root of its own trace.
            span = tracer.start_span(name, context=parent or otel_context.Context(), kind=kind,
                                     attributes=attributes, links=links, start_time=started)
        finally:
            _PRESET.reset(token)
        for event in events:
            event = dict(event)
            span.add_event("workflow_task.failed", event, timestamp=event.pop("time"))
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error) or type(error).__name__))
            span.set_attribute("error.type", error_type(error))
        span.end(end_time=ended)

    async def execute_workflow(self, input: temporalio.worker.ExecuteWorkflowInput) -> Any:
        info = temporalio.workflow.info()
        parent = context_from_headers(input.headers, self.interceptor.guard)
        self._workflow_context = workflow_span_context(info.run_id, parent)
        workflow_parent = trace.set_span_in_context(NonRecordingSpan(self._workflow_context))
        self._outbound.header = context_to_headers({}, workflow_parent, self.interceptor.guard).get(HEADER)
        # What the next run of a continue-as-new chain is given as its parent: the span that started the
        # chain (its client's call), or this run's WorkflowStarted span when nothing did, so the runs stay
        # siblings in one trace (a chain that continues thousands of times must not nest thousands deep).
        has_parent = parent is not None and trace.get_current_span(parent).get_span_context().is_valid
        self._outbound.chain_parent = parent if has_parent else workflow_parent
        if not temporalio.workflow.unsafe.is_replaying():  # the run's first workflow task, on its first worker
            self._make_span(f"WorkflowStarted:{info.workflow_type}", SpanKind.INTERNAL, self._workflow_context,
                            parent, _run_attributes(info), int(info.start_time.timestamp() * 1e9), None)
        try:
            result = await super().execute_workflow(input)
        except temporalio.workflow.ContinueAsNewError:
            self._emit(info, "continued_as_new", None)
            raise
        except BaseException as exc:
            outcome = _run_outcome(exc)
            if outcome is not None:
                self._emit(info, outcome, exc if outcome == "failed" else None)
            elif isinstance(exc, Exception):  # the task fails and is retried: the run goes on
                with temporalio.workflow.unsafe.sandbox_unrestricted():
                    self.interceptor.task_failed(info.run_id, exc)
            raise
        self._emit(info, "completed", None)
        return result

    def _emit(self, info: temporalio.workflow.Info, outcome: str, error: BaseException | None) -> None:
        """The run's RunWorkflow span and outcome, for a run this worker saw end (never in replay or eviction)."""
        started = self._workflow_context
        if temporalio.workflow.unsafe.is_replaying() or started is None:
            return
        attributes = {**_run_attributes(info), "temporal.outcome": outcome}
        links = []
        if info.continued_run_id:  # the previous run's RunWorkflow span: its span id derives from its run id
            links.append(Link(SpanContext(started.trace_id, run_span_id(info.continued_run_id), is_remote=True,
                                          trace_flags=started.trace_flags), {"temporal.link": "continued_from"}))
        with temporalio.workflow.unsafe.sandbox_unrestricted():
            events = self.interceptor.task_failures(info.run_id)
        context = SpanContext(started.trace_id, run_span_id(info.run_id), is_remote=True,
                              trace_flags=started.trace_flags, trace_state=started.trace_state)
        self._make_span(f"RunWorkflow:{info.workflow_type}", SpanKind.SERVER, context,
                        trace.set_span_in_context(NonRecordingSpan(started)), attributes,
                        int(info.start_time.timestamp() * 1e9), error, links, events)
        with temporalio.workflow.unsafe.sandbox_unrestricted():
            try:
                self.interceptor.workflow_outcomes.add(1, {"temporal.namespace": info.namespace,
                                                           "temporal.workflow.type": info.workflow_type,
                                                           "temporal.outcome": outcome})
            except Exception as exc:
                self.interceptor.guard.failed("workflow metrics", exc)

    @contextlib.contextmanager
    def _handler_span(self, kind: str, name: str, headers: Mapping[str, Payload], live: bool) -> Iterator[None]:
        """The handler runs inside its span; a span that cannot start or end never fails the task."""
        if not live:
            yield
            return
        guard = self.interceptor.guard
        with temporalio.workflow.unsafe.sandbox_unrestricted():
            try:
                parent = context_from_headers(headers, guard)
                links = [Link(self._workflow_context)] if self._workflow_context is not None else []
                info = temporalio.workflow.info()
                span = self.interceptor.tracer.start_span(
                    f"{kind}:{name}", context=parent, kind=SpanKind.SERVER, links=links,
                    attributes={"temporal.workflow.id": info.workflow_id, "temporal.workflow.run_id": info.run_id,
                                "temporal.workflow.type": info.workflow_type, "temporal.namespace": info.namespace})
            except Exception as exc:
                guard.failed("handler span", exc)
                span = None
        if span is None:
            yield
            return
        try:
            yield
        except Exception as exc:
            with temporalio.workflow.unsafe.sandbox_unrestricted(), contextlib.suppress(Exception):
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc) or type(exc).__name__))
                span.set_attribute("error.type", error_type(exc))
            raise
        finally:
            with temporalio.workflow.unsafe.sandbox_unrestricted():
                try:
                    span.end()
                except Exception as exc:
                    guard.failed("handler span end", exc)

    async def handle_signal(self, input: temporalio.worker.HandleSignalInput) -> None:
        with self._handler_span("HandleSignal", input.signal, input.headers,
                                not temporalio.workflow.unsafe.is_replaying()):
            return await super().handle_signal(input)

    async def handle_query(self, input: temporalio.worker.HandleQueryInput) -> Any:
        # A query is never part of the history: it is traced whenever it is answered.
        with self._handler_span("HandleQuery", input.query, input.headers, True):
            return await super().handle_query(input)

    def handle_update_validator(self, input: temporalio.worker.HandleUpdateInput) -> None:
        with self._handler_span("ValidateUpdate", input.update, input.headers,
                                not temporalio.workflow.unsafe.is_replaying()):
            return super().handle_update_validator(input)

    async def handle_update_handler(self, input: temporalio.worker.HandleUpdateInput) -> Any:
        with self._handler_span("HandleUpdate", input.update, input.headers,
                                not temporalio.workflow.unsafe.is_replaying()):
            return await super().handle_update_handler(input)


def _run_attributes(info: temporalio.workflow.Info) -> dict[str, Any]:
    return {"temporal.namespace": info.namespace, "temporal.task_queue": info.task_queue,
            "temporal.workflow.id": info.workflow_id, "temporal.workflow.run_id": info.run_id,
            "temporal.workflow.type": info.workflow_type, "temporal.workflow.attempt": info.attempt}


def _run_outcome(exc: BaseException) -> str | None:
    """How a run that raised ``exc`` ends, as the SDK decides it: ``cancelled`` (a cancellation error
    after a cancel request), ``failed`` (a workflow failure), or None when the run does not end here
    (eviction, or a workflow task failure that Temporal retries)."""
    reason = getattr(temporalio.workflow, "cancellation_reason", None)  # temporalio >= 1.19
    requested = reason() is not None if reason is not None else isinstance(exc, asyncio.CancelledError)
    if requested and temporalio.exceptions.is_cancelled_exception(exc):
        return "cancelled"
    return "failed" if _is_workflow_failure(exc) else None


def _is_workflow_failure(exc: BaseException) -> bool:
    """Whether ``exc`` fails the workflow rather than its task: a FailureError, an asyncio timeout, or a
    type listed in the worker's or workflow's ``failure_exception_types``. The SDK answers through
    its workflow runtime, which is not public API; without it, the SDK's default rule applies."""
    if not isinstance(exc, Exception):
        return False
    try:
        return bool(temporalio.workflow._Runtime.current().workflow_is_failure_exception(exc))
    except Exception:
        return isinstance(exc, (temporalio.exceptions.FailureError, asyncio.TimeoutError))


class _WorkflowOutbound(temporalio.worker.WorkflowOutboundInterceptor):
    header: Payload | None = None
    chain_parent: otel_context.Context | None = None

    def __init__(self, next: temporalio.worker.WorkflowOutboundInterceptor, inbound: _WorkflowInbound) -> None:
        super().__init__(next)
        self.inbound = inbound

    def _traced(self, name: str, headers: Mapping[str, Payload], attributes: dict[str, Any]) -> Mapping[str, Payload]:
        header = self.inbound.client_call(name, attributes) or self.header
        if header is None or HEADER in headers:
            return headers
        return {**headers, HEADER: header}

    def _activity(self, input: Any, local: bool) -> None:
        attributes = {"temporal.activity.type": input.activity, "temporal.activity.local": local}
        if input.activity_id:
            attributes["temporal.activity.id"] = input.activity_id
        input.headers = self._traced(f"StartActivity:{input.activity}", input.headers, attributes)

    def start_activity(self, input: temporalio.worker.StartActivityInput) -> Any:
        self._activity(input, False)
        return super().start_activity(input)

    def start_local_activity(self, input: temporalio.worker.StartLocalActivityInput) -> Any:
        self._activity(input, True)
        return super().start_local_activity(input)

    def continue_as_new(self, input: temporalio.worker.ContinueAsNewInput) -> Any:
        if self.chain_parent is not None:
            input.headers = context_to_headers(input.headers, self.chain_parent, self.inbound.interceptor.guard)
        return super().continue_as_new(input)

    async def signal_child_workflow(self, input: temporalio.worker.SignalChildWorkflowInput) -> None:
        input.headers = self._traced(f"SignalChildWorkflow:{input.signal}", input.headers,
                                     {"temporal.workflow.id": input.child_workflow_id})
        return await super().signal_child_workflow(input)

    async def signal_external_workflow(self, input: temporalio.worker.SignalExternalWorkflowInput) -> None:
        input.headers = self._traced(f"SignalExternalWorkflow:{input.signal}", input.headers,
                                     {"temporal.workflow.id": input.workflow_id, "temporal.namespace": input.namespace})
        return await super().signal_external_workflow(input)

    async def start_child_workflow(self, input: temporalio.worker.StartChildWorkflowInput) -> Any:
        input.headers = self._traced(f"StartChildWorkflow:{input.workflow}", input.headers,
                                     {"temporal.workflow.type": input.workflow, "temporal.workflow.id": input.id})
        return await super().start_child_workflow(input)


_ORIGINALS: dict[str, Any] = {}
# instrument()'s tracer_provider and meter_provider, given to every interceptor the wrappers add
_PROVIDERS: dict[str, Any] = {}


class CoreMetricsBridge:
    """Brings the SDK core's own metrics (the Rust core's ``temporal_*`` series) into the OpenTelemetry
    MeterProvider, so a worker needs no Prometheus port of its own: they travel with everything else.

    It installs a default Runtime whose metrics go to a buffer, and drains that buffer with
    ``temporalio.contrib.opentelemetry.MetricsExporter`` from the first client connect on. A default
    runtime that already exists is left alone (the bridge then does nothing, and says so).
    """

    def __init__(self) -> None:
        self.exporter: Any = None
        self.task: Any = None

    def install(self, meter_provider: metrics.MeterProvider | None = None) -> bool:
        try:
            from temporalio.contrib.opentelemetry import MetricsExporter
            from temporalio.runtime import MetricBuffer, Runtime, TelemetryConfig
        except ImportError:
            log.warning("sidetrace: temporalio %s has no MetricsExporter; core metrics are not bridged",
                        getattr(temporalio, "__version__", "?"))
            return False
        buffer = MetricBuffer(10_000)
        try:
            Runtime.set_default(Runtime(telemetry=TelemetryConfig(metrics=buffer)), error_if_already_set=True)
        except RuntimeError:
            log.warning("sidetrace: a Temporal runtime already exists; its core metrics are not bridged "
                        "(instrument before the first client connects)")
            return False
        self.exporter = MetricsExporter(buffer, meter_provider)
        return True

    def start(self) -> None:
        """Begin draining, in the running event loop (called from a client connect)."""
        if self.exporter is not None and self.task is None:
            self.task = asyncio.ensure_future(self.exporter.run())


_BRIDGE = CoreMetricsBridge()


def _official(thing: Any) -> bool:
    """Whether ``thing`` is temporalio's own OpenTelemetry interceptor or plugin (OpenTelemetryPlugin)."""
    return type(thing).__module__.startswith("temporalio.contrib.opentelemetry")


def _traced_already(interceptors: Any, plugins: Any = ()) -> bool:
    """Whether ours or temporalio's own OpenTelemetry interceptor is among ``interceptors``, or its
    ``OpenTelemetryPlugin`` among ``plugins`` (which adds its interceptor only inside connect)."""
    return any(isinstance(i, TracingInterceptor) or _official(i) for i in interceptors or ()) or \
        any(_official(p) for p in plugins or ())


def _connect_wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    interceptors = list(kwargs.get("interceptors") or [])
    if not _traced_already(interceptors, kwargs.get("plugins")):
        interceptors.append(TracingInterceptor(namespace=kwargs.get("namespace", "default"), **_PROVIDERS))
        kwargs = {**kwargs, "interceptors": interceptors}
    _BRIDGE.start()
    return wrapped(*args, **kwargs)


def _worker_wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """Worker(...): trace it too when its client was not made by an instrumented Client.connect."""
    try:
        client = args[0] if args else kwargs.get("client")
        config = client.config() if client is not None else {}
        if not _traced_already(config.get("interceptors"), config.get("plugins")) and \
                not _traced_already(kwargs.get("interceptors"), kwargs.get("plugins")):
            kwargs = {**kwargs, "interceptors": [*kwargs.get("interceptors", ()),
                                                 TracingInterceptor(namespace=client.namespace, **_PROVIDERS)]}
    except Exception as exc:  # never keep a worker from being built
        log.warning("sidetrace: could not add tracing to a Temporal worker: %s", exc)
    return wrapped(*args, **kwargs)


class TemporalInstrumentor(BaseInstrumentor):
    """Adds :class:`TracingInterceptor` to every ``Client.connect`` (and so to its workers).

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
