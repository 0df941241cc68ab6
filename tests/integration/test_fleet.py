"""Beyond one host: the load-balancing exporter over real rotel collectors (each forwarding to its own
sink), with backends from a static list and from a real DNS server (dnsmasq)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.exception
import dns.resolver
import grpc
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidetrace.exporters.loadbalancing import HashRing
from tests.conftest import Agent, free_port, http_get, stop_process, wait_until
from tests.integration.otlp_servers import Rotel, Sink

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

SPANS_PER_TRACE = 10


class Collector:
    """A rotel collector and the sink it forwards to."""

    def __init__(self, tmp: Path, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.sink = Sink()
        self.rotel = Rotel(tmp, self.sink.port, grpc_port=port, host=host).start()
        self.endpoint = f"{host}:{self.rotel.grpc_port}"

    def traces(self) -> Counter[int]:
        """Spans received per trace number."""
        with self.sink.collected.lock:
            copies = list(self.sink.collected.spans.values())
        return Counter(next(kv.value.int_value for kv in span.attributes if kv.key == "trace.number")
                       for (_, span, _), *_ in copies)

    def trace_ids(self) -> dict[int, bytes]:
        """Each trace number's trace id."""
        with self.sink.collected.lock:
            copies = list(self.sink.collected.spans.values())
        return {next(kv.value.int_value for kv in span.attributes if kv.key == "trace.number"): span.trace_id
                for (_, span, _), *_ in copies}

    def stop(self) -> None:
        self.rotel.stop()
        self.sink.stop()


@pytest.fixture
def collectors(tmp_path: Path) -> Iterator[Callable[..., Collector]]:
    started: list[Collector] = []

    def make(**kwargs: object) -> Collector:
        collector = Collector(tmp_path, **kwargs)
        started.append(collector)
        return collector

    yield make
    for collector in started:
        collector.stop()


def send_traces(agent: Agent, first: int, count: int, processes: int) -> None:
    """``count`` traces numbered from ``first``, sent by ``processes`` app processes at once."""
    per_process = count // processes
    apps = [subprocess.Popen([sys.executable, "-m", "tests.integration.apps.trace_sender",
                              f"127.0.0.1:{agent.grpc_port}", f"app-{n}", str(first + n * per_process),
                              str(per_process)], cwd=ROOT) for n in range(processes)]
    for app in apps:
        assert app.wait(120) == 0


def whole_traces(collectors: list[Collector], numbers: range) -> list[int]:
    """Each trace's one collector (asserting it is found whole there and nowhere else)."""
    at: dict[int, list[tuple[int, int]]] = {}
    for index, collector in enumerate(collectors):
        for number, spans in collector.traces().items():
            at.setdefault(number, []).append((index, spans))
        assert collector.sink.collected.duplicates() == 0
    assert sorted(at) == list(numbers)
    split = {number: places for number, places in at.items() if len(places) != 1}
    assert split == {}
    assert {spans for places in at.values() for _, spans in places} == {SPANS_PER_TRACE}
    return [at[number][0][0] for number in numbers]


def lb_config(endpoints: list[str], extra: str = "") -> str:
    return (f'[[exporters.loadbalancing]]\nname = "tier"\nbatch_timeout_seconds = 0.05\n'
            f'backends = [{", ".join(json.dumps(e) for e in endpoints)}]\n{extra}')


def delivered(collectors: list[Collector]) -> int:
    return sum(c.sink.collected.unique() for c in collectors)


def test_traces_stay_whole_across_a_collector_outage_and_a_fourth_collector(
        agent_factory: Callable[..., Agent], collectors: Callable[..., Collector]) -> None:
    tier = [collectors() for _ in range(3)]
    agent = agent_factory(lb_config([c.endpoint for c in tier])).start()
    send_traces(agent, 0, 1000, processes=4)
    wait_until(lambda: delivered(tier) == 1000 * SPANS_PER_TRACE, 60, "the first 1,000 traces")
    owners = whole_traces(tier, range(1000))
    # Each trace at its owner on the ring, and the ring's shares within 20 % of each other. Counted over the
    # 1,000 traces themselves the shares would fail that bound in about 1 run in 20 by chance alone
    # (binomial noise of 1,000 draws on top of the ring's own spread), so the ring's shares are measured
    # over 30,000 ids.
    ring = HashRing(c.endpoint for c in tier)
    index = {c.endpoint: i for i, c in enumerate(tier)}
    ids = {number: trace_id for c in tier for number, trace_id in c.trace_ids().items()}
    assert owners == [index[ring.owner(ids[number])] for number in range(1000)]
    shares = Counter(ring.owner(os.urandom(16)) for _ in range(30_000))
    assert len(shares) == 3 and max(shares.values()) / min(shares.values()) < 1.2, shares

    # One collector away for 20 s while apps keep sending: the others never stall, its share waits on disk.
    down, live = tier[0], tier[1:]
    down.rotel.stop()
    stopped = time.monotonic()
    before = down.sink.collected.unique()
    send_traces(agent, 1000, 400, processes=2)

    def new_on_live() -> Counter[int]:
        return Counter({n: spans for c in live for n, spans in c.traces().items() if n >= 1000})

    wait_until(lambda: len(new_on_live()) >= 200 and set(new_on_live().values()) == {SPANS_PER_TRACE}, 30,
               "the live collectors' share of the new traces, whole, during the outage")
    wait_until(lambda: time.monotonic() - stopped >= 20, 25, "20 s of outage")
    assert down.sink.collected.unique() == before
    down.rotel = Rotel(down.rotel.tmp, down.sink.port, grpc_port=down.rotel.grpc_port).start()
    back = time.monotonic()
    wait_until(lambda: delivered(tier) == 1400 * SPANS_PER_TRACE, 90, "every trace after the outage")
    # Within a few seconds of its return: a refused connection is retried at most 3 s apart (it was up to 30 s,
    # and gRPC's own reconnection up to 120 s).
    assert time.monotonic() - back < 10, time.monotonic() - back
    whole_traces(tier, range(1400))

    # A fourth collector by SIGHUP: about a quarter of new traces move to it, none is split.
    tier.append(collectors())
    agent.write_config(lb_config([c.endpoint for c in tier]))
    agent.signal(signal.SIGHUP)
    wait_until(lambda: len(status_backends(agent)) == 4, 10, "the reload")
    send_traces(agent, 1400, 1000, processes=4)
    wait_until(lambda: delivered(tier) == 2400 * SPANS_PER_TRACE, 60, "the traces after the change")
    owners = whole_traces(tier, range(2400))  # no trace split: none was still running at the change
    moved = sum(owner == 3 for owner in owners[1400:]) / 1000
    assert 0.15 <= moved <= 0.35, moved
    assert "exporters reconfigured in place: tier" in agent.log()  # the other three deliveries went on uncut
    assert "exporters restarted" not in agent.log()
    counted = metric_lines(agent, "sidetrace_exporter_moved_traces_total")['exporter="tier"']
    assert 0 < counted <= 1400  # recent traces whose owner changed: each may be split if it was still running
    assert metric_lines(agent, "sidetrace_exporter_backend_sent_spans_total") == {
        f'backend="{c.endpoint}",exporter="tier"': float(sum(c.traces().values())) for c in tier}


def status_backends(agent: Agent) -> dict:
    status = json.loads(http_get(agent.url + "/debug/status")[1])
    return status["components"]["pipeline"]["exporters"]["tier"]["backends"]


def metric_lines(agent: Agent, name: str) -> dict[str, float]:
    _, text = http_get(agent.url + "/metrics")
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit("} ", 1)
            found[labels] = float(value)
    return found


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[Callable[[list[str]], None]]:
    """A real DNS server on a loopback port answering ``collectors.test`` with the addresses given."""
    binary = shutil.which("dnsmasq")
    assert binary, "dnsmasq comes from Debian's dnsmasq-base, which `make test` installs"
    hosts = tmp_path / "collectors.hosts"
    hosts.write_text("")
    port = free_port()
    queries = tmp_path / "dnsmasq.log"
    with queries.open("wb") as log:
        proc = subprocess.Popen([binary, "--keep-in-foreground", "--no-resolv", "--no-hosts", "--user=root",
                                 "--local=/test/", f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces",
                                 f"--addn-hosts={hosts}", "--log-facility=-", "--log-queries"], stderr=log)

    def answering() -> bool:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port = ["127.0.0.1"], port
        try:
            resolver.resolve("collectors.test", "A", lifetime=0.5)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            return True  # an answer: up, with its handlers in place (a SIGHUP before that would end it)
        except dns.exception.DNSException:
            return False
        return True

    wait_until(answering, 10, "dnsmasq answering")

    def serve(addresses: list[str]) -> None:
        hosts.write_text("".join(f"{address} collectors.test\n" for address in addresses))
        proc.send_signal(signal.SIGHUP)  # dnsmasq reads its hosts files again

    serve.port = port  # type: ignore[attr-defined]
    # A queries of collectors.test answered so far
    serve.queries = lambda: queries.read_text().count("query[A] collectors.test")  # type: ignore[attr-defined]
    yield serve
    stop_process(proc)


def test_backends_from_dns_follow_a_record_added_and_one_removed(
        agent_factory: Callable[..., Agent], collectors: Callable[..., Collector],
        dnsmasq: Callable[[list[str]], None]) -> None:
    port = free_port()
    tier = {host: collectors(host=host, port=port) for host in ("127.0.0.1", "127.0.0.2", "127.0.0.3")}
    dnsmasq(["127.0.0.1", "127.0.0.2"])
    agent = agent_factory(f'[[exporters.loadbalancing]]\nname = "tier"\nbatch_timeout_seconds = 0.05\n'
                          f'dns = "collectors.test:{port}"\ndns_server = "127.0.0.1:{dnsmasq.port}"\n'
                          f"dns_interval_seconds = 0.5\n").start()
    wait_until(lambda: sorted(status_backends(agent)) == [f"127.0.0.1:{port}", f"127.0.0.2:{port}"], 10,
               "the two first addresses")
    dnsmasq(["127.0.0.2", "127.0.0.3"])  # .3 added, .1 removed
    wait_until(lambda: sorted(status_backends(agent)) == [f"127.0.0.2:{port}", f"127.0.0.3:{port}"], 5,
               "the new set within a few intervals")
    send_traces(agent, 0, 200, processes=2)
    every = [tier["127.0.0.1"], tier["127.0.0.2"], tier["127.0.0.3"]]
    wait_until(lambda: delivered(every) == 200 * SPANS_PER_TRACE, 60, "every trace")
    owners = Counter(whole_traces(every, range(200)))
    assert owners[0] == 0 and owners[1] > 0 and owners[2] > 0


def test_a_name_resolving_to_nothing_is_logged_once_per_change_of_state(
        agent_factory: Callable[..., Agent], collectors: Callable[..., Collector],
        dnsmasq: Callable[[list[str]], None]) -> None:
    port = free_port()
    collectors(host="127.0.0.1", port=port)
    dnsmasq(["127.0.0.1"])
    agent = agent_factory(f'[[exporters.loadbalancing]]\nname = "tier"\ndns = "collectors.test:{port}"\n'
                          f'dns_server = "127.0.0.1:{dnsmasq.port}"\ndns_interval_seconds = 0.1\n').start()
    wait_until(lambda: list(status_backends(agent)) == [f"127.0.0.1:{port}"], 10, "the backend")
    for round_number in (1, 2):
        dnsmasq([])
        wait_until(lambda: "resolved to no address" in agent.log().split("resolves again")[-1], 10, "no address")
        asked = dnsmasq.queries()  # type: ignore[attr-defined]
        wait_until(lambda asked=asked: dnsmasq.queries() >= asked + 5, 10,  # type: ignore[attr-defined,misc]
                   "five more lookups")
        assert agent.log().count("resolved to no address; keeping 1 backend(s)") == round_number
        assert list(status_backends(agent)) == [f"127.0.0.1:{port}"]
        dnsmasq(["127.0.0.1"])
        wait_until(lambda n=round_number: agent.log().count("collectors.test resolves again") == n, 10, "an answer")


def metric(agent: Agent, name: str) -> float:
    _, text = http_get(agent.url + "/metrics")
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def test_a_reload_that_removes_the_balancer_counts_what_it_held_and_then_nothing_is_spooled(
        agent_factory: Callable[..., Agent]) -> None:
    away = f"127.0.0.1:{free_port()}"  # nothing listens there: its share waits in the spool
    agent = agent_factory(lb_config([away])).start()
    send_traces(agent, 0, 100, processes=1)  # returns once the agent acknowledged every span
    wait_until(lambda: metric_lines(agent, "sidetrace_exporter_send_failed_spans_total").get('exporter="tier"', 0)
               > 0, 10, "a refused send")
    assert metric(agent, "sidetrace_spool_size_bytes") > 0
    agent.write_config("")  # no exporter left
    agent.signal(signal.SIGHUP)
    wait_until(lambda: metric(agent, "sidetrace_config_reloads_total") == 1, 10, "the reload")
    assert metric_lines(agent, "sidetrace_spool_dropped_spans_total") == {
        'exporter="tier",reason="exporter_removed"': 100 * SPANS_PER_TRACE,
        'exporter="traces",reason="no_exporter"': 0}  # pre-exported while nothing takes spans
    assert metric(agent, "sidetrace_spool_size_bytes") == 0
    assert "no trace exporter left: traces are kept in memory only" in agent.log()
    before = metric(agent, "sidetrace_recent_traces_spans")
    send_traces(agent, 100, 10, processes=1)  # accepted, kept only in the recent traces, and counted
    assert metric(agent, "sidetrace_recent_traces_spans") == before + 10 * SPANS_PER_TRACE
    assert metric(agent, "sidetrace_spool_size_bytes") == 0
    assert metric_lines(agent, "sidetrace_spool_dropped_spans_total")[
        'exporter="traces",reason="no_exporter"'] == 10 * SPANS_PER_TRACE


def test_with_no_exporter_configured_accepted_spans_are_counted_as_not_spooled(
        agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory("").start()
    assert metric_lines(agent, "sidetrace_spool_dropped_spans_total") == {
        'exporter="traces",reason="no_exporter"': 0}
    send_traces(agent, 0, 10, processes=1)
    assert metric_lines(agent, "sidetrace_spool_dropped_spans_total") == {
        'exporter="traces",reason="no_exporter"': 10 * SPANS_PER_TRACE}
    assert 'counted in sidetrace_spool_dropped_spans_total{reason="no_exporter"}' in agent.log()


def wait_for_refused_sends(agent: Agent) -> None:
    wait_until(lambda: sum(v for k, v in metric_lines(agent, "sidetrace_exporter_send_failed_spans_total").items()
                           if k.startswith('exporter="tier')) > 0, 10, "a refused send")


def test_a_restart_that_renames_the_balancer_discards_and_counts_its_queues(
        agent_factory: Callable[..., Agent]) -> None:
    away = f"127.0.0.1:{free_port()}"  # nothing listens there: its share waits in the spool
    agent = agent_factory(lb_config([away])).start()
    send_traces(agent, 0, 100, processes=1)
    wait_for_refused_sends(agent)
    assert metric(agent, "sidetrace_spool_size_bytes") > 0
    agent.stop()
    agent.write_config(lb_config([away]).replace('name = "tier"', 'name = "tier2"'))
    agent.start()
    assert metric_lines(agent, "sidetrace_spool_dropped_spans_total").get(
        'exporter="tier",reason="exporter_removed"') == 100 * SPANS_PER_TRACE
    assert metric(agent, "sidetrace_spool_size_bytes") == 0  # nothing left counting against the bound
    assert "discarded 1000 items of queue tier/" in agent.log()
    assert not [k for k in metric_lines(agent, "sidetrace_spool_oldest_unsent_age_seconds") if 'exporter="tier/' in k]


def test_a_restart_without_the_trace_queue_reader_discards_and_counts_its_backlog_as_a_reload_does(
        agent_factory: Callable[..., Agent]) -> None:
    away = f"127.0.0.1:{free_port()}"  # nothing listens there: what "f" should send waits in the trace queue
    sink, later = Sink(), Sink()
    otlp = '[[exporters.otlp]]\nname = "{}"\nendpoint = "http://{}"\n'
    agent = agent_factory(otlp.format("f", away)).start()
    send_traces(agent, 0, 100, processes=1)
    wait_until(lambda: metric_lines(agent, "sidetrace_exporter_send_failed_spans_total").get('exporter="f"', 0) > 0,
               10, "a refused send")
    agent.stop()
    agent.write_config(lb_config([f"127.0.0.1:{sink.port}"]))  # nothing reads the trace queue any more
    agent.start()
    assert metric_lines(agent, "sidetrace_spool_dropped_spans_total").get(
        'exporter="f",reason="exporter_removed"') == 100 * SPANS_PER_TRACE
    assert metric(agent, "sidetrace_spool_size_bytes") == 0  # nothing left counting against the bound
    assert "discarded 1000 items of queue traces that exporter f had not delivered" in agent.log()
    agent.write_config(lb_config([f"127.0.0.1:{sink.port}"]) + otlp.format("g", f"127.0.0.1:{later.port}"))
    agent.signal(signal.SIGHUP)
    wait_until(lambda: metric(agent, "sidetrace_config_reloads_total") == 1, 10, "the reload")
    send_traces(agent, 100, 1, processes=1)
    wait_until(lambda: later.collected.unique() == SPANS_PER_TRACE, 10, "g delivering the new trace")
    assert sink.collected.unique() == SPANS_PER_TRACE  # the balancer has only the new one too
    agent.stop()
    assert later.collected.unique() == SPANS_PER_TRACE  # and none of what "f" had left
    sink.stop()
    later.stop()


def test_a_reload_that_turns_the_balancer_into_an_otlp_exporter_counts_its_queues(
        agent_factory: Callable[..., Agent]) -> None:
    away = f"127.0.0.1:{free_port()}"
    agent = agent_factory(lb_config([away])).start()
    send_traces(agent, 0, 100, processes=1)
    wait_for_refused_sends(agent)
    agent.write_config(f'[[exporters.otlp]]\nname = "tier"\nendpoint = "http://{away}"\n')
    agent.signal(signal.SIGHUP)
    wait_until(lambda: metric(agent, "sidetrace_config_reloads_total") == 1, 10, "the reload")
    assert metric_lines(agent, "sidetrace_spool_dropped_spans_total").get(
        'exporter="tier",reason="exporter_removed"') == 100 * SPANS_PER_TRACE
    assert metric(agent, "sidetrace_spool_size_bytes") == 0
    assert list(metric_lines(agent, "sidetrace_spool_oldest_unsent_age_seconds")) == ['exporter="tier"']


def test_a_reload_that_removes_an_otlp_exporter_discards_and_counts_what_it_had_not_delivered_at_once(
        agent_factory: Callable[..., Agent]) -> None:
    sink = Sink()
    away = f"127.0.0.1:{free_port()}"  # nothing listens there: what "a" should send waits in the trace queue
    a = f'[[exporters.otlp]]\nname = "a"\nendpoint = "http://{away}"\n'
    b = f'[[exporters.otlp]]\nname = "b"\nendpoint = "http://127.0.0.1:{sink.port}"\n'
    c = a.replace('name = "a"', 'name = "c"')
    agent = agent_factory(a + b).start()
    send_traces(agent, 0, 50, processes=1)
    wait_until(lambda: sink.collected.unique() == 50 * SPANS_PER_TRACE, 20, "b delivered every span")
    reloads = 0

    def reload(config: str) -> None:
        nonlocal reloads
        agent.write_config(config)
        agent.signal(signal.SIGHUP)
        reloads += 1
        wait_until(lambda: metric(agent, "sidetrace_config_reloads_total") == reloads, 10, "the reload")

    def removed() -> dict[str, float]:
        return {k: v for k, v in metric_lines(agent, "sidetrace_spool_dropped_spans_total").items()
                if "exporter_removed" in k}

    reload(b)  # "a" removed: the batches only it still needed go at once, counted
    assert removed() == {'exporter="a",reason="exporter_removed"': 50 * SPANS_PER_TRACE}
    assert metric(agent, "sidetrace_spool_size_bytes") == 0
    reload(a)  # "b" removed, a new "a" added: it starts where the queue's readers are, with nothing to send
    send_traces(agent, 50, 20, processes=1)
    assert metric(agent, "sidetrace_spool_size_bytes") > 0
    reload(c)  # renamed: "c" takes over what "a" had not delivered, nothing is discarded
    assert removed() == {'exporter="a",reason="exporter_removed"': 50 * SPANS_PER_TRACE}
    wait_until(lambda: metric_lines(agent, "sidetrace_exporter_send_failed_spans_total").get('exporter="c"', 0)
               == 20 * SPANS_PER_TRACE, 10, "c trying to send a's 20 traces")
    reload("")  # the last trace exporter removed: the trace queue's rows go at once, counted
    assert removed() == {'exporter="a",reason="exporter_removed"': 50 * SPANS_PER_TRACE,
                         'exporter="c",reason="exporter_removed"': 20 * SPANS_PER_TRACE}
    assert metric(agent, "sidetrace_spool_size_bytes") == 0
    assert "discarded 200 items of queue traces that exporter c had not delivered; it was removed" in agent.log()
    agent.stop()
    sink.stop()


def send_until(agent: Agent, stop: threading.Event) -> int:
    """Requests of 10 traces (numbered from 0) sent back to back until ``stop``, each retried until accepted;
    return the traces sent."""
    channel = grpc.insecure_channel(f"127.0.0.1:{agent.grpc_port}")
    export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
    number = 0
    while not stop.is_set():
        request = ExportTraceServiceRequest()
        resource_spans = request.resource_spans.add()
        kv = resource_spans.resource.attributes.add()
        kv.key, kv.value.string_value = "service.name", "steady"
        scope = resource_spans.scope_spans.add()
        for trace in range(number, number + 10):
            for position in range(SPANS_PER_TRACE):
                span = scope.spans.add()
                span.trace_id = (trace + 1).to_bytes(16, "big")
                span.span_id = (trace * 100 + position + 1).to_bytes(8, "big")
                span.name, span.start_time_unix_nano, span.end_time_unix_nano = "op", 1, 2
                kv = span.attributes.add()
                kv.key, kv.value.int_value = "trace.number", trace
        body = request.SerializeToString()
        while True:
            try:
                export(body, timeout=10)
                break
            except grpc.RpcError:  # refused (busy): the app retries
                time.sleep(0.05)
        number += 10
    channel.close()
    return number


def test_a_reload_that_rebuilds_the_balancer_under_traffic_loses_no_span_and_sends_none_twice(
        agent_factory: Callable[..., Agent], collectors: Callable[..., Collector]) -> None:
    tier = [collectors() for _ in range(3)]
    agent = agent_factory(lb_config([c.endpoint for c in tier])).start()
    stop = threading.Event()
    sent: list[int] = []
    sending = threading.Thread(target=lambda: sent.append(send_until(agent, stop)))
    sending.start()
    wait_until(lambda: delivered(tier) > 0, 30, "traffic flowing")
    # compression too: not a change of membership alone, so the exporter is rebuilt; and one collector leaves
    agent.write_config(lb_config([c.endpoint for c in tier[:2]], 'compression = "none"\n'))
    agent.signal(signal.SIGHUP)
    wait_until(lambda: "exporters restarted: tier" in agent.log(), 10, "the reload")
    wait_until(lambda: delivered(tier[:2]) > 0 and len(status_backends(agent)) == 2, 10, "the new exporter running")
    stop.set()
    sending.join(30)
    traces = sent[0]
    wait_until(lambda: delivered(tier) == traces * SPANS_PER_TRACE, 60, "every trace")
    spans = Counter(number for c in tier for number in c.traces().elements())  # per trace, over every collector
    assert set(spans) == set(range(traces)) and set(spans.values()) == {SPANS_PER_TRACE}
    assert all(c.sink.collected.duplicates() == 0 for c in tier)


def test_renames_and_changes_of_kind_under_traffic_deliver_or_count_every_accepted_span(
        agent_factory: Callable[..., Agent]) -> None:
    sink = Sink()

    def otlp(name: str) -> str:
        return (f'[[exporters.otlp]]\nname = "{name}"\nendpoint = "http://127.0.0.1:{sink.port}"\n'
                'batch_timeout_seconds = 0\n')

    def accepted() -> float:
        return metric_lines(agent, "sidetrace_receiver_accepted_spans_total")['transport="grpc"']

    agent = agent_factory(otlp("x1")).start()
    stop = threading.Event()
    sent: list[int] = []
    sending = threading.Thread(target=lambda: sent.append(send_until(agent, stop)))
    sending.start()
    try:
        wait_until(lambda: sink.collected.unique() > 0, 30, "traffic flowing")
        # renamed twice, turned into a balancer over the same sink, back to otlp under its name, into a balancer again
        # under that same name (its new backend queues must not go with the old kind's), renamed, removed, added again
        balancer = lb_config([f"127.0.0.1:{sink.port}"])
        for reloads, config in enumerate([otlp("x2"), otlp("x3"), balancer, otlp("tier"), balancer, otlp("x4"), "",
                                          otlp("x5")], 1):
            before = accepted()
            agent.write_config(config)
            agent.signal(signal.SIGHUP)
            wait_until(lambda n=reloads: metric(agent, "sidetrace_config_reloads_total") == n, 10, "the reload")
            wait_until(lambda b=before: accepted() > b + 500, 10, "traffic after the reload")
    finally:
        stop.set()
        sending.join(30)
    spans = sent[0] * SPANS_PER_TRACE
    assert accepted() == spans

    def counted() -> dict[str, float]:
        return {k: v for k, v in metric_lines(agent, "sidetrace_spool_dropped_spans_total").items() if v}

    # Every accepted span arrives, or is counted: what a removed exporter had not sent, what came while none was left.
    wait_until(lambda: sink.collected.unique() + sum(counted().values()) == spans, 30,
               "every span delivered or counted")
    assert {k.split(",")[1] for k in counted()} <= {'reason="exporter_removed"', 'reason="no_exporter"'}
    assert counted()['exporter="traces",reason="no_exporter"'] > 0
    resent = sum(metric_lines(agent, "sidetrace_exporter_resent_spans_total").values())
    assert sink.collected.duplicates() <= resent
    agent.stop()
    sink.stop()


def unread_bytes(port: int) -> int:
    """Bytes the process listening on ``port`` has not read yet from its established connections (Recv-Q)."""
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"], capture_output=True,
                         text=True, check=True).stdout
    return sum(int(line.split()[0]) for line in out.splitlines() if line.strip())


def copies(collectors: list[Collector]) -> Counter[bytes]:
    """How many times each span id arrived, over every collector's sink."""
    counts: Counter[bytes] = Counter()
    for collector in collectors:
        with collector.sink.collected.lock:
            for span_id, received in collector.sink.collected.spans.items():
                counts[span_id] += len(received)
    return counts


def test_a_backend_removed_with_a_request_in_flight_counts_what_it_may_get_twice(
        agent_factory: Callable[..., Agent], collectors: Callable[..., Collector]) -> None:
    tier = [collectors() for _ in range(3)]
    frozen = tier[2]
    agent = agent_factory(lb_config([c.endpoint for c in tier])).start()
    stop = threading.Event()
    sent: list[int] = []
    sending = threading.Thread(target=lambda: sent.append(send_until(agent, stop)))
    sending.start()
    try:
        wait_until(lambda: all(c.sink.collected.unique() > 0 for c in tier), 30, "traffic at every collector")
        os.kill(frozen.rotel.proc.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: unread_bytes(frozen.rotel.grpc_port) > 0, 10, "a request in flight to the frozen one")
            agent.write_config(lb_config([c.endpoint for c in tier[:2]]))
            agent.signal(signal.SIGHUP)
            wait_until(lambda: "(joined: none; left: " in agent.log(), 15, "the frozen collector removed")
        finally:
            os.kill(frozen.rotel.proc.pid, signal.SIGCONT)
    finally:
        stop.set()
        sending.join(30)
    traces = sent[0]
    wait_until(lambda: len(copies(tier)) == traces * SPANS_PER_TRACE, 60, "every span")
    resent = metric_lines(agent, "sidetrace_exporter_resent_spans_total")['exporter="tier"']
    assert resent > 0  # what was in flight to the removed collector went to the new owners too: counted
    # The resumed collector forwards what it had taken: those spans arrive twice, never more than counted.
    wait_until(lambda: sum(copies(tier).values()) > traces * SPANS_PER_TRACE, 20, "the frozen collector's copies")
    assert sum(n - 1 for n in copies(tier).values()) <= resent
