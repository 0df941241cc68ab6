"""The command line's own parts: flags, help text, tables and log lines."""

from __future__ import annotations

import io
import json
import logging
import platform
from pathlib import Path

import pytest

from sidetrace import __version__, cli
from sidetrace.agent.logs import JsonFormatter


def test_version_flag_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"sidetrace {__version__} (Python {platform.python_version()})\n"


@pytest.mark.parametrize("command", ["status", "traces", "flows"])
def test_help_of_the_agent_commands_documents_every_exit_code(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "%%" not in text
    not_ready = "3 when it is not ready, " if command == "status" else ""
    assert ("1 when the agent is unreachable or answers with another HTTP error (such as 404 or 503), 2 when the "
            f"config or an option is invalid, {not_ready}4 when it refuses the token.") in text
    assert ("0 when ready," if command == "status" else "0 when answered (ready or not),") in text


def test_flows_help_shows_a_single_percent_sign(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["flows", "--help"])
    assert "with their 95 % error bounds" in " ".join(capsys.readouterr().out.split())


def test_flows_table_shows_the_whole_direction() -> None:
    flow = {"device": "eth0", "direction": "transmit", "protocol": "tcp", "local": "10.0.0.1", "local_port": 5000,
            "remote": "10.0.0.2", "remote_port": 443, "bytes_per_second": 1500.0, "estimated_packets": 10,
            "estimated_bytes": 15000, "error_bound_percent": 62.0, "process": "curl"}
    table = cli.render_flows({"interfaces": {"eth0": {"sampling_rate": 1, "kernel_drops": 0}}, "flow_count": 1,
                              "evicted_flows": 0, "flows": [flow]})
    assert table.splitlines()[2].split() == ["eth0", "transmit", "tcp", "10.0.0.1:5000", "10.0.0.2:443", "1.5",
                                             "KB/s", "10", "15000", "62.0%", "curl"]


def test_json_log_line_carries_level_logger_message_and_extra_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("sidetrace.test_json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("exporter %s failing", "jaeger", extra={"exporter": "jaeger", "attempt": 3})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("send failed")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert set(first) == {"time", "level", "logger", "message", "exporter", "attempt"}
    assert (first["level"], first["logger"], first["message"], first["exporter"], first["attempt"]) == (
        "warning", "sidetrace.test_json", "exporter jaeger failing", "jaeger", 3)
    assert second["level"] == "error" and second["exception"].endswith("ValueError: boom")


def test_status_shows_each_backend_of_a_load_balancing_exporter_under_it() -> None:
    from sidetrace.cli import render_status

    backend = {"state": "failing", "sent": 5, "last_error": "connection_refused: no", "oldest_unsent_age_seconds": 61}
    exporter = {"state": "failing", "sent": 12, "last_error": "10.0.0.2:4317: connection_refused: no",
                "oldest_unsent_age_seconds": 61, "backends": {"10.0.0.1:4317": {**backend, "state": "running",
                                                                                 "sent": 7},
                                                              "10.0.0.2:4317": backend}}
    status = {"version": "0.1.0", "python": "3.11.7", "pid": 1, "uptime_seconds": 5, "ready": True,
              "config_path": None, "components": {"pipeline": {"state": "running", "detail": "1 exporter(s)",
                                                               "exporters": {"tier": exporter}}}}
    rows = [line.split() for line in render_status(status).splitlines()[3:]]
    assert [row[:4] for row in rows[1:]] == [["pipeline", "running", "1", "exporter(s)"],
                                             ["exporter", "tier", "failing", "sent"],
                                             ["backend", "10.0.0.1:4317", "running", "sent"],
                                             ["backend", "10.0.0.2:4317", "failing", "sent"]]
    assert " ".join(rows[-1]).endswith("sent 5, oldest unsent 1m01s connection_refused: no")
    assert rows[-2][-1] == "-"  # a running backend shows no error


@pytest.mark.parametrize("limit", ["0", "-1", "1001", "x"])
def test_traces_limit_outside_1_to_1000_is_refused_as_flows_top_is(
        limit: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["traces", "--limit", limit])
    assert info.value.code == 2
    assert f"argument --limit: expected an integer from 1 to 1000, got '{limit}'" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["127.0.0.1:notaport", "http://127.0.0.1:99999", "ftp://127.0.0.1:1", "http://"])
@pytest.mark.parametrize("command", ["status", "traces", "flows"])
def test_a_url_that_is_not_one_is_a_usage_error_in_one_line(
        command: str, url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([command, "--url", url, "--token", "t"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"--url {url}: ") and err.count("\n") == 1, err


def test_a_run_whose_config_asks_for_json_logs_reports_config_errors_as_json_lines(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIDETRACE_AGENT__LOG_FORMAT", raising=False)
    path = tmp_path / "sidetrace.toml"
    path.write_text('[agent]\nlog_format = "json"\ndata_dir = "/proc/sidetrace"\n[server]\nlisten = "nope"\n')
    assert cli.main(["run", "--config", str(path)]) == 2
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(line["level"], line["logger"], line["message"]) for line in lines] == [
        ("error", "sidetrace.config", f'{path}: server.listen: expected HOST:PORT, got "nope"')]
    monkeypatch.setenv("SIDETRACE_AGENT__LOG_FORMAT", "text")  # the variable wins over the file, as in run
    assert cli.main(["run", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f'{path}: server.listen: expected HOST:PORT, got "nope"\n'
    path.write_text('[agent]\nlog_format = "json"\n[server\n')  # not TOML: the format cannot be known, text it is
    assert cli.main(["run", "--config", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"{path}: TOML syntax error: ")
