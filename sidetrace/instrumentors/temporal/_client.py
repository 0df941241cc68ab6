"""The client side: spans around calls a client makes (start, signal, query, update), carrying their context."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import temporalio.client
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.trace import SpanKind

from sidetrace.instrumentors.temporal._telemetry import _span, context_to_headers

if TYPE_CHECKING:
    from sidetrace.instrumentors.temporal._interceptor import TracingInterceptor


class _ClientOutbound(temporalio.client.OutboundInterceptor):
    def __init__(self, next: temporalio.client.OutboundInterceptor, root: TracingInterceptor,
                 side: Any = None) -> None:
        super().__init__(next)
        self.root = root
        self.side = side  # the _ClientSide instrument() added, whose ``active`` says whether to trace

    def _attributes(self, workflow_id: str, **extra: Any) -> dict[str, Any]:
        attributes = {"temporal.workflow.id": workflow_id, **{k: v for k, v in extra.items() if v}}
        if self.root.namespace:
            attributes["temporal.namespace"] = self.root.namespace
        return attributes

    async def _call(self, name: str, attributes: dict[str, Any], input: Any, call: Any,
                    carriers: tuple[Any, ...] = ()) -> Any:
        """``call(input)`` inside a CLIENT span whose context ``input.headers`` (or each of ``carriers``'
        headers) carries."""
        if (self.side is not None and not self.side.active) or not is_instrumentation_enabled():
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
