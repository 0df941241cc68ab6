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
