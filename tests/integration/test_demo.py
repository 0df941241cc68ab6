"""The examples/ system that `make demo` runs, as a test: five services with no tracing code, each in its own
process under `sidetrace instrument`, with a real nats-server, Temporal dev server and agent and the stand-in
daprd. One order must be one trace in the agent, every hop in causal order under the right parent, and the
agent's span metrics must count every span of every service."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from examples.run_demo import SERVICES, Demo
from tests.conftest import http_get, wait_until

pytestmark = pytest.mark.slow

# (service, span name, kind, parent's (service, span name)), in causal order: each span starts after the one
# before it in this list, except where siblings run side by side (ASGI's receive and send spans).
HOPS = [
    ("orders", "POST /orders", "SERVER", None),
    ("orders", "StartWorkflow:PlaceOrder", "CLIENT", ("orders", "POST /orders")),
    # The run's first task exports WorkflowStarted; what the run makes hangs under it, RunWorkflow beside.
    ("orders", "WorkflowStarted:PlaceOrder", "INTERNAL", ("orders", "StartWorkflow:PlaceOrder")),
    ("orders", "RunWorkflow:PlaceOrder", "SERVER", ("orders", "WorkflowStarted:PlaceOrder")),
    ("orders", "StartActivity:publish_order", "CLIENT", ("orders", "WorkflowStarted:PlaceOrder")),
    ("orders", "RunActivity:publish_order", "SERVER", ("orders", "StartActivity:publish_order")),
    ("orders", "publish orders.created", "PRODUCER", ("orders", "RunActivity:publish_order")),
    ("dispatch", "process orders.created", "CONSUMER", ("orders", "publish orders.created")),
    ("dispatch", "invoke fulfilment/orders", "CLIENT", ("dispatch", "process orders.created")),
    ("fulfilment", "invoke fulfilment/orders", "SERVER", ("dispatch", "invoke fulfilment/orders")),
    ("fulfilment", "GET", "CLIENT", ("fulfilment", "invoke fulfilment/orders")),
    ("pricing", "GET /prices/<item>", "SERVER", ("fulfilment", "GET")),
    ("fulfilment", "state.save statestore", "CLIENT", ("fulfilment", "invoke fulfilment/orders")),
    ("fulfilment", "publish pubsub/orders.fulfilled", "PRODUCER", ("fulfilment", "invoke fulfilment/orders")),
    ("shipping", "POST /orders-fulfilled", "SERVER", ("fulfilment", "publish pubsub/orders.fulfilled")),
    ("shipping", "process pubsub/orders.fulfilled", "CONSUMER", ("shipping", "POST /orders-fulfilled")),
]
# The contrib ASGI instrumentation's own spans under FastAPI's SERVER span and the handler it runs.
ASGI = [
    ("shipping", "POST /orders-fulfilled http receive", "INTERNAL", ("shipping", "POST /orders-fulfilled")),
    ("shipping", "POST /orders-fulfilled http send", "INTERNAL", ("shipping", "process pubsub/orders.fulfilled")),
    ("shipping", "POST /orders-fulfilled http send", "INTERNAL", ("shipping", "process pubsub/orders.fulfilled")),
]


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    system = Demo(tmp_path)
    try:
        yield system.start()
    finally:
        system.stop()


def test_one_order_is_one_trace_from_temporal_through_nats_and_dapr_to_every_service(demo: Demo) -> None:
    demo.place_order("teapot", 2)
    trace_id = demo.whole_trace()["trace_id"]

    def complete() -> dict | None:  # whole, the trace may still wait for a leaf span such as state.save
        trace = json.loads(http_get(f"{demo.agent_url}/debug/traces/{trace_id}")[1])
        return trace if trace["span_count"] == len(HOPS) + len(ASGI) else None

    trace = wait_until(complete, 30, "every span of the order")
    assert [s["trace_id"] for s in json.loads(http_get(f"{demo.agent_url}/debug/traces?limit=10")[1])["traces"]] \
        == [trace_id]  # the order made one trace, and nothing else did
    spans = trace["spans"]
    by_id = {span["span_id"]: span for span in spans}

    def described(span: dict) -> tuple:
        parent = by_id.get(span["parent_span_id"])
        return (span["service"], span["name"], span["kind"].removeprefix("SPAN_KIND_"),
                parent and (parent["service"], parent["name"]))

    assert sorted(map(described, spans), key=repr) == sorted(HOPS + ASGI, key=repr)
    (root,) = [span for span in spans if span["parent_span_id"] not in by_id]
    assert (root["name"], root["parent_span_id"]) == ("POST /orders", "")
    hops = {described(span)[:2]: span for span in spans if described(span) in HOPS}
    starts = [hops[hop[:2]]["start_unix_nano"] for hop in HOPS]
    assert starts == sorted(starts)
    assert all(by_id[span["parent_span_id"]]["start_unix_nano"] <= span["start_unix_nano"] for span in spans
               if span is not root)
    assert {span["status_code"] for span in spans} == {"STATUS_CODE_UNSET"}

    # The stand-in daprd named caller and callee as daprd does.
    with urllib.request.urlopen(f"http://127.0.0.1:{demo.sidecars['dispatch'][0]}/_standin/seen", timeout=5) as r:
        (forwarded,) = [s for s in json.loads(r.read()) if s["direction"] == "out"]
    assert (forwarded["headers"]["dapr-caller-app-id"], forwarded["headers"]["dapr-callee-app-id"]) == \
        ("dispatch", "fulfilment")

    # The agent's span metrics count each of those spans, by service.
    exposition = http_get(f"{demo.agent_url}/metrics")[1]
    calls = Counter()
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "traces_span_metrics_calls_total":
                labels = sample.labels
                calls[(labels["service_name"], labels["span_name"], labels["span_kind"])] += int(sample.value)
    assert calls == Counter((s["service"], s["name"], s["kind"]) for s in spans)
    assert {service for service, _, _ in calls} == set(SERVICES)
