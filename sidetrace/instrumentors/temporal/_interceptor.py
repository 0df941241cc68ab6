"""The interceptor temporalio calls: its state per worker (tracers, metric instruments, span ids emitted,
task failures seen), and the interceptors of each role it hands out."""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from typing import Any

import temporalio.client
import temporalio.worker
from opentelemetry import metrics, trace
from opentelemetry.trace import Tracer, TracerProvider

from sidetrace import __version__
from sidetrace.instrumentors._messaging import Guard
from sidetrace.instrumentors.temporal._activity import _ActivityInbound
from sidetrace.instrumentors.temporal._client import _ClientOutbound
from sidetrace.instrumentors.temporal._workflow import _PresetIds, _WorkflowInbound

EMITTED_REMEMBERED = 10_000  # workflow-side span ids remembered per worker (about 1 MB)
TASK_FAILURES_REMEMBERED = 1_000  # runs whose workflow task failures a worker keeps for their span
TASK_FAILURES_PER_RUN = 10  # the first ones: a task failing forever must not grow the memory


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

    def intercept_nexus_operation(self, next: Any) -> Any:
        """Nexus handlers (SDKs without Nexus never call this, so they never import what it needs)."""
        from sidetrace.instrumentors.temporal._nexus import _NexusOperationInbound

        return _NexusOperationInbound(next, self)

    def workflow_interceptor_class(
        self, input: temporalio.worker.WorkflowInterceptorClassInput
    ) -> type[temporalio.worker.WorkflowInboundInterceptor]:
        root = self

        class _Bound(_WorkflowInbound):
            interceptor = root

        return _Bound
