"""A Temporal app for the tests, run as its own process (see test_temporal.py for why).

Usage: python -m tests.integration.apps.temporal_app MODE
MODE: ours, official-client (a retried activity); no-cache (max_cached_workflows=0, signal, query);
restart (the worker is replaced while the workflow waits for a signal); no-context (runs started by an
uninstrumented client and by the temporal CLI); outcomes (continue-as-new, cancelled, failed,
workflow task failures, timed out, terminated); providers (instrument's tracer_provider and meter_provider, and
suppress_instrumentation()); plugin-before, plugin-after, interceptor-before, interceptor-after
(temporalio's own OpenTelemetry plugin or interceptor given before or after instrument()); messages
(signal-with-start, update-with-start, signals from workflows to workflows); nexus (a workflow calling a sync,
a workflow-run and a cancelled Nexus operation); nexus-plugin-before, nexus-plugin-after,
nexus-interceptor-before, nexus-interceptor-after (the same beside temporalio's own plugin or interceptor);
nexus-failing=HOOKS (the same under a failing tracer); nexus-official-handler, nexus-official-caller
(our caller and a handler worker on temporalio's own interceptor, or the reverse); nexus-handler-client-first
(the handler's worker on a client made before instrument()); nexus-worker-plugin-before,
nexus-worker-plugin-after, nexus-worker-interceptor-before, nexus-worker-interceptor-after (temporalio's own
plugin or interceptor given to each worker, on a client made before or after instrument()); client-first
(workers on clients made before instrument() start a workflow through their client from an activity);
replay-safe, nexus-replay-safe (temporalio's replay-safe tracer provider, on which our workflow spans are
skipped: activities, children, continue-as-new, workflow-to-workflow signals and Nexus calls).
Prints the finished spans as one JSON line, then leaves with os._exit(0).
"""

import asyncio
import json
import os
import sys
from datetime import timedelta

import nexusrpc
import nexusrpc.handler
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio import activity, nexus, workflow
from temporalio.api.nexus.v1 import EndpointSpec, EndpointTarget
from temporalio.api.operatorservice.v1 import CreateNexusEndpointRequest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError, CancelledError, NexusOperationError
from temporalio.nexus.system.workflow_service.operations.signal_with_start_workflow import signal_with_start_workflow
from temporalio.plugin import SimplePlugin
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from sidetrace.instrumentors.temporal import TemporalInstrumentor

exporter = InMemorySpanExporter()
metric_reader = InMemoryMetricReader()
if __name__ == "__main__":
    provider = TracerProvider()
    if "plugin-" in sys.argv[1] or "replay-safe" in sys.argv[1]:  # OpenTelemetryPlugin insists on this one
        from temporalio.contrib.opentelemetry import create_tracer_provider

        provider = create_tracer_provider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[metric_reader]))
attempts = {"n": 0}

@activity.defn
async def ok(x: str) -> str:
    for _ in range(3):  # three heartbeats in a row: one event (they are rate-limited to one a second)
        activity.heartbeat("progress")
    return x.upper()

@activity.defn
async def flaky(x: str) -> str:
    attempts["n"] += 1
    if attempts["n"] < 3:
        raise RuntimeError(f"attempt {attempts['n']} fails")
    return x

@workflow.defn
class Child:
    @workflow.run
    async def run(self, x: str) -> str:
        return x[::-1]


@workflow.defn
class Flow:
    @workflow.run
    async def run(self, x: str) -> str:
        a = await workflow.execute_activity(ok, x, start_to_close_timeout=timedelta(seconds=10))
        b = await workflow.execute_activity(flaky, x, start_to_close_timeout=timedelta(seconds=10),
                                            retry_policy=RetryPolicy(initial_interval=timedelta(milliseconds=100),
                                                                     maximum_attempts=5))
        c = await workflow.execute_child_workflow(Child.run, x, id=f"{workflow.info().workflow_id}-child")
        return a + b + c

@workflow.defn
class Gated:
    def __init__(self) -> None:
        self.first_done = False
        self.released = False

    @workflow.run
    async def run(self, x: str) -> str:
        first = await workflow.execute_activity(ok, x, start_to_close_timeout=timedelta(seconds=10))
        self.first_done = True  # the server has the first activity's result: the history says so
        await workflow.wait_condition(lambda: self.released)
        second = await workflow.execute_activity(ok, x + "!", start_to_close_timeout=timedelta(seconds=10))
        return first + second

    @workflow.signal
    def go(self) -> None:
        self.released = True

    @workflow.query
    def state(self) -> str:
        """"waiting" only once the first activity's completion is in the history and the signal has not come."""
        if self.released:
            return "released"
        return "waiting" if self.first_done else "first activity running"


@workflow.defn
class Looping:
    """Three runs: the first two run an activity and continue as new, the third returns."""

    @workflow.run
    async def run(self, runs_left: int) -> str:
        await workflow.execute_activity(ok, str(runs_left), start_to_close_timeout=timedelta(seconds=10))
        if runs_left > 1:
            workflow.continue_as_new(runs_left - 1)
        return "done"


@workflow.defn
class Waiting:
    """Waits for a signal that never comes: it ends only when cancelled."""

    @workflow.run
    async def run(self) -> None:
        await workflow.wait_condition(lambda: False)


@workflow.defn
class Failing:
    @workflow.run
    async def run(self) -> None:
        raise ApplicationError("no such order", type="OrderMissing", non_retryable=True)


task_failures = {"n": 0}


@workflow.defn(sandboxed=False)  # unsandboxed: its task-failure count must outlive the evictions
class Brittle:
    """Fails its workflow task twice with a TypeError once the activity's result is in, then completes."""

    @workflow.run
    async def run(self, x: str) -> str:
        result = await workflow.execute_activity(ok, x, start_to_close_timeout=timedelta(seconds=10))
        if task_failures["n"] < 2:
            task_failures["n"] += 1
            raise TypeError(f"task failure {task_failures['n']}")
        return result


stuck_started: dict[str, asyncio.Event] = {"wf-timeout": asyncio.Event(), "wf-terminated": asyncio.Event()}
stuck_release = asyncio.Event()


@activity.defn
async def stuck() -> str:
    """Runs until released, long after its workflow has timed out or been terminated."""
    stuck_started[activity.info().workflow_id].set()
    await stuck_release.wait()
    return "released"


@workflow.defn
class Stuck:
    """Runs one activity, then waits on one that outlives the run."""

    @workflow.run
    async def run(self) -> str:
        await workflow.execute_activity(ok, "x", start_to_close_timeout=timedelta(seconds=10))
        return await workflow.execute_activity(stuck, start_to_close_timeout=timedelta(seconds=60))


async def ended_unseen(client: Client) -> None:
    """Stuck runs that end on the server while their second activity runs: one by its execution timeout,
    one terminated by the client. Returns once both activities have ended and their spans with them."""
    timing_out = await client.start_workflow(Stuck.run, id="wf-timeout", task_queue="o",
                                             execution_timeout=timedelta(seconds=2))
    terminated = await client.start_workflow(Stuck.run, id="wf-terminated", task_queue="o")
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in stuck_started.values())), 30)
    await terminated.terminate("by the test")
    try:
        await asyncio.wait_for(timing_out.result(), 30)
        raise AssertionError("the timed-out run returned")
    except WorkflowFailureError:
        pass
    statuses = [(await h.describe()).status for h in (timing_out, terminated)]
    assert statuses == [WorkflowExecutionStatus.TIMED_OUT, WorkflowExecutionStatus.TERMINATED], statuses
    stuck_release.set()

    async def both_attempts_ended() -> None:
        while sum(s.name == "RunActivity:stuck" for s in exporter.get_finished_spans()) < 2:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(both_attempts_ended(), 30)


async def outcomes(client: Client) -> None:
    """One run that completes after two continue-as-new, one cancelled, one failed, one with task failures,
    one timed out and one terminated."""
    async with Worker(client, task_queue="o", workflows=[Looping, Waiting, Failing, Brittle, Stuck],
                      activities=[ok, stuck]):
        assert await client.execute_workflow(Brittle.run, "hi", id="wf-brittle", task_queue="o") == "HI"
        history = await client.get_workflow_handle("wf-brittle").fetch_history()
        failed_tasks = [e for e in history.events if e.HasField("workflow_task_failed_event_attributes")]
        assert len(failed_tasks) == 2, failed_tasks  # Temporal retried the task, not the workflow
        assert await client.execute_workflow(Looping.run, 3, id="wf-loop", task_queue="o") == "done"
        waiting = await client.start_workflow(Waiting.run, id="wf-cancel", task_queue="o")
        await waiting.cancel()
        try:
            await waiting.result()
            raise AssertionError("the cancelled run returned")
        except WorkflowFailureError as err:
            assert isinstance(err.cause, CancelledError), err.cause
        try:
            await client.execute_workflow(Failing.run, id="wf-fail", task_queue="o")
            raise AssertionError("the failing run returned")
        except WorkflowFailureError as err:
            assert isinstance(err.cause, ApplicationError), err.cause
        await ended_unseen(client)


async def gated(target: str, namespace: str, mode: str) -> None:
    TemporalInstrumentor().instrument()
    client = await Client.connect(target, namespace=namespace)
    options = {"task_queue": "g", "workflows": [Gated], "activities": [ok]}
    if mode == "no-cache":
        options["max_cached_workflows"] = 0
    worker = Worker(client, **options)
    async with worker:
        handle = await client.start_workflow(Gated.run, "hi", id="wf-gated", task_queue="g")

        async def watch() -> None:  # queries while the first activity runs and completes, as a UI's would
            while await handle.query(Gated.state) != "waiting":
                pass

        await asyncio.gather(watch(), watch())
        if mode == "restart":
            await worker.shutdown()
            worker = Worker(client, **options)  # a new worker with an empty cache replays the history
            async with worker:
                await handle.signal(Gated.go)
                assert await handle.result() == "HIHI!"
        else:
            await handle.signal(Gated.go)
            assert await handle.result() == "HIHI!"


async def started_without_context(target: str, namespace: str) -> None:
    """Flow started by a client made before instrument() and by the ``temporal`` CLI: no trace context."""
    bare = await Client.connect(target, namespace=namespace)  # before instrument(): no interceptor
    TemporalInstrumentor().instrument(core_metrics=False)
    client = await Client.connect(target, namespace=namespace)
    async with Worker(client, task_queue="q", workflows=[Flow, Child], activities=[ok, flaky]):
        assert await bare.execute_workflow(Flow.run, "hi", id="wf-bare", task_queue="q") == "HIhiih"
        cli = await asyncio.create_subprocess_exec(
            os.path.join(os.path.dirname(sys.executable), "temporal"), "workflow", "start", "--address", target,
            "--namespace", namespace, "--task-queue", "q", "--type", "Flow", "--workflow-id", "wf-cli",
            "--input", '"hi"', stdout=asyncio.subprocess.DEVNULL)
        assert await asyncio.wait_for(cli.wait(), 60) == 0
        assert await bare.get_workflow_handle("wf-cli").result() == "HIhiih"


async def own_providers(target: str, namespace: str) -> None:
    """instrument(tracer_provider=, meter_provider=): Flow traced there, not globally; then Flow started
    under suppress_instrumentation(). Prints the global provider's span and metric counts first."""
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    TemporalInstrumentor().instrument(tracer_provider=tracer_provider, core_metrics=False,
                                      meter_provider=MeterProvider(metric_readers=[reader]))
    client = await Client.connect(target, namespace=namespace)
    async with Worker(client, task_queue="q", workflows=[Flow, Child], activities=[ok, flaky]):
        assert await client.execute_workflow(Flow.run, "hi", id="wf-own", task_queue="q") == "HIhiih"
        with suppress_instrumentation():
            handle = await client.start_workflow(Flow.run, "hi", id="wf-suppressed", task_queue="q")
        assert await handle.result() == "HIhiih"
    print_metrics()
    print("GLOBAL-SPANS", len(exporter.get_finished_spans()), flush=True)
    print_metrics(reader)
    print_spans(spans)


@workflow.defn
class Signalled:
    def __init__(self) -> None:
        self.released = False

    @workflow.run
    async def run(self) -> str:
        await workflow.wait_condition(lambda: self.released)
        return "released"

    @workflow.signal
    def go(self) -> None:
        self.released = True


async def beside_official(target: str, namespace: str, mode: str) -> None:
    """temporalio's OpenTelemetryPlugin (plugins=) or TracingInterceptor (interceptors=) on the client,
    given before or after instrument(): start, signal, handler and result are each traced once."""
    from temporalio.contrib.opentelemetry import OpenTelemetryPlugin
    from temporalio.contrib.opentelemetry import TracingInterceptor as Official

    kind, order = mode.split("-")
    official = {"plugins": [OpenTelemetryPlugin(add_temporal_spans=True)]} if kind == "plugin" else \
        {"interceptors": [Official()]}
    if order == "after":
        TemporalInstrumentor().instrument(core_metrics=False)
    client = await Client.connect(target, namespace=namespace, **official)
    if order == "before":
        TemporalInstrumentor().instrument(core_metrics=False)
    async with Worker(client, task_queue="s", workflows=[Signalled]):
        handle = await client.start_workflow(Signalled.run, id="wf-beside", task_queue="s")
        await handle.signal(Signalled.go)
        assert await handle.result() == "released"


@workflow.defn
class Everything:
    """An activity, a child, and a signal, a query and an update handler."""

    def __init__(self) -> None:
        self.released = False

    @workflow.run
    async def run(self, x: str) -> str:
        a = await workflow.execute_activity(ok, x, start_to_close_timeout=timedelta(seconds=10))
        c = await workflow.execute_child_workflow(Child.run, x, id=f"{workflow.info().workflow_id}-child")
        await workflow.wait_condition(lambda: self.released)
        return a + c

    @workflow.signal
    def go(self) -> None:
        self.released = True

    @workflow.query
    def state(self) -> str:
        return "released" if self.released else "waiting"

    @workflow.update
    def bump(self, n: int) -> int:
        return n + 1

    @bump.validator
    def bump_positive(self, n: int) -> None:
        if n < 0:
            raise ValueError("n must not be negative")


@workflow.defn
class Receiver:
    """Returns the signals and updates it got once it has ``expected`` of them."""

    def __init__(self) -> None:
        self.got: list[str] = []

    @workflow.run
    async def run(self, expected: int) -> list[str]:
        await workflow.wait_condition(lambda: len(self.got) >= expected)
        return self.got

    @workflow.signal
    def note(self, text: str) -> None:
        self.got.append(text)

    @workflow.update
    def add(self, n: int) -> int:
        self.got.append(str(n))
        return n + 1

    @add.validator
    def add_positive(self, n: int) -> None:
        if n < 0:
            raise ValueError("n must not be negative")


@workflow.defn
class Sender:
    """Signals its child and, as an external workflow, wf-receiver."""

    @workflow.run
    async def run(self) -> list[str]:
        child = await workflow.start_child_workflow(Receiver.run, 1, id="wf-sender-child")
        await child.signal(Receiver.note, "from parent")
        await workflow.get_external_workflow_handle("wf-receiver").signal(Receiver.note, "from sender")
        return await child


@workflow.defn
class Nested:
    """Runs Flow (activities, and a child of its own) as its child."""

    @workflow.run
    async def run(self, x: str) -> str:
        return await workflow.execute_child_workflow(Flow.run, x, id=f"{workflow.info().workflow_id}-flow")


async def replay_safe(target: str, namespace: str) -> None:
    """Under temporalio's replay-safe tracer provider (create_tracer_provider(), set globally), whose tracer
    cannot preset ids, so our workflow spans are skipped: a run with activities and a child, the same as a
    grandchild, a continue-as-new chain, and workflow-to-workflow signals, from an instrumented client; then a
    run with activities from a client made before instrument(), which sends no trace context."""
    bare = await Client.connect(target, namespace=namespace)
    TemporalInstrumentor().instrument(core_metrics=False)
    client = await Client.connect(target, namespace=namespace)
    async with Worker(client, task_queue="r", workflows=[Flow, Child, Nested, Looping, Receiver, Sender],
                      activities=[ok, flaky]):
        assert await client.execute_workflow(Flow.run, "hi", id="wf-safe", task_queue="r") == "HIhiih"
        attempts["n"] = 0
        assert await client.execute_workflow(Nested.run, "hi", id="wf-nested", task_queue="r") == "HIhiih"
        assert await client.execute_workflow(Looping.run, 3, id="wf-loop", task_queue="r") == "done"
        receiver = await client.start_workflow(Receiver.run, 1, id="wf-receiver", task_queue="r")
        assert await client.execute_workflow(Sender.run, id="wf-sender", task_queue="r") == ["from parent"]
        assert await receiver.result() == ["from sender"]
        attempts["n"] = 0
        assert await bare.execute_workflow(Flow.run, "hi", id="wf-bare", task_queue="r") == "HIhiih"


async def messages(target: str, namespace: str) -> None:
    """Signal-with-start, update-with-start (with a validator), and workflow-to-workflow signals."""
    from temporalio.client import WithStartWorkflowOperation, WorkflowUpdateStage
    from temporalio.common import WorkflowIDConflictPolicy

    TemporalInstrumentor().instrument(core_metrics=False)
    client = await Client.connect(target, namespace=namespace)
    async with Worker(client, task_queue="m", workflows=[Receiver, Sender]):
        receiver = await client.start_workflow(Receiver.run, 2, id="wf-receiver", task_queue="m",
                                               start_signal="note", start_signal_args=["from client"])
        operation = WithStartWorkflowOperation(Receiver.run, 1, id="wf-uws", task_queue="m",
                                               id_conflict_policy=WorkflowIDConflictPolicy.FAIL)
        update = await client.start_update_with_start_workflow(Receiver.add, 41, start_workflow_operation=operation,
                                                               wait_for_stage=WorkflowUpdateStage.COMPLETED)
        assert await update.result() == 42
        assert await (await operation.workflow_handle()).result() == ["41"]
        assert await client.execute_workflow(Sender.run, id="wf-sender", task_queue="m") == ["from parent"]
        assert await receiver.result() == ["from client", "from sender"]


NEXUS_ENDPOINT = "nexus-ep"  # Nexus endpoint names allow letters, digits and dashes


@nexusrpc.service
class Greeting:
    echo: nexusrpc.Operation[str, str]
    reverse: nexusrpc.Operation[str, str]
    hold: nexusrpc.Operation[str, None]
    refuse: nexusrpc.Operation[str, str]


@nexusrpc.handler.service_handler(service=Greeting)
class GreetingHandler:
    @nexusrpc.handler.sync_operation
    async def echo(self, ctx: nexusrpc.handler.StartOperationContext, text: str) -> str:
        return text.upper()

    @nexus.workflow_run_operation
    async def reverse(self, ctx: nexus.WorkflowRunOperationContext, text: str) -> nexus.WorkflowHandle[str]:
        return await ctx.start_workflow(Child.run, text, id="wf-nexus-reverse")

    @nexus.workflow_run_operation
    async def hold(self, ctx: nexus.WorkflowRunOperationContext, text: str) -> nexus.WorkflowHandle[None]:
        """Runs Waiting, which ends only when the caller cancels the operation."""
        return await ctx.start_workflow(Waiting.run, id="wf-nexus-hold")

    @nexusrpc.handler.sync_operation
    async def refuse(self, ctx: nexusrpc.handler.StartOperationContext, text: str) -> str:
        raise nexusrpc.OperationError(f"{text} refused", state=nexusrpc.OperationErrorState.FAILED)


@workflow.defn
class NexusCaller:
    """Calls a sync operation, a workflow-run operation, one more that it cancels once started, and a
    sync operation that fails; then signal-with-starts Receiver (temporalio's system Nexus operation)."""

    @workflow.run
    async def run(self, text: str) -> str:
        client = workflow.create_nexus_client(service=Greeting, endpoint=NEXUS_ENDPOINT)
        upper = await client.execute_operation(Greeting.echo, text)
        reversed_text = await client.execute_operation(Greeting.reverse, text)
        held = await client.start_operation(Greeting.hold, text)
        held.cancel()
        try:
            await held
            raise ApplicationError("the held operation returned", non_retryable=True)
        except NexusOperationError as err:
            if not isinstance(err.cause, CancelledError):
                raise
        try:
            await client.execute_operation(Greeting.refuse, text)
            raise ApplicationError("the refused operation returned", non_retryable=True)
        except NexusOperationError as err:
            if not isinstance(err.cause, ApplicationError) or err.cause.message != f"{text} refused":
                raise
        await signal_with_start_workflow(Receiver.run, 1, id="wf-nexus-receiver", task_queue="x", signal=Receiver.note,
                                         signal_args=["from the caller"])
        return upper + reversed_text


async def nexus_calls(target: str, namespace: str, mode: str) -> None:
    """NexusCaller on task queue x-caller (a worker without a workflow cache: each of its workflow tasks
    replays the history) calls a Nexus endpoint on the dev server that targets task queue x, whose worker
    runs the Greeting handlers and the workflows they start. Traced by us (nexus), beside
    temporalio's own plugin or interceptor (nexus-plugin-before and the like), by us under a failing tracer
    (nexus-failing=HOOKS, which prints the errors we counted), or by us on one side only, temporalio's own
    interceptor on the other (nexus-official-handler, nexus-official-caller). The app asserts
    every call answered and no workflow task failed."""
    from temporalio.contrib.opentelemetry import OpenTelemetryPlugin
    from temporalio.contrib.opentelemetry import TracingInterceptor as Official

    bare = await Client.connect(target, namespace=namespace)
    await bare.operator_service.create_nexus_endpoint(CreateNexusEndpointRequest(spec=EndpointSpec(
        name=NEXUS_ENDPOINT, target=EndpointTarget(worker=EndpointTarget.Worker(namespace=namespace, task_queue="x")))))
    failing = None
    official: dict = {}
    worker_official: dict = {}
    if mode.startswith("nexus-failing="):
        from tests.telemetry import FailingTelemetry

        failing = FailingTelemetry(mode.split("=", 1)[1].split("+"))
        TemporalInstrumentor().instrument(tracer_provider=failing.tracer_provider, core_metrics=False,
                                          meter_provider=failing.meter_provider)
    elif mode in ("nexus", "nexus-replay-safe"):  # the second on the replay-safe provider (see the top)
        TemporalInstrumentor().instrument(core_metrics=False)
    elif mode == "nexus-handler-client-first":
        pass  # instrument() once the handler's client is made
    elif mode in ("nexus-official-handler", "nexus-official-caller"):
        TemporalInstrumentor().instrument(core_metrics=False)
        official = {"interceptors": [Official()]} if mode == "nexus-official-handler" else {}
    elif mode.startswith("nexus-worker-"):  # the official one on each worker, none on the client
        _, _, kind, order = mode.split("-")
        worker_official = {"plugins": [OpenTelemetryPlugin(add_temporal_spans=True)]} if kind == "plugin" else \
            {"interceptors": [Official()]}
        if order == "after":
            TemporalInstrumentor().instrument(core_metrics=False)
    else:
        _, kind, order = mode.split("-")
        official = {"plugins": [OpenTelemetryPlugin(add_temporal_spans=True)]} if kind == "plugin" else \
            {"interceptors": [Official()]}
        if order == "after":
            TemporalInstrumentor().instrument(core_metrics=False)
    client = await Client.connect(target, namespace=namespace, **official)
    if mode.endswith("-before") or mode == "nexus-handler-client-first":
        TemporalInstrumentor().instrument(core_metrics=False)
    caller = client
    if mode in ("nexus-official-handler", "nexus-official-caller"):
        caller = await Client.connect(target, namespace=namespace,
                                      interceptors=[Official()] if mode == "nexus-official-caller" else [])
    elif mode == "nexus-handler-client-first":  # the handler's worker on a client made before instrument()
        caller = await Client.connect(target, namespace=namespace)
    async with Worker(client, task_queue="x", workflows=[Child, Waiting, Receiver, Everything], activities=[ok],
                      nexus_service_handlers=[GreetingHandler()], **worker_official), \
            Worker(caller, task_queue="x-caller", workflows=[NexusCaller], max_cached_workflows=0, **worker_official):
        assert await caller.execute_workflow(NexusCaller.run, "hi", id="wf-nexus", task_queue="x-caller") == "HIih"
        if worker_official:  # and the activity, child and handlers of Everything on the same worker
            handle = await client.start_workflow(Everything.run, "hi", id="wf-everything", task_queue="x")
            assert await handle.query(Everything.state) == "waiting"
            assert await handle.execute_update(Everything.bump, 41) == 42
            await handle.signal(Everything.go)
            assert await handle.result() == "HIih"
        held = client.get_workflow_handle("wf-nexus-hold")
        assert (await held.describe()).status == WorkflowExecutionStatus.CANCELED
        assert await client.get_workflow_handle("wf-nexus-receiver").result() == ["from the caller"]
        for workflow_id in ("wf-nexus", "wf-nexus-reverse", "wf-nexus-hold", "wf-nexus-receiver",
                            *(["wf-everything"] if worker_official else [])):
            history = await client.get_workflow_handle(workflow_id).fetch_history()
            failed_tasks = [e for e in history.events if e.HasField("workflow_task_failed_event_attributes")]
            assert failed_tasks == [], (workflow_id, failed_tasks)
    if failing is not None:
        print("ERRORS " + json.dumps(failing.errors()), flush=True)
        print("EXPORTED", failing.exporter.spans, flush=True)


async def failing_tracer(target: str, namespace: str, hooks: str) -> None:
    """Everything under a SpanProcessor raising from ``hooks`` and an exporter that raises: the app's calls
    all answer and the history has no failed workflow task. Prints the errors we counted, by place."""
    from tests.telemetry import FailingTelemetry

    failing = FailingTelemetry(hooks.split("+"))
    TemporalInstrumentor().instrument(tracer_provider=failing.tracer_provider, core_metrics=False,
                                      meter_provider=failing.meter_provider)
    client = await Client.connect(target, namespace=namespace)
    async with Worker(client, task_queue="f", workflows=[Everything, Child], activities=[ok]):
        handle = await client.start_workflow(Everything.run, "hi", id="wf-failing", task_queue="f")
        assert await handle.query(Everything.state) == "waiting"
        assert await handle.execute_update(Everything.bump, 41) == 42
        await handle.signal(Everything.go)
        assert await handle.result() == "HIih"
        history = await handle.fetch_history()
    failed_tasks = [e for e in history.events if e.HasField("workflow_task_failed_event_attributes")]
    assert failed_tasks == [], failed_tasks
    print("ERRORS " + json.dumps(failing.errors()), flush=True)
    print("EXPORTED", failing.exporter.spans, flush=True)


class CopyableClient(Client):
    """A Client subclass with Client's own constructor."""


class OddClient(Client):
    """A Client subclass whose constructor takes other arguments, so it cannot be made from its config()."""

    def __init__(self, client: Client) -> None:
        super().__init__(client.service_client, namespace=client.namespace)


@activity.defn
async def start_from_activity(workflow_id: str) -> str:
    """Runs Child through the worker's client; says which class that client is."""
    client = activity.client()
    result = await client.execute_workflow(Child.run, "ab", id=workflow_id, task_queue=activity.info().task_queue)
    return f"{type(client).__name__}:{result}"


@workflow.defn
class ViaActivity:
    @workflow.run
    async def run(self) -> str:
        return await workflow.execute_activity(start_from_activity, f"{workflow.info().workflow_id}-child",
                                               start_to_close_timeout=timedelta(seconds=30))


class OneShot(SimplePlugin):
    """A client and worker plugin whose configure_client refuses a second call (it registers something
    once), and which counts the workers it configured."""

    def __init__(self) -> None:
        super().__init__("OneShot")
        self.clients = self.workers = 0

    def configure_client(self, config):  # noqa: ANN001, ANN201
        self.clients += 1
        if self.clients > 1:
            raise RuntimeError("OneShot configured a second client")
        return super().configure_client(config)

    def configure_worker(self, config):  # noqa: ANN001, ANN201
        self.workers += 1
        return super().configure_worker(config)


async def client_first(target: str, namespace: str) -> None:
    """Workers on clients made before instrument() (a Client, a subclass with Client's constructor, one
    with another constructor, and one with a plugin that refuses a second configure_client), each running
    ViaActivity, whose activity runs Child through the worker's client; started by a client made after
    instrument()."""
    plain = await Client.connect(target, namespace=namespace)
    oneshot = OneShot()
    clients = {"plain": plain, "copyable": CopyableClient(plain.service_client, namespace=namespace),
               "odd": OddClient(plain), "oneshot": await Client.connect(target, namespace=namespace, plugins=[oneshot])}
    TemporalInstrumentor().instrument(core_metrics=False)
    starter = await Client.connect(target, namespace=namespace)
    for queue, client in clients.items():
        async with Worker(client, task_queue=queue, workflows=[ViaActivity, Child],
                          activities=[start_from_activity]) as worker:
            assert (worker.client is client) == (queue == "odd") and type(worker.client) is type(client)
            result = await starter.execute_workflow(ViaActivity.run, id=f"wf-{queue}", task_queue=queue)
            assert result == f"{type(client).__name__}:ba", result
            if queue == "plain":  # the app's own calls through the original client stay untraced
                assert await client.execute_workflow(Child.run, "cd", id="wf-untraced", task_queue=queue) == "dc"
    assert (oneshot.clients, oneshot.workers) == (1, 1)  # the copy's worker was configured by it, once


async def official_variants(target: str, namespace: str, mode: str) -> None:
    """Tracing interceptors instrument() cannot see in the arguments, on clients made before and after
    instrument(): in mode official-variants, temporalio's TracingInterceptor in a SimplePlugin or subclassed,
    ours in a SimplePlugin (after only), and the official one in a SimplePlugin on a worker whose client
    was made before; in mode official-plugin-subclass, a subclass of OpenTelemetryPlugin. Each runs
    ViaActivity (an activity, and Child started through the worker's client), started by its own client
    (by one instrument() traced for the worker's SimplePlugin); prints each case's spans as a line
    "CASE name json"."""
    from temporalio.contrib.opentelemetry import OpenTelemetryPlugin
    from temporalio.contrib.opentelemetry import TracingInterceptor as Official

    from sidetrace.instrumentors.temporal import TracingInterceptor

    class MyOfficial(Official):
        pass

    class MyPlugin(OpenTelemetryPlugin):
        pass

    def client_kwargs(kind: str) -> dict:
        return {"simpleplugin-official": {"plugins": [SimplePlugin("mine", interceptors=[Official()])]},
                "subclass-official": {"interceptors": [MyOfficial()]},
                "subclass-plugin": {"plugins": [MyPlugin(add_temporal_spans=True)]},
                "simpleplugin-ours": {"plugins": [SimplePlugin("mine", interceptors=[TracingInterceptor()])]},
                "worker-simpleplugin-official": {}}[kind]

    kinds = ["simpleplugin-official", "subclass-official"] if mode == "official-variants" else ["subclass-plugin"]
    before = [*kinds, "worker-simpleplugin-official"] if mode == "official-variants" else kinds
    cases = {f"{kind}-before": await Client.connect(target, namespace=namespace, **client_kwargs(kind))
             for kind in before}
    TemporalInstrumentor().instrument(core_metrics=False)
    after = [*kinds, "simpleplugin-ours"] if mode == "official-variants" else kinds
    cases.update({f"{kind}-after": await Client.connect(target, namespace=namespace, **client_kwargs(kind))
                  for kind in after})
    traced = await Client.connect(target, namespace=namespace)
    for case, client in cases.items():
        on_worker = case.startswith("worker-")
        worker_kwargs = {"plugins": [SimplePlugin("theirs", interceptors=[Official()])]} if on_worker else {}
        async with Worker(client, task_queue=case, workflows=[ViaActivity, Child], activities=[start_from_activity],
                          **worker_kwargs) as worker:
            assert (worker.client is client) != on_worker  # a copy only for the worker's own SimplePlugin
            starter = traced if on_worker else client
            assert await starter.execute_workflow(ViaActivity.run, id=f"wf-{case}", task_queue=case) == \
                f"{type(client).__name__}:ba"
        print("CASE", case, end=" ")
        print_spans()
        exporter.clear()


async def uninstrumented(target: str, namespace: str) -> None:
    """A client made while instrumented, used after uninstrument() (a worker on it runs ViaActivity, which
    starts Child through the worker's client): no span, and no trace header in the started runs; then
    instrumented again, the same client traces. Prints "HEADERS" with the header fields of the runs."""
    from sidetrace.instrumentors.temporal import HEADER

    instrumentor = TemporalInstrumentor()
    instrumentor.instrument(core_metrics=False)
    during = await Client.connect(target, namespace=namespace)
    instrumentor.uninstrument()
    for queue in ("off", "again"):
        if queue == "again":
            instrumentor.instrument(core_metrics=False)
        async with Worker(during, task_queue=queue, workflows=[ViaActivity, Child],
                          activities=[start_from_activity]):
            assert await during.execute_workflow(ViaActivity.run, id=f"wf-{queue}", task_queue=queue) == "Client:ba"
        carried = []
        for workflow_id in (f"wf-{queue}", f"wf-{queue}-child"):
            history = await during.get_workflow_handle(workflow_id).fetch_history()
            carried.append(HEADER in history.events[0].workflow_execution_started_event_attributes.header.fields)
        print("HEADERS", queue, json.dumps(carried), flush=True)


async def worker_only() -> None:
    """Serve task queue q from this process until standard input closes (the client is elsewhere)."""
    path = os.path.join(os.path.dirname(sys.executable), "temporal")
    env = await WorkflowEnvironment.start_local(dev_server_existing_path=path, ip="127.0.0.1")
    try:
        TemporalInstrumentor().instrument()
        client = await Client.connect(env.client.service_client.config.target_host, namespace=env.client.namespace)
        async with Worker(client, task_queue="q", workflows=[Flow, Child], activities=[ok, flaky]):
            print("TARGET", env.client.service_client.config.target_host, flush=True)
            await asyncio.to_thread(sys.stdin.read)
    finally:
        await env.shutdown()


async def client_only(target: str) -> None:
    TemporalInstrumentor().instrument()
    client = await Client.connect(target)
    assert await client.execute_workflow(Flow.run, "hi", id="wf-remote", task_queue="q") == "HIhiih"


def broken_header_is_ignored() -> None:
    """A foreign or corrupt _tracer-data header never fails the call that carries it."""
    from temporalio.api.common.v1 import Payload

    from sidetrace.instrumentors.temporal import GUARD, HEADER, context_from_headers, context_to_headers

    before = GUARD.errors
    garbage = Payload(metadata={"encoding": b"json/plain"}, data=b"{not json")
    assert context_from_headers({HEADER: garbage}) is None
    assert GUARD.errors == before + 1
    assert context_from_headers({}) is None
    assert HEADER not in context_to_headers({})  # nothing current: nothing to carry


def uninstrument_restores() -> None:
    original = Client.__dict__["connect"]  # the classmethod object itself, not a fresh bound method
    original_worker = Worker.__dict__["__init__"]
    TemporalInstrumentor().instrument()
    assert Client.__dict__["connect"] is not original and Worker.__dict__["__init__"] is not original_worker
    TemporalInstrumentor().instrument()  # twice is harmless
    TemporalInstrumentor().uninstrument()
    assert Client.__dict__["connect"] is original and Worker.__dict__["__init__"] is original_worker


class FileExporter:
    """Appends each finished span to a JSON-lines file at once: the process may be killed any time."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans):  # noqa: ANN001, ANN201
        from opentelemetry.sdk.trace.export import SpanExportResult

        with open(self.path, "a") as out:
            for s in spans:
                out.write(json.dumps({"name": s.name, "trace": s.context.trace_id, "id": s.context.span_id,
                                      "parent": s.parent.span_id if s.parent else None, "pid": os.getpid(),
                                      "start": s.start_time, "end": s.end_time}) + "\n")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 0) -> bool:
        return True


async def killable_worker(target: str, span_file: str) -> None:
    """A worker for task queue g that writes its spans to ``span_file`` as they end; runs until killed."""
    trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(FileExporter(span_file)))
    TemporalInstrumentor().instrument(core_metrics=False)
    client = await Client.connect(target)
    # The workflow task after the kill waits on the dead worker's sticky queue until this timeout (10 s unless
    # set), then goes to the task queue, where the replacement replays the history: the path under test.
    async with Worker(client, task_queue="g", workflows=[Gated], activities=[ok],
                      sticky_queue_schedule_to_start_timeout=timedelta(seconds=1)):
        print("READY", flush=True)
        await asyncio.Event().wait()


async def gated_client(target: str, span_file: str, phase: str) -> None:
    """Phase start: start Gated and return once it waits for its signal. Phase finish: signal, await."""
    trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(FileExporter(span_file)))
    TemporalInstrumentor().instrument(core_metrics=False)
    client = await Client.connect(target)
    if phase == "start":
        handle = await client.start_workflow(Gated.run, "hi", id="wf-killed", task_queue="g")
        while await handle.query(Gated.state) != "waiting":
            await asyncio.sleep(0.05)
    else:
        handle = client.get_workflow_handle("wf-killed")
        await handle.signal(Gated.go)
        assert await handle.result() == "HIHI!"


async def main(mode: str):
    if mode.startswith("killable-worker="):
        target, span_file = mode.split("=", 1)[1].split(",")
        return await killable_worker(target, span_file)
    if mode.startswith("gated-client="):
        target, span_file, phase = mode.split("=", 1)[1].split(",")
        return await gated_client(target, span_file, phase)
    if mode == "ours":  # before any client or server exists: the core metrics bridge needs the first runtime
        TemporalInstrumentor().instrument()
    if mode == "worker":
        await worker_only()
        return print_spans()
    if mode.startswith("client="):
        await client_only(mode.split("=", 1)[1])
        return print_spans()
    if mode == "uninstrument":
        broken_header_is_ignored()
        uninstrument_restores()
        return print(json.dumps([]))
    path = os.path.join(os.path.dirname(sys.executable), "temporal")
    # Signal-with-start from a workflow (a system Nexus operation) is off by default on the server.
    extra = ["--dynamic-config-value", "history.enableSignalWithStartFromWorkflow=true"] if mode.startswith("nexus") \
        else []
    env = await WorkflowEnvironment.start_local(dev_server_existing_path=path, ip="127.0.0.1",
                                                dev_server_extra_args=extra)
    target, namespace = env.client.service_client.config.target_host, env.client.namespace
    try:
        if mode in ("no-cache", "restart"):
            await gated(target, namespace, mode)
        elif mode == "outcomes":
            TemporalInstrumentor().instrument(core_metrics=False)
            await outcomes(await Client.connect(target, namespace=namespace))
        elif mode == "providers":
            await own_providers(target, namespace)
            return
        elif mode.startswith(("plugin-", "interceptor-")):
            await beside_official(target, namespace, mode)
        elif mode.startswith("failing="):
            await failing_tracer(target, namespace, mode.split("=", 1)[1])
        elif mode.startswith("nexus"):
            await nexus_calls(target, namespace, mode)
        elif mode == "messages":
            await messages(target, namespace)
        elif mode == "replay-safe":
            await replay_safe(target, namespace)
        elif mode == "client-first":
            await client_first(target, namespace)
        elif mode in ("official-variants", "official-plugin-subclass"):
            await official_variants(target, namespace, mode)
            return
        elif mode == "uninstrumented":
            await uninstrumented(target, namespace)
        elif mode == "no-context":
            await started_without_context(target, namespace)
        elif mode == "official-worker":  # the reverse: our client, a worker still on the official interceptor
            from temporalio.contrib.opentelemetry import TracingInterceptor as Official
            worker_client = await Client.connect(target, namespace=namespace, interceptors=[Official()])
            TemporalInstrumentor().instrument()
            starter = await Client.connect(target, namespace=namespace)
        elif mode == "official-client":  # the starting side still uses temporalio.contrib.opentelemetry
            from temporalio.contrib.opentelemetry import TracingInterceptor as Official
            starter = await Client.connect(target, namespace=namespace, interceptors=[Official()])
            TemporalInstrumentor().instrument()
            worker_client = await Client.connect(target, namespace=namespace)
        else:
            starter = worker_client = await Client.connect(target, namespace=namespace)
        if mode in ("ours", "official-client", "official-worker"):
            async with Worker(worker_client, task_queue="q", workflows=[Flow, Child], activities=[ok, flaky]):
                result = await starter.execute_workflow(Flow.run, "hi", id="wf-1", task_queue="q")
            assert result == "HIhiih", result
            if mode == "ours":  # the only mode with the core metrics bridge (see above)
                await asyncio.sleep(1.5)  # the core metrics bridge drains its buffer every second
    finally:
        await env.shutdown()
    print_metrics()
    print_spans()


def print_metrics(reader: InMemoryMetricReader = metric_reader) -> None:
    """One line: metric name -> [(attributes, count or value)] for sums and histograms."""
    found: dict = {}
    data = reader.get_metrics_data()
    for resource_metrics in (data.resource_metrics if data else []):
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                for point in metric.data.data_points:
                    value = getattr(point, "count", None)
                    found.setdefault(metric.name, []).append(
                        [dict(point.attributes), value if value is not None else point.value])
    print("METRICS " + json.dumps(found), flush=True)


def print_spans(finished: InMemorySpanExporter = exporter) -> None:
    spans = [{"name": s.name, "kind": s.kind.name, "trace": s.context.trace_id, "id": s.context.span_id,
              "parent": s.parent.span_id if s.parent else None, "status": s.status.status_code.name,
              "start": s.start_time, "end": s.end_time, "links": [link.context.span_id for link in s.links],
              "events": [event.name for event in s.events],
              "event_details": [{"name": event.name, "attributes": dict(event.attributes), "time": event.timestamp}
                                for event in s.events],
              "attributes": dict(s.attributes)} for s in finished.get_finished_spans()]
    print(json.dumps(spans), flush=True)

if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
    # Exit without interpreter finalization: with grpcio loaded beside temporalio's runtime, Python's
    # finalization aborts about one run in three (PyGILState_Release), after all the work is done.
    os._exit(0)
