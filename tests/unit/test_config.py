from __future__ import annotations

from pathlib import Path

import pytest

from sidetrace import cli, config
from sidetrace.config import Config, ConfigError, load

README = Path(__file__).resolve().parents[2] / "README.md"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sidetrace.toml"
    path.write_text(text)
    return path


def problems(path: Path | None, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path, env or {})
    return info.value.problems


def test_defaults_without_file_or_env() -> None:
    loaded = load(None, {})
    assert loaded == Config()
    assert loaded.server.listen == "127.0.0.1:9464"
    assert loaded.agent.log_level == "info"
    assert loaded.host.interval_seconds == 15.0
    assert loaded.host.include_devices == ()


def test_file_values_are_typed(tmp_path: Path) -> None:
    path = write(tmp_path, """
[agent]
log_level = "DEBUG"
[server]
listen = "[::1]:9500"
[host]
interval_seconds = 5
include_devices = ["eth.*", "lo"]
enabled = false
""")
    loaded = load(path, {})
    assert loaded.agent.log_level == "debug"
    assert loaded.server.listen == "[::1]:9500"
    assert loaded.host.interval_seconds == 5.0 and isinstance(loaded.host.interval_seconds, float)
    assert loaded.host.include_devices == ("eth.*", "lo")
    assert loaded.host.enabled is False


def test_env_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nlisten = "127.0.0.1:1111"\n')
    loaded = load(path, {
        "SIDETRACE_SERVER__LISTEN": "127.0.0.1:9500",
        "SIDETRACE_HOST__INTERVAL_SECONDS": "2.5",
        "SIDETRACE_HOST__EXCLUDE_DEVICES": '["veth.*", "br-.*"]',
        "SIDETRACE_HOST__ENABLED": "false",
        "SIDETRACE_CONFIG": "ignored: not a <SECTION>__<KEY> name",
        "OTHER__THING": "ignored",
    })
    assert loaded.server.listen == "127.0.0.1:9500"
    assert loaded.host.interval_seconds == 2.5
    assert loaded.host.exclude_devices == ("veth.*", "br-.*")
    assert loaded.host.enabled is False


def test_bad_listen_names_file_key_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nlisten = "9464"\n')
    assert problems(path) == [f'{path}: server.listen: expected HOST:PORT, got "9464"']


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "127.0.0.1:70000", "host:port", "[nothex]:80", ":80"])
def test_listen_rejects(tmp_path: Path, listen: str) -> None:
    path = write(tmp_path, f'[server]\nlisten = "{listen}"\n')
    (line,) = problems(path)
    assert line.startswith(f"{path}: server.listen: expected HOST:PORT")
    assert line.endswith(f'got "{listen}"')


def test_env_error_names_the_variable() -> None:
    assert problems(None, {"SIDETRACE_HOST__INTERVAL_SECONDS": "soon"}) == [
        'environment SIDETRACE_HOST__INTERVAL_SECONDS: host.interval_seconds: expected a number, got "soon"'
    ]


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nlisen = "127.0.0.1:9464"\n')
    assert problems(path) == [f'{path}: server.lisen: unknown key, did you mean "listen"?']


def test_unknown_section_suggests_the_close_one(tmp_path: Path) -> None:
    path = write(tmp_path, '[sever]\nlisten = "127.0.0.1:9464"\n')
    assert problems(path) == [f'{path}: sever: unknown section, did you mean "server"?']


def test_unknown_env_variable_suggests_the_close_one() -> None:
    assert problems(None, {"SIDETRACE_SERVER__LISTN": "x"}) == [
        'environment SIDETRACE_SERVER__LISTN: unknown setting, did you mean "SIDETRACE_SERVER__LISTEN"?'
    ]


def test_every_problem_is_reported_once(tmp_path: Path) -> None:
    path = write(tmp_path, """
[agent]
log_level = "loud"
[host]
interval_seconds = -1
include_devices = ["(unclosed"]
max_devices = "many"
""")
    assert problems(path) == [
        f'{path}: agent.log_level: expected one of debug, info, warning, error, got "loud"',
        f"{path}: host.interval_seconds: expected a number greater than 0, got -1",
        f"{path}: host.include_devices: expected regular expressions, '(unclosed' does not compile: "
        f'missing ), unterminated subpattern at position 0, got ["(unclosed"]',
        f'{path}: host.max_devices: expected an integer, got "many"',
    ]


def test_max_processes_is_a_positive_integer_100_by_default(tmp_path: Path) -> None:
    assert load(None, {}).sources.netsample.max_processes == 100
    path = write(tmp_path, "[sources.netsample]\nenabled = true\nmax_processes = 0\n")
    assert problems(path) == [f"{path}: sources.netsample.max_processes: expected a number greater than 0, got 0"]
    path = write(tmp_path, "[sources.netsample]\nenabled = true\nmax_processes = 2.5\n")
    assert problems(path) == [f"{path}: sources.netsample.max_processes: expected an integer, got 2.5"]
    assert load(write(tmp_path, "[sources.netsample]\nmax_processes = 2\n"), {}).sources.netsample.max_processes == 2


def test_process_idle_seconds_is_positive_600_by_default(tmp_path: Path) -> None:
    assert load(None, {}).sources.netsample.process_idle_seconds == 600
    path = write(tmp_path, "[sources.netsample]\nenabled = true\nprocess_idle_seconds = 0\n")
    assert problems(path) == [
        f"{path}: sources.netsample.process_idle_seconds: expected a number greater than 0, got 0"]
    env = {"SIDETRACE_SOURCES__NETSAMPLE__PROCESS_IDLE_SECONDS": "30"}
    assert load(None, env).sources.netsample.process_idle_seconds == 30


def test_section_given_as_value(tmp_path: Path) -> None:
    path = write(tmp_path, 'server = "127.0.0.1:9464"\n')
    assert problems(path) == [f'{path}: server: expected a table [server], got "127.0.0.1:9464"']


def test_toml_syntax_error_has_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nlisten = "127.0.0.1:9464\n')
    (line,) = problems(path)
    assert line.startswith(f"{path}: TOML syntax error: ")
    assert "line 2" in line


def test_missing_file(tmp_path: Path) -> None:
    assert problems(tmp_path / "nope.toml") == [f"{tmp_path / 'nope.toml'}: file not found"]


def test_data_path_expands_home_and_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.setenv("STATE", "/srv/state")
    assert load(None, {}).data_path == Path("/home/someone/.local/state/sidetrace")
    assert load(None, {"SIDETRACE_AGENT__DATA_DIR": "$STATE/st"}).data_path == Path("/srv/state/st")


def test_check_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, '[server]\nlisten = "127.0.0.1:9464"\n')
    assert cli.main(["check-config", "--config", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: OK\n"
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nlisten = "9464"\n')
    assert cli.main(["check-config", "--config", str(bad)]) == 2
    assert capsys.readouterr().err == f'{bad}: server.listen: expected HOST:PORT, got "9464"\n'


def test_readme_documents_every_key_with_its_default() -> None:
    assert config.reference_markdown() in README.read_text(), (
        "README's configuration table differs from config.py; paste config.reference_markdown() into README"
    )


def test_exporter_mistakes_a_user_makes_are_refused_with_the_key(tmp_path: Path) -> None:
    path = tmp_path / "sidetrace.toml"
    path.write_text('[[exporters.loadbalancing]]\nbackends = ["127.0.0.1", "b:2", "nohost"]\n'
                    'dns_interval_seconds = 0.001\ntls.ca_file = "/etc/ssl/ca.pem"\n'
                    '[[exporters.remote_write]]\nurl = "http://mimir:9009/api/v1/push"\ninterval_seconds = 0.01\n'
                    'external_labels = { "bad-name" = "x", __meta = "y", cluster = "eu" }\ntls.ca_file = "/ca.pem"\n')
    with pytest.raises(ConfigError) as error:
        load(path, {})
    problems = [problem.split(": ", 1)[1] for problem in error.value.problems]
    assert problems == [
        'exporters.loadbalancing[0].backends: expected HOST:PORT entries, "127.0.0.1", "nohost" are not, '
        'got ["127.0.0.1", "b:2", "nohost"]',
        "exporters.loadbalancing[0].dns_interval_seconds: expected at least 0.1 (seconds), got 0.001",
        "exporters.remote_write[0].interval_seconds: expected at least 0.1 (seconds), got 0.01",
        "exporters.remote_write[0].external_labels: expected Prometheus label names ([a-zA-Z_][a-zA-Z0-9_]*, not "
        "starting with __), got 'bad-name', '__meta', "
        'got {"bad-name": "x", "__meta": "y", "cluster": "eu"}',
        "exporters.remote_write[0].tls: TLS files or options are set but the url is not https://, so the store "
        "would be reached in plain text; use an https:// url",
        "exporters.loadbalancing[0].tls: files or options are set but tls.enabled is false, so the backends would "
        "be reached in plain text; set tls.enabled = true, or remove them",
    ]
