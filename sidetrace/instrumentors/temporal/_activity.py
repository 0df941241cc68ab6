"""The activity side: one RunActivity span per attempt, its metrics and heartbeat events."""

from __future__ import annotations

import contextlib
import contextvars
import time
from typing import TYPE_CHECKING, Any

import temporalio.activity
import temporalio.worker
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.trace import SpanKind

from sidetrace.instrumentors.temporal._telemetry import _span, context_from_headers, error_type

if TYPE_CHECKING:
    from sidetrace.instrumentors.temporal._interceptor import TracingInterceptor

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
