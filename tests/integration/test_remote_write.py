"""Remote-write to a real Prometheus (Debian package) started with its remote-write receiver."""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Agent, http_get, wait_until
from tests.integration.test_otlp_input import gauge_request, post
from tests.integration.test_prometheus import Prometheus

pytestmark = pytest.mark.slow

# Long enough for the retry backoff to reach its cap for a refused connection (3 s) several times, and for the
# queued collections (about 300 samples each, one a second) to outgrow one request's max_samples_per_request
# (5,000), so the backlog is sent as several joined requests. It was 30 s; 20 s keeps both.
OUTAGE_SECONDS = 20

STABLE = ("sidetrace_build_info", "sidetrace_spool_capacity_bytes", "sidetrace_config_reloads_total",
          "system_memory_limit_bytes")


def series_in(prometheus: Prometheus) -> set[tuple[str, frozenset]]:
    query = urllib.parse.quote('{__name__=~".+"}')
    status, body = http_get(f"{prometheus.url}/api/v1/series?match[]={query}&start={time.time() - 60}")
    assert status == 200, body
    return {(labels.pop("__name__"), frozenset(labels.items())) for labels in json.loads(body)["data"]}


def test_every_series_arrives_with_its_value_and_an_outage_loses_no_sample(
        agent_factory: Callable[..., Agent], tmp_path: Path) -> None:
    prometheus = Prometheus(tmp_path, None)
    try:
        agent = agent_factory(f'[[exporters.remote_write]]\nname = "prom"\nurl = "{prometheus.url}/api/v1/write"\n'
                              f'interval_seconds = 1\nexternal_labels = {{ instance = "host-a" }}\n'
                              f'[app_metrics]\nstale_seconds = 2\n').start()
        assert post(agent.otlp_http + "/v1/metrics", gauge_request("queue.depth", 7))[0] == 200
        _, text = http_get(agent.url + "/metrics")
        defaults = {"instance": "host-a", "job": "sidetrace"}  # an empty label is none: the default fills it
        exposed = {(sample.name, frozenset({**defaults, **{k: v for k, v in sample.labels.items() if v}}.items())):
                   sample.value for family in text_string_to_metric_families(text) for sample in family.samples}
        try:
            wait_until(lambda: set(exposed) <= series_in(prometheus), 15, "every series of /metrics in Prometheus")
        except AssertionError:
            raise AssertionError(f"missing: {sorted(set(exposed) - series_in(prometheus))[:5]}") from None
        for name in STABLE:
            ((key, value),) = [(key, value) for key, value in exposed.items() if key[0] == name]
            (result,) = prometheus.query(name)
            assert float(result["value"][1]) == value, name
        # The app's series went stale: a staleness marker ends it now, not five minutes later.
        wait_until(lambda: prometheus.query("queue_depth") == [], 15, "queue_depth to end in Prometheus")

        prometheus.stop()
        stopped = time.time()
        wait_until(lambda: time.time() - stopped >= OUTAGE_SECONDS, OUTAGE_SECONDS + 5, f"{OUTAGE_SECONDS} s of outage")
        prometheus.start()
        restarted = time.time()

        def stamps() -> list[float]:
            window = prometheus.query(f"sidetrace_build_info[45s] @ {restarted + 3:.3f}")
            return [float(at) for at, _ in window[0]["values"]] if window else []

        wait_until(lambda: stamps() and stamps()[-1] > restarted + 1, 30, "samples from after the restart")
        times = stamps()
        assert times[0] < stopped - 1 and times[-1] > restarted
        gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
        assert max(gaps) < 1.5, f"a gap of {max(gaps):.1f} s in the samples across the outage"
    finally:
        prometheus.stop()
