"""The workflow side, inside the sandbox: the run's spans with ids derived from its run id, made outside
replay, and the calls it makes."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import temporalio.exceptions
import temporalio.worker
import temporalio.workflow
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from temporalio.api.common.v1 import Payload

from sidetrace.instrumentors.temporal._telemetry import (
    HEADER,
    context_from_headers,
    context_to_headers,
    context_to_nexus_headers,
    error_type,
)

if TYPE_CHECKING:
    from sidetrace.instrumentors.temporal._interceptor import TracingInterceptor

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


class _WorkflowInbound(temporalio.worker.WorkflowInboundInterceptor):
    """Runs in the workflow sandbox. Outbound calls carry the WorkflowStarted span's context, whose ids
    are derived from the run id, and that span is made at the run's first workflow task, so whatever
    points at it is never orphaned; the RunWorkflow span is made once, when the workflow completes
    outside replay, with the run's start time, so it has its real duration however many workers and
    replays the run went through. Handler spans are made only outside replay. On a tracer that cannot
    make workflow spans (not the SDK's), calls carry the context the run was given instead."""

    interceptor: TracingInterceptor

    def init(self, outbound: temporalio.worker.WorkflowOutboundInterceptor) -> None:
        self._outbound = _WorkflowOutbound(outbound, self)
        self._workflow_context: SpanContext | None = None
        self._calls = 0  # calls made so far (activities, children, signals, Nexus): the same on every replay
        super().init(self._outbound)

    def client_call(self, name: str, attributes: dict[str, Any]) -> otel_context.Context | None:
        """The context to send with a call from the workflow (an activity, a child, a signal, a Nexus
        operation), whose span is made now; None when there is none to send.

        The span's ids derive from the run id and the call's position in the run, so a replay
        reproduces them; it is made at scheduling, outside replay, and ended at once, so it is exported
        before any attempt or child run that points at it, whether or not the run ever ends here.
        """
        self._calls += 1  # counted before anything can fail, so replays number calls alike
        workflow_context = self._workflow_context
        if workflow_context is None:  # no span can be made: the caller sends the run's own parent
            return None
        try:
            return self._client_call(name, attributes, workflow_context)
        except Exception as exc:  # never break the workflow: the call goes on untraced
            with temporalio.workflow.unsafe.sandbox_unrestricted():
                self.interceptor.guard.failed("workflow call", exc)
            return None

    def _client_call(self, name: str, attributes: dict[str, Any],
                     workflow_context: SpanContext) -> otel_context.Context | None:
        info = temporalio.workflow.info()
        context = SpanContext(workflow_context.trace_id, _digest(f"{info.run_id}:{self._calls}", 8), is_remote=True,
                              trace_flags=workflow_context.trace_flags)
        if not temporalio.workflow.unsafe.is_replaying():
            self._make_span(name, SpanKind.CLIENT, context, trace.set_span_in_context(NonRecordingSpan(
                workflow_context)), attributes, None, None, instant=True)
        return trace.set_span_in_context(NonRecordingSpan(context))

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
        has_parent = parent is not None and trace.get_current_span(parent).get_span_context().is_valid
        if self._spans_can_be_made():
            self._workflow_context = workflow_span_context(info.run_id, parent)
            workflow_parent: otel_context.Context | None = trace.set_span_in_context(
                NonRecordingSpan(self._workflow_context))
            # What the next run of a continue-as-new chain is given as its parent: the span that started
            # the chain (its client's call), or this run's WorkflowStarted span when nothing did, so the runs
            # stay siblings in one trace (a chain that continues thousands of times must not nest deep).
            self._outbound.chain_parent = parent if has_parent else workflow_parent
        else:
            # No workflow span can be made on this tracer (not the SDK's: temporalio's replay-safe provider,
            # say), so no call's span either: what the run sends carries the context it was given, the
            # nearest ancestor that is exported, never the id of a span that will never be.
            self._workflow_context = None
            workflow_parent = self._outbound.chain_parent = parent if has_parent else None
        self._outbound.parent = workflow_parent
        self._outbound.header = None if workflow_parent is None else context_to_headers(
            {}, workflow_parent, self.interceptor.guard).get(HEADER)
        if self._workflow_context is not None and not temporalio.workflow.unsafe.is_replaying():
            # the run's first workflow task, on its first worker
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

    def _spans_can_be_made(self) -> bool:
        """Whether our tracer can make workflow spans (their ids are preset: the SDK's tracer only)."""
        with temporalio.workflow.unsafe.sandbox_unrestricted():
            try:
                return self.interceptor.workflow_tracer() is not None
            except Exception as exc:
                self.interceptor.guard.failed("workflow tracer", exc)
                return False

    def _emit(self, info: temporalio.workflow.Info, outcome: str, error: BaseException | None) -> None:
        """The run's RunWorkflow span and outcome, for a run this worker saw end (never in replay or eviction)."""
        if temporalio.workflow.unsafe.is_replaying():
            return
        with temporalio.workflow.unsafe.sandbox_unrestricted():
            events = self.interceptor.task_failures(info.run_id)
        started = self._workflow_context
        if started is not None:  # None: no workflow span can be made, but the outcome is counted
            attributes = {**_run_attributes(info), "temporal.outcome": outcome}
            links = []
            if info.continued_run_id:  # the previous run's RunWorkflow span: its id derives from its run id
                links.append(Link(SpanContext(started.trace_id, run_span_id(info.continued_run_id), is_remote=True,
                                              trace_flags=started.trace_flags), {"temporal.link": "continued_from"}))
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
    parent: otel_context.Context | None = None  # the run's WorkflowStarted span, once the run has begun
    header: Payload | None = None  # the same, as a header
    chain_parent: otel_context.Context | None = None

    def __init__(self, next: temporalio.worker.WorkflowOutboundInterceptor, inbound: _WorkflowInbound) -> None:
        super().__init__(next)
        self.inbound = inbound

    def _traced(self, name: str, headers: Mapping[str, Payload], attributes: dict[str, Any]) -> Mapping[str, Payload]:
        context = self.inbound.client_call(name, attributes)
        if HEADER in headers:
            return headers
        guard = self.inbound.interceptor.guard
        header = self.header if context is None else context_to_headers({}, context, guard).get(HEADER)
        if header is None:
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

    async def start_nexus_operation(self, input: Any) -> Any:
        """A Nexus operation: its context travels in the operation's string headers, as temporalio's own
        interceptor sends it (``traceparent``), and the handler's span continues it."""
        attributes = {"temporal.nexus.endpoint": input.endpoint, "temporal.nexus.service": input.service,
                      "temporal.nexus.operation": input.operation_name}
        context = self.inbound.client_call(f"StartNexusOperation:{input.service}/{input.operation_name}", attributes)
        context = context or self.parent
        if context is not None:
            input.headers = context_to_nexus_headers(input.headers, context, self.inbound.interceptor.guard)
        return await super().start_nexus_operation(input)

    async def start_signal_with_start_workflow(self, request: Any) -> Any:
        """Signal-with-start from a workflow (temporalio's system Nexus operation): the run it starts and
        the signal's handler continue this call's span, as they do a client's signal-with-start."""
        workflow_type = _workflow_type(request.workflow)
        attributes = {"temporal.workflow.type": workflow_type, "temporal.workflow.id": request.id,
                      "temporal.task_queue": request.task_queue, "temporal.namespace": request.namespace}
        context = self.inbound.client_call(f"SignalWithStartWorkflow:{workflow_type}", attributes) or self.parent
        headers = request.headers or {}
        if context is not None and HEADER not in headers:  # the SDK sends a Payload value as it is
            request.headers = context_to_headers(headers, context, self.inbound.interceptor.guard)
        return await super().start_signal_with_start_workflow(request)


def _workflow_type(workflow: Any) -> str:
    """The type name of a workflow given by name or by its run method (as the SDK resolves it)."""
    if isinstance(workflow, str):
        return workflow
    try:
        return temporalio.workflow._Definition.get_name_and_result_type(workflow)[0]
    except Exception:  # a run method the SDK will refuse itself: name the span after the function
        return getattr(workflow, "__qualname__", type(workflow).__name__)
