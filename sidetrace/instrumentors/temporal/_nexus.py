"""The Nexus handler side (temporalio releases with Nexus): one span per start or cancel request a worker
handles, continuing the context the caller sent in the request's headers."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import temporalio.nexus
import temporalio.worker
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.trace import SpanKind

from sidetrace.instrumentors.temporal._telemetry import _span, context_from_nexus_headers

if TYPE_CHECKING:
    from sidetrace.instrumentors.temporal._interceptor import TracingInterceptor


class _NexusOperationInbound(temporalio.worker.NexusOperationInboundInterceptor):
    def __init__(self, next: temporalio.worker.NexusOperationInboundInterceptor, root: TracingInterceptor) -> None:
        super().__init__(next)
        self.root = root

    def _attributes(self, ctx: Any) -> dict[str, Any]:
        attributes = {"temporal.nexus.service": ctx.service, "temporal.nexus.operation": ctx.operation}
        try:
            info = temporalio.nexus.info()
            attributes.update({"temporal.nexus.endpoint": info.endpoint, "temporal.namespace": info.namespace,
                               "temporal.task_queue": info.task_queue})
        except Exception as exc:  # never fail the operation for an attribute
            self.root.guard.failed("nexus info", exc)
        return attributes

    async def _handle(self, what: str, ctx: Any, handler: Awaitable[Any]) -> Any:
        """Await ``handler`` in a ``{what}:{service}/{operation}`` server span continuing the caller's context."""
        if not is_instrumentation_enabled():
            return await handler
        with _span(self.root.tracer, self.root.guard, f"{what}:{ctx.service}/{ctx.operation}", SpanKind.SERVER,
                   self._attributes(ctx), context_from_nexus_headers(ctx.headers, self.root.guard)):
            return await handler

    async def execute_nexus_operation_start(self, input: temporalio.worker.ExecuteNexusOperationStartInput) -> Any:
        return await self._handle("RunStartNexusOperationHandler", input.ctx,
                                  super().execute_nexus_operation_start(input))

    async def execute_nexus_operation_cancel(self, input: temporalio.worker.ExecuteNexusOperationCancelInput) -> None:
        return await self._handle("RunCancelNexusOperationHandler", input.ctx,
                                  super().execute_nexus_operation_cancel(input))
