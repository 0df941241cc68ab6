from __future__ import annotations

import pytest

from sidetrace.agent.sources.nats_trace import event_to_request

EVENT = {
    "server": {"name": "n1", "host": "127.0.0.1", "id": "NID", "ver": "2.15.1"},
    "request": {"header": {"traceparent": ["00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]},
                "msgsize": 116},
    "events": [
        {"type": "in", "ts": "2026-11-23T15:41:03.737566946Z", "kind": 0, "cid": 6, "acc": "A", "subj": "foo"},
        {"type": "sm", "ts": "2026-11-23T15:41:03.737570000Z", "to": "bar"},
        {"type": "js", "ts": "2026-11-23T15:41:03.737600000Z", "stream": "S", "subject": "bar"},
        {"type": "eg", "ts": "2026-11-23T15:41:03.737580376Z", "kind": 1, "cid": 9, "sub": "bar",
         "error": "slow consumer"},
    ],
}


def test_event_becomes_a_hop_span_under_the_publisher_with_children() -> None:
    request = event_to_request(EVENT)
    resource = {kv.key: kv.value.string_value for kv in request.resource_spans[0].resource.attributes}
    assert resource == {"service.name": "nats-server", "service.instance.id": "NID", "service.version": "2.15.1",
                        "host.name": "127.0.0.1", "nats.server.name": "n1"}
    hop, store, deliver = request.resource_spans[0].scope_spans[0].spans
    assert hop.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"
    assert hop.parent_span_id.hex() == "b7ad6b7169203331"
    assert hop.name == "nats-server foo"
    assert hop.start_time_unix_nano == 1795448463737566946
    assert hop.end_time_unix_nano == 1795448463737600000
    assert [e.name for e in hop.events] == ["subject mapping"]
    assert hop.status.message == "slow consumer"
    assert (store.name, store.parent_span_id) == ("store S", hop.span_id)
    assert (deliver.name, deliver.parent_span_id, deliver.status.message) == ("deliver bar", hop.span_id,
                                                                               "slow consumer")
    attributes = {kv.key: kv.value for kv in deliver.attributes}
    assert attributes["nats.connection.kind"].string_value == "router"


def test_event_without_traceparent_starts_its_own_trace() -> None:
    event = {**EVENT, "request": {"header": {}}}
    (hop, *_) = event_to_request(event).resource_spans[0].scope_spans[0].spans
    assert len(hop.trace_id) == 16 and hop.parent_span_id == b""


@pytest.mark.parametrize("bad", [{}, {"server": {}, "events": []}, {"server": {}, "events": [{"type": "eg"}]}])
def test_not_a_trace_event_raises_a_known_error(bad: dict) -> None:
    with pytest.raises((KeyError, ValueError, TypeError)):
        event_to_request(bad)
