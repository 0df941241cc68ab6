"""The shipped dashboards and alert rules: valid, and every metric they use is one the agent documents."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
METRIC = re.compile(r"\b((?:sidetrace|system|traces_span_metrics|process)_[a-z0-9_]+)")
SUFFIXES = ("_bucket", "_sum", "_count")


def documented(name: str, readme: str) -> bool:
    if name in readme:
        return True
    return any(name.endswith(suffix) and name[: -len(suffix)] in readme for suffix in SUFFIXES)


def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Debian's prometheus, which `make test` installs"
    done = subprocess.run([promtool, "check", "rules", str(ROOT / "dashboards/prometheus/rules.yml")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 9 rules found" in done.stdout


def test_dashboard_and_rules_use_only_documented_metrics() -> None:
    readme = (ROOT / "README.md").read_text()
    dashboard = json.loads((ROOT / "dashboards/grafana/sidetrace.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(expressions) >= 15
    rules = (ROOT / "dashboards/prometheus/rules.yml").read_text()
    names = {name for text in [*expressions, rules] for name in METRIC.findall(text)}
    assert {"traces_span_metrics_calls_total", "system_network_io_bytes_total",
            "sidetrace_spool_dropped_spans_total"} <= names
    undocumented = sorted(name for name in names if not documented(name, readme))
    assert undocumented == []


def test_every_metric_name_in_the_readme_is_written_whole_in_the_code() -> None:
    """So that `grep` leads from a dashboard's series to the line that emits it."""
    readme = (ROOT / "README.md").read_text()
    # The agent's metrics: the instrumentors' context variables share the prefix but are no metrics.
    code = "\n".join(path.read_text() for part in ("agent", "exporters")
                     for path in (ROOT / "sidetrace" / part).rglob("*.py"))
    listed = {name.rstrip("_") for name in METRIC.findall(readme) if not name.startswith("process_")}
    assert len(listed) >= 60
    missing = sorted(name for name in listed if f'"{name}"' not in code
                     and not any(name.endswith(s) and f'"{name[: -len(s)]}"' in code for s in SUFFIXES))
    assert missing == []
    emitted = set(re.findall(r'"((?:sidetrace|system|traces_span_metrics)_[a-z0-9_]+)"', code))
    assert sorted(name for name in emitted if not documented(name, readme)) == []


RULES = ROOT / "dashboards/prometheus/rules.yml"
RULES_TEST = ROOT / "dashboards/prometheus/rules_test.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    assert path, "promtool comes with Debian's prometheus, which `make test` installs"
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=60)


def alert_names() -> list[str]:
    return re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.MULTILINE)


def test_every_alert_fires_on_a_synthetic_fault_and_stays_quiet_when_healthy() -> None:
    done = promtool("test", "rules", str(RULES_TEST))
    assert done.returncode == 0, done.stdout + done.stderr
    text = RULES_TEST.read_text()
    for name in alert_names():
        assert f"alertname: {name}, exp_alerts: []}}" in text, f"{name} has no case where it must stay quiet"
        assert re.search(rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels:", text), f"{name} never fires"


def test_each_alert_test_fails_when_its_alert_cannot_fire(tmp_path: Path) -> None:
    """The unit tests really expect each alert: with its expression made one that never fires, promtool fails."""
    rules = RULES.read_text()
    names = alert_names()
    assert len(names) == 9
    for name in names:
        start = rules.index(f"- alert: {name}\n")
        expr_at = rules.index("expr: ", start)
        line_end = rules.index("\n", expr_at)
        (tmp_path / "rules.yml").write_text(rules[:expr_at] + "expr: vector(0) > 1" + rules[line_end:])
        (tmp_path / "rules_test.yml").write_text(RULES_TEST.read_text())
        done = promtool("test", "rules", str(tmp_path / "rules_test.yml"))
        assert done.returncode == 1, f"the tests pass although {name} can never fire"
        assert f"alertname: {name}" in done.stdout + done.stderr


def test_scrape_config_keeps_the_apps_job_and_instance() -> None:
    scrape = (ROOT / "dashboards/prometheus/scrape.yml").read_text()
    assert re.search(r"job_name: sidetrace\n(?:\s+#.*\n|\s+scrape_interval: \S+\n)*\s+honor_labels: true\n", scrape)
    done = promtool("check", "config", str(ROOT / "dashboards/prometheus/scrape.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_ratio_panels_show_zero_for_a_healthy_service(tmp_path: Path) -> None:
    """A service without errors has no error series; its error ratio must still be 0, not "no data"."""
    dashboard = json.loads((ROOT / "dashboards/grafana/sidetrace.json").read_text())
    panel = next(p for p in dashboard["panels"] if p["title"] == "Error ratio by service")
    expr = panel["targets"][0]["expr"].replace('instance=~"$instance"', 'instance=~".*"')
    expr = expr.replace("$__rate_interval", "5m")
    calls = 'traces_span_metrics_calls_total{{instance="h1:9464",span_kind="SPAN_KIND_SERVER",service_name="{}",' \
        'status_code="{}"}}'
    (tmp_path / "ratio_test.yml").write_text(f"""
tests:
  - interval: 1m
    input_series:
      - {{series: '{calls.format("healthy", "STATUS_CODE_UNSET")}', values: '0+60x10'}}
      - {{series: '{calls.format("flaky", "STATUS_CODE_UNSET")}', values: '0+30x10'}}
      - {{series: '{calls.format("flaky", "STATUS_CODE_ERROR")}', values: '0+30x10'}}
    promql_expr_test:
      - expr: '{expr}'
        eval_time: 10m
        exp_samples:
          - {{labels: '{{service_name="healthy"}}', value: 0}}
          - {{labels: '{{service_name="flaky"}}', value: 0.5}}
""")
    done = promtool("test", "rules", str(tmp_path / "ratio_test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
