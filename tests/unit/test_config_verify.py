"""`check-config` judges as `run` does: host checks (files, data_dir, ${VAR}s), schemes, cross-key limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidetrace import cli
from sidetrace.config import MAX_PROTOBUF_BYTES, ConfigError, expand_env, load
from tests.certificates import make_certificate
from tests.filesystems import needs_root, remount_read_only, tmpfs


def write(tmp_path: Path, text: str, data_dir: Path | None = None) -> Path:
    path = tmp_path / "sidetrace.toml"
    path.write_text(f'[agent]\ndata_dir = "{data_dir or tmp_path / "data"}"\n{text}')
    return path


def check_config_warnings(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """What `check-config` prints on stderr for ``path``, a config it must pass (exit 0, "OK")."""
    assert cli.main(["check-config", "--config", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{path}: OK\n"
    return captured.err


def problems(path: Path, env: dict[str, str] | None = None, verify: bool = True) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path, env or {}, verify=verify)
    return info.value.problems


# Every section that names TLS files, with the TOML that turns its TLS on and the key path of its table.
TLS_SECTIONS = {
    "server": ('[server.tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n', "server.tls"),
    "receiver": ('[receivers.otlp.tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n', "receivers.otlp.tls"),
    "otlp": ('[[exporters.otlp]]\nendpoint = "https://127.0.0.1:4317"\n'
             'tls = {{ ca_file = "{ca}", cert_file = "{cert}", key_file = "{key}" }}\n', "exporters.otlp[0].tls"),
    "loadbalancing": ('[[exporters.loadbalancing]]\nbackends = ["127.0.0.1:4317"]\n'
                      'tls = {{ enabled = true, ca_file = "{ca}", cert_file = "{cert}", key_file = "{key}" }}\n',
                      "exporters.loadbalancing[0].tls"),
    "remote_write": ('[[exporters.remote_write]]\nurl = "https://127.0.0.1:9090/api/v1/write"\n'
                     'tls = {{ ca_file = "{ca}", cert_file = "{cert}", key_file = "{key}" }}\n',
                     "exporters.remote_write[0].tls"),
}


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("certs"))


@pytest.mark.parametrize("section", TLS_SECTIONS)
def test_valid_tls_files_of_every_section_pass(tmp_path: Path, certificate: tuple[Path, Path], section: str) -> None:
    cert, key = certificate
    text, _ = TLS_SECTIONS[section]
    load(write(tmp_path, text.format(ca=cert, cert=cert, key=key)), {}, verify=True)


@pytest.mark.parametrize("section, missing", [(section, missing) for section, (text, _) in TLS_SECTIONS.items()
                                              for missing in ("ca", "cert", "key") if f"{{{missing}}}" in text])
def test_a_missing_tls_file_of_any_section_is_refused_naming_its_key(
    tmp_path: Path, certificate: tuple[Path, Path], section: str, missing: str
) -> None:
    cert, key = certificate
    text, table = TLS_SECTIONS[section]
    files = {"ca": cert, "cert": cert, "key": key, missing: tmp_path / "gone.pem"}
    path = write(tmp_path, text.format(**files))
    assert problems(path) == [f'{path}: {table}.{missing}_file: cannot read "{tmp_path / "gone.pem"}": '
                              "No such file or directory"]


def test_a_directory_as_a_certificate_is_refused(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    path = write(tmp_path, f'[server.tls]\ncert_file = "{tmp_path}"\nkey_file = "{certificate[1]}"\n')
    assert problems(path) == [f'{path}: server.tls.cert_file: cannot read "{tmp_path}": Is a directory']


def test_a_ca_file_without_a_certificate_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    path = write(tmp_path, '[[exporters.otlp]]\nendpoint = "https://127.0.0.1:4317"\n'
                           f'tls = {{ ca_file = "{garbage}" }}\n')
    (line,) = problems(path)
    assert line.startswith(f'{path}: exporters.otlp[0].tls.ca_file: "{garbage}" holds no PEM CA certificate: ')


def test_a_key_that_does_not_match_the_certificate_is_refused(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    _, other_key = make_certificate(tmp_path)
    path = write(tmp_path, f'[receivers.otlp.tls]\ncert_file = "{certificate[0]}"\nkey_file = "{other_key}"\n')
    (line,) = problems(path)
    assert line.startswith(f'{path}: receivers.otlp.tls.cert_file: "{certificate[0]}" with key_file "{other_key}" '
                           "is not a PEM certificate and its private key: ")


def test_tls_files_of_a_plain_http_exporter_are_not_read(tmp_path: Path) -> None:
    path = write(tmp_path, '[[exporters.otlp]]\nendpoint = "http://127.0.0.1:4317"\ntls = { ca_file = "/gone.pem" }\n')
    load(path, {}, verify=True)


def test_unreadable_nats_credentials_are_refused_when_the_source_is_enabled(tmp_path: Path) -> None:
    text = f'[sources.nats_trace]\nenabled = {{}}\ncredentials = "{tmp_path / "user.creds"}"\n'
    path = write(tmp_path, text.format("true"))
    assert problems(path) == [f'{path}: sources.nats_trace.credentials: cannot read "{tmp_path / "user.creds"}": '
                              "No such file or directory"]
    load(write(tmp_path, text.format("false")), {}, verify=True)


def test_data_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    path = write(tmp_path, "", data_dir=tmp_path / "state")
    assert problems(path) == [f"{path}: agent.data_dir: {tmp_path / 'state'} exists and is not a directory; point "
                              "agent.data_dir at a directory"]


def test_data_dir_under_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    path = write(tmp_path, "", data_dir=tmp_path / "state" / "a" / "b")
    assert problems(path) == [f"{path}: agent.data_dir: cannot create {tmp_path / 'state' / 'a' / 'b'}: "
                              f"{tmp_path / 'state'} is not a directory"]


def test_data_dir_that_can_be_created_passes_and_is_not_created(tmp_path: Path) -> None:
    load(write(tmp_path, "", data_dir=tmp_path / "a" / "b"), {}, verify=True)
    assert not (tmp_path / "a").exists()


@needs_root
def test_data_dir_on_a_read_only_filesystem_is_refused(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", 64) as mount:
        remount_read_only(mount)
        path = write(tmp_path, "", data_dir=mount / "state")
        assert problems(path) == [f"{path}: agent.data_dir: cannot create {mount / 'state'}: {mount} is not "
                                  "writable by uid 0; give the agent's user that directory or choose another"]


@pytest.mark.parametrize("table, key", [
    ('[[exporters.otlp]]\nheaders = {{ authorization = "Bearer {value}" }}\n',
     "exporters.otlp[0].headers.authorization"),
    ('[[exporters.loadbalancing]]\nbackends = ["127.0.0.1:4317"]\nheaders = {{ x-token = "{value}" }}\n',
     "exporters.loadbalancing[0].headers.x-token"),
    ('[[exporters.remote_write]]\nbearer_token = "{value}"\n', "exporters.remote_write[0].bearer_token"),
    ('[[exporters.remote_write]]\nbasic_auth_username = "u"\nbasic_auth_password = "{value}"\n',
     "exporters.remote_write[0].basic_auth_password"),
])
def test_an_unset_variable_in_a_header_or_credential_is_refused_naming_it(tmp_path: Path, table: str, key: str) -> None:
    path = write(tmp_path, table.format(value="${JAEGER_TOKEN}"))
    assert problems(path, {}) == [f"{path}: {key}: ${{JAEGER_TOKEN}} is not set in the agent's environment; set it "
                                  "(systemd: Environment= or EnvironmentFile=) or take it out of the value"]
    load(path, {"JAEGER_TOKEN": "s3cret"}, verify=True)


def test_expand_env_reads_only_braced_names() -> None:
    env = {"TOKEN": "abc"}
    assert expand_env("Bearer ${TOKEN}; pa$word $TOKEN", env) == "Bearer abc; pa$word $TOKEN"
    with pytest.raises(ValueError, match=r"^\$\{MISSING\} is not set"):
        expand_env("${TOKEN}${MISSING}", env)


@pytest.mark.parametrize("table, key", [
    ('[[exporters.otlp]]\nendpoint = "ftp://x"\n', "exporters.otlp[0].endpoint"),
    ('[[exporters.remote_write]]\nurl = "ftp://x"\n', "exporters.remote_write[0].url"),
])
def test_an_endpoint_of_another_scheme_is_refused_as_such(tmp_path: Path, table: str, key: str) -> None:
    path = write(tmp_path, table)
    assert problems(path, verify=False) == [
        f'{path}: {key}: expected http:// or https://, the ftp:// scheme is not supported, got "ftp://x"']


def test_a_nats_url_of_another_scheme_is_refused_as_such(tmp_path: Path) -> None:
    path = write(tmp_path, '[sources.nats_trace]\nservers = ["nats://a:4222", "http://b:4222"]\n')
    assert problems(path, verify=False) == [
        f"{path}: sources.nats_trace.servers: expected nats:// or tls:// or ws:// or wss://, the http:// scheme is "
        'not supported (in "http://b:4222"), got ["nats://a:4222", "http://b:4222"]']


def test_max_pending_bytes_below_the_largest_request_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "[spool]\nmax_pending_bytes = 1000\n[receivers.otlp]\nmax_request_bytes = 1001\n")
    assert problems(path, verify=False) == [
        f"{path}: spool.max_pending_bytes: expected at least receivers.otlp.max_request_bytes (1001), or every "
        "request that large is refused forever; got 1000"]
    load(write(tmp_path, "[spool]\nmax_pending_bytes = 1000\n[receivers.otlp]\nenabled = false\n"
                         "max_request_bytes = 1001\n"), {})


@pytest.mark.parametrize("kind, extra, protocol", [("otlp", "", "OTLP"),
                                                   ("loadbalancing", 'backends = ["a:4317"]\n', "OTLP"),
                                                   ("remote_write", "", "remote-write")])
def test_an_exporter_request_larger_than_protobuf_allows_is_refused(
    tmp_path: Path, kind: str, extra: str, protocol: str
) -> None:
    path = write(tmp_path, f"[[exporters.{kind}]]\n{extra}max_request_bytes = {MAX_PROTOBUF_BYTES + 1}\n")
    assert problems(path, verify=False) == [
        f"{path}: exporters.{kind}[0].max_request_bytes: expected at most {MAX_PROTOBUF_BYTES} (the largest protobuf "
        f"message, and so {protocol} request), got {MAX_PROTOBUF_BYTES + 1}"]


def test_an_unknown_exporter_variable_says_arrays_have_none() -> None:
    with pytest.raises(ConfigError) as info:
        load(None, {"SIDETRACE_EXPORTERS__OTLP__ENDPOINT": "http://x:4317"})
    assert info.value.problems == [
        "environment SIDETRACE_EXPORTERS__OTLP__ENDPOINT: [[exporters.otlp]] is an array of tables, whose keys have "
        "no environment variables; set them in the config file (a header or credential value can read a variable "
        "with ${VAR})"]


def test_an_unknown_variable_is_matched_only_within_its_own_section() -> None:
    with pytest.raises(ConfigError) as info:
        load(None, {"SIDETRACE_SPOOL__ENABLED": "true"})
    assert info.value.problems == [
        "environment SIDETRACE_SPOOL__ENABLED: unknown setting (known: SIDETRACE_SPOOL__MAX_BYTES, "
        "SIDETRACE_SPOOL__MAX_PENDING_BYTES, SIDETRACE_SPOOL__SYNC)"]


def test_check_config_names_a_disabled_section_with_keys_in_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, '[sources.netsample]\ninterfaces = ["eth0"]\nmax_flows = 10\n'
                           '[host]\nenabled = false\ninterval_seconds = 5\n')
    assert check_config_warnings(path, capsys) == (
        f"warning: {path}: host: enabled = false, so interval_seconds has no effect; set enabled = true to use it, "
        "or remove it\n"
        f"warning: {path}: sources.netsample: enabled = false, so interfaces, max_flows have no effect; set enabled "
        "= true to use them, or remove them\n")


def test_check_config_refuses_what_run_needs_from_the_host(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_TOKEN", raising=False)
    path = write(tmp_path, '[[exporters.otlp]]\nheaders = { authorization = "${NO_SUCH_TOKEN}" }\n')
    assert cli.main(["check-config", "--config", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"{path}: exporters.otlp[0].headers.authorization: ${{NO_SUCH_TOKEN}} is not set in the agent's environment; "
        "set it (systemd: Environment= or EnvironmentFile=) or take it out of the value\n")


@pytest.mark.parametrize("server", ["localhost:53", "dns.example:53", "[fe80::zz]:53", "::1:53"])
def test_a_dns_server_that_is_not_an_ip_address_is_refused_in_one_line(tmp_path: Path, server: str) -> None:
    path = write(tmp_path, f'[[exporters.loadbalancing]]\ndns = "collectors.example:4317"\ndns_server = "{server}"\n')
    assert problems(path) == [
        f'{path}: exporters.loadbalancing[0].dns_server: expected IP:PORT, an IPv4 address or an IPv6 one in '
        f'brackets with a port (127.0.0.1:53, [::1]:53): the DNS server is asked by address, not by name, got '
        f'"{server}"']


@pytest.mark.parametrize("server", ["127.0.0.1:5353", "[::1]:53"])
def test_a_dns_server_given_as_an_ip_address_passes(tmp_path: Path, server: str) -> None:
    path = write(tmp_path, f'[[exporters.loadbalancing]]\ndns = "collectors.example:4317"\ndns_server = "{server}"\n')
    assert load(path, {}, verify=True).exporters.loadbalancing[0].dns_server == server


def test_check_config_warns_of_a_dns_server_given_with_static_backends(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '[[exporters.loadbalancing]]\nbackends = ["127.0.0.1:4317"]\ndns_server = "127.0.0.1:53"\n')
    assert check_config_warnings(path, capsys) == (
        f"warning: {path}: exporters.loadbalancing[0].dns_server: set without dns, so it has no effect (static "
        "backends are not resolved); remove it, or set dns\n")


def test_check_config_refuses_a_capture_filter_the_sampler_cannot_compile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, '[sources.netsample]\nenabled = true\ninterfaces = ["lo"]\nfilter = "port 99999"\n')
    assert cli.main(["check-config", "--config", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"{path}: [sources.netsample] filter: capture filter 'port 99999' does not compile: Failed to compile filter "
        "expression 'port 99999' (illegal port number 99999 > 65535)\n")
    good = write(tmp_path, '[sources.netsample]\nenabled = true\ninterfaces = ["lo"]\nfilter = "udp port 53"\n')
    assert cli.main(["check-config", "--config", str(good)]) == 0


@pytest.mark.parametrize("data_dir, why", [
    ("/proc/sidetrace", "cannot create /proc/sidetrace: No such file or directory"),
    ("/sys/sidetrace", "cannot create /sys/sidetrace: Operation not permitted"),
])
def test_data_dir_the_kernel_refuses_to_create_is_refused_as_run_refuses_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], data_dir: str, why: str) -> None:
    path = write(tmp_path, "", data_dir=Path(data_dir))
    assert problems(path) == [f"{path}: agent.data_dir: {why}"]
    assert cli.main(["run", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"{path}: agent.data_dir: {why}\n"


def test_data_dir_held_by_a_running_agent_is_refused_naming_its_pid(tmp_path: Path) -> None:
    import fcntl
    import os
    import subprocess
    import sys
    (tmp_path / "data").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(tmp_path / 'data' / 'sidetrace.lock')!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, f'{os.getpid()}\\n'.encode())\n"
        "print('held', flush=True)\nsys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        path = write(tmp_path, "")
        assert problems(path) == [f"{path}: agent.data_dir: {tmp_path / 'data'} is in use by another sidetrace agent "
                                  f"(pid {holder.pid}); give each agent its own agent.data_dir"]
    finally:
        holder.stdin.close()
        holder.wait(10)
    load(path, {}, verify=True)  # the lock is free again, and the check took none that stays
    fd = os.open(tmp_path / "data" / "sidetrace.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(fd)


@pytest.mark.parametrize("data_dir, why", [
    ("~nosuchuser/x", '"~nosuchuser" names no user of this host; use an absolute path'),
    ("$NOPE_DIR/x", "$NOPE_DIR is not set in the agent's environment; set it (systemd: Environment= or "
                    "EnvironmentFile=) or take it out of the value"),
    ("${NOPE_DIR}/x", "$NOPE_DIR is not set in the agent's environment; set it (systemd: Environment= or "
                      "EnvironmentFile=) or take it out of the value"),
    ("", 'expected a directory (an empty value would put the lock and the spool in whatever directory the agent '
         'was started in), got ""'),
])
def test_a_data_dir_that_does_not_expand_is_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        data_dir: str, why: str) -> None:
    monkeypatch.delenv("NOPE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "sidetrace.toml"
    path.write_text(f'[agent]\ndata_dir = "{data_dir}"\n')
    assert problems(path) == [f"{path}: agent.data_dir: {why}"]
    for command in ("check-config", "run"):
        assert cli.main([command, "--config", str(path)]) == 2
        assert capsys.readouterr().err == f"{path}: agent.data_dir: {why}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sidetrace.toml"]  # no "$NOPE_DIR", no lock in the cwd


def test_data_dir_is_expanded_with_the_variables_and_home_given() -> None:
    from sidetrace.config import resolve_data_dir
    assert resolve_data_dir("$A/${B}/c", {"A": "/x", "B": "y"}) == Path("/x/y/c")
    assert resolve_data_dir("~/s", {"HOME": "/home/h/"}) == Path("/home/h/s")
    assert resolve_data_dir("~root/s", {}) == Path("/root/s")


@needs_root
def test_the_default_data_dir_without_a_home_is_refused_in_one_line() -> None:
    import subprocess
    import sys
    env = {"PATH": "/usr/bin:/bin"}  # no HOME, and uid 54321 has no passwd entry
    result = subprocess.run(["setpriv", "--reuid=54321", "--regid=54321", "--clear-groups", sys.executable, "-m",
                             "sidetrace", "check-config"], env=env, capture_output=True, text=True, cwd="/")
    assert (result.returncode, result.stderr) == (2, 'defaults: agent.data_dir: "~" has no home directory to stand '
                                                     "for: HOME is not set and uid 54321 has no passwd entry; use an "
                                                     "absolute path\n")


@pytest.mark.parametrize("table, key", [
    ('[[exporters.otlp]]\nendpoint = "http://127.0.0.1:{port}"\n', "exporters.otlp[0].endpoint"),
    ('[[exporters.otlp]]\nendpoint = "https://[::1]:{port}/"\n', "exporters.otlp[0].endpoint"),
    ('[[exporters.remote_write]]\nurl = "http://127.0.0.1:{port}/api/v1/write"\n', "exporters.remote_write[0].url"),
    ('[sources.nats_trace]\nservers = ["nats://u:p@127.0.0.1:{port}"]\n', "sources.nats_trace.servers"),
    ('[[exporters.loadbalancing]]\nbackends = ["127.0.0.1:{port}"]\n', "exporters.loadbalancing[0].backends"),
    ('[server]\nlisten = "127.0.0.1:{port}"\n', "server.listen"),
])
@pytest.mark.parametrize("port", ["99999", "65536", "0", "x"])
def test_a_port_outside_1_to_65535_is_refused_wherever_an_address_is_taken(
        tmp_path: Path, table: str, key: str, port: str) -> None:
    lines = problems(write(tmp_path, table.format(port=port)), verify=False)
    assert len(lines) == 1 and f": {key}: " in lines[0] and ("65535" in lines[0] or "HOST:PORT" in lines[0]), lines


def test_a_url_port_in_range_or_absent_passes(tmp_path: Path) -> None:
    load(write(tmp_path, '[[exporters.otlp]]\nendpoint = "http://jaeger"\n[[exporters.remote_write]]\n'
                         'url = "https://127.0.0.1:65535/api/v1/write"\n[sources.nats_trace]\n'
                         'servers = ["nats://u:p@127.0.0.1:1", "tls://[::1]:4222"]\n'), {})


# Each expectation is what `run` does on Linux (checked against dry starts): the HTTP listeners (asyncio) make "::"
# IPv6-only, gRPC makes it dual-stack; "localhost" resolves to 127.0.0.1 here (/etc/hosts).
@pytest.mark.parametrize("server, receiver, overlap", [
    ("127.0.0.1:19317", "grpc 127.0.0.1:19317", True),
    ("0.0.0.0:19317", "grpc 127.0.0.1:19317", True),
    ("127.0.0.1:19317", "grpc [::]:19317", True),
    ("[::]:19317", "grpc 127.0.0.1:19317", False),
    ("[::]:19317", "http 0.0.0.0:19317", False),
    ("[::]:19317", "http [::1]:19317", True),
    ("[::1]:19317", "grpc 0.0.0.0:19317", False),
    ("[::1]:19317", "grpc [::]:19317", True),
    ("127.0.0.1:19317", "http 127.0.0.2:19317", False),
    ("127.0.0.1:19317", "grpc 127.0.0.1:19318", False),
    ("localhost:19317", "http 0.0.0.0:19317", True),
    ("127.0.0.1:19317", "grpc localhost:19317", True),
])
def test_two_listeners_on_one_port_and_overlapping_addresses_are_refused_naming_both_keys(
        tmp_path: Path, server: str, receiver: str, overlap: bool) -> None:
    kind, receiver = receiver.split(" ")
    other = "http" if kind == "grpc" else "grpc"
    path = write(tmp_path, f'[server]\nlisten = "{server}"\n[receivers.otlp]\n{kind}_listen = "{receiver}"\n'
                           f'{other}_listen = ""\n')
    if not overlap:
        load(path, {})
        return
    port = server.rsplit(":", 1)[1]
    assert problems(path, verify=False) == [
        f'{path}: receivers.otlp.{kind}_listen: "{receiver}" takes port {port} that server.listen ("{server}") '
        "already listens on; give each listener its own port"]


def test_a_disabled_receiver_may_share_the_server_port(tmp_path: Path) -> None:
    load(write(tmp_path, '[server]\nlisten = "127.0.0.1:19317"\n[receivers.otlp]\nenabled = false\n'
                         'grpc_listen = "127.0.0.1:19317"\n'), {})


def test_problems_an_environment_override_causes_name_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    env = {"SIDETRACE_SERVER__LISTEN": "127.0.0.1:19317", "SIDETRACE_RECEIVERS__OTLP__GRPC_LISTEN": "127.0.0.1:19317",
           "SIDETRACE_SPOOL__MAX_PENDING_BYTES": "10"}
    assert [line.split(": ", 2)[:2] for line in problems(path, env, verify=False)] == [
        ["environment SIDETRACE_SPOOL__MAX_PENDING_BYTES", "spool.max_pending_bytes"],
        ["environment SIDETRACE_RECEIVERS__OTLP__GRPC_LISTEN", "receivers.otlp.grpc_listen"]]
    env = {"SIDETRACE_SERVER__TLS__CERT_FILE": str(tmp_path / "c.pem"),
           "SIDETRACE_SERVER__TLS__KEY_FILE": str(tmp_path / "k.pem")}
    assert [line.split(": ", 2)[:2] for line in problems(path, env)] == [
        ["environment SIDETRACE_SERVER__TLS__CERT_FILE", "server.tls.cert_file"],
        ["environment SIDETRACE_SERVER__TLS__KEY_FILE", "server.tls.key_file"]]


def test_check_config_warns_of_more_top_flows_than_max_flows_naming_both(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '[sources.netsample]\nenabled = true\nmax_flows = 10\ntop_flows = 50\n')
    assert check_config_warnings(path, capsys) == (
        f"warning: {path}: sources.netsample.top_flows: 50 is more than sources.netsample.max_flows (10), so at most "
        "10 flows get their own series; lower top_flows to max_flows or less, or raise max_flows\n")


def test_check_config_warns_of_more_spans_per_trace_than_spans_naming_the_variable(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDETRACE_RECENT_TRACES__MAX_SPANS_PER_TRACE", "2000")
    path = write(tmp_path, "[recent_traces]\nmax_spans = 500\n")
    assert check_config_warnings(path, capsys) == (
        "warning: environment SIDETRACE_RECENT_TRACES__MAX_SPANS_PER_TRACE: recent_traces.max_spans_per_trace: 2000 "
        "is more than recent_traces.max_spans (500), so no trace shows more than 500 spans, and a trace cut this way "
        "does not say it lost any; lower max_spans_per_trace to max_spans or less, or raise max_spans\n")


def test_bounds_that_are_equal_are_not_warned_of(tmp_path: Path) -> None:
    warnings: list[str] = []
    load(write(tmp_path, '[sources.netsample]\nenabled = true\nmax_flows = 20\ntop_flows = 20\n'
                         "[recent_traces]\nmax_spans = 1000\nmax_spans_per_trace = 1000\n"), {}, verify=True,
         warnings=warnings)
    assert warnings == []


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_an_exporter_endpoint_without_a_scheme_is_taken_as_plain_text_and_warned_of_offering_both(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], protocol: str) -> None:
    # Warned, not refused: earlier versions took it as plain text, and a config that ran must still start.
    path = write(tmp_path, f'[[exporters.otlp]]\nendpoint = "localhost:4317"\nprotocol = "{protocol}"\n')
    err = check_config_warnings(path, capsys)
    usual = {"grpc": "take it as TLS", "http": "expect a URL with its scheme"}[protocol]  # gRPC's is TLS
    assert err == (
        f'warning: {path}: exporters.otlp[0].endpoint: "localhost:4317" has no scheme and is taken as '
        f"http://localhost:4317 (plain text, as earlier versions did), where the OpenTelemetry Collector and SDKs "
        f"{usual}; write http://localhost:4317 or https://localhost:4317\n")
    warnings: list[str] = []
    load(write(tmp_path, '[[exporters.otlp]]\nendpoint = "http://localhost:4317"\n'), {}, verify=True,
         warnings=warnings)
    assert warnings == []


@pytest.mark.parametrize("name", ["SIDETRACE_BOGUS__X", "SIDETRACE_XYZZY__ENABLED"])
def test_an_unknown_section_variable_gets_no_far_off_suggestion_but_the_sections(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(None, {name: "1"})
    section = name.removeprefix("SIDETRACE_").split("__")[0]
    assert info.value.problems == [
        f"environment {name}: unknown setting: no section {section} (sections: AGENT, SERVER, HOST, SOURCES, "
        "RECEIVERS, SPOOL, EXPORTERS, PROCESSORS, RECENT_TRACES, APP_METRICS)"]


@pytest.mark.parametrize("name, meant", [
    ("SIDETRACE_SERVR__LISTEN", "SIDETRACE_SERVER__LISTEN"),
    ("SIDETRACE_SOURCES__NETSAMPL__TOP_FLOWS", "SIDETRACE_SOURCES__NETSAMPLE__TOP_FLOWS"),
    ("SIDETRACE_PROCESSORS__SPANMETRICS__ENABLED", "SIDETRACE_PROCESSORS__SPAN_METRICS__ENABLED"),
])
def test_a_variable_close_at_every_level_is_suggested(name: str, meant: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(None, {name: "1"})
    assert info.value.problems == [f'environment {name}: unknown setting, did you mean "{meant}"?']


def test_an_unknown_subsection_variable_lists_the_subsections() -> None:
    with pytest.raises(ConfigError) as info:
        load(None, {"SIDETRACE_SOURCES__BOGUS__ENABLED": "true", "SIDETRACE_EXPORTERS__BOGUS": "x"})
    assert info.value.problems == [
        "environment SIDETRACE_EXPORTERS__BOGUS: [[exporters.otlp]], [[exporters.loadbalancing]], "
        "[[exporters.remote_write]] are arrays of tables, whose keys have no environment variables; set them in the "
        "config file (a header or credential value can read a variable with ${VAR})",
        "environment SIDETRACE_SOURCES__BOGUS__ENABLED: unknown setting (known: SIDETRACE_SOURCES__NATS_TRACE__*, "
        "SIDETRACE_SOURCES__NETSAMPLE__*)"]


def test_a_variable_without_a_double_underscore_is_warned_of_with_the_setting_it_likely_meant(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIDETRACE_SERVER_LISTEN", "127.0.0.1:9500")
    monkeypatch.setenv("SIDETRACE_LOG_LEVEL", "debug")
    monkeypatch.setenv("SIDETRACE_FROB", "1")
    monkeypatch.setenv("SIDETRACE_CONFIG", str(tmp_path / "x.toml"))  # the CLI's, and the apps': not settings
    monkeypatch.setenv("SIDETRACE_AGENT_ENDPOINT", "http://127.0.0.1:4317")
    path = write(tmp_path, "")
    assert cli.main(["check-config", "--config", str(path)]) == 0
    assert capsys.readouterr().err == (
        'warning: environment SIDETRACE_FROB: ignored, not a setting (no "__" between section and key); a '
        "setting's variable is SIDETRACE_<SECTION>__<KEY>, with two underscores between the parts\n"
        'warning: environment SIDETRACE_LOG_LEVEL: ignored, not a setting (no "__" between section and key); did '
        "you mean SIDETRACE_AGENT__LOG_LEVEL?\n"
        'warning: environment SIDETRACE_SERVER_LISTEN: ignored, not a setting (no "__" between section and key); '
        "did you mean SIDETRACE_SERVER__LISTEN?\n")


@pytest.mark.parametrize("endpoint", ["http://collector:4317", "collector:4317"])
def test_tls_settings_on_a_plain_text_otlp_endpoint_are_warned_of(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], endpoint: str) -> None:
    # Warned, not refused (unlike loadbalancing's tls.* without tls.enabled): such a config started before.
    path = write(tmp_path, f'[[exporters.otlp]]\nendpoint = "{endpoint}"\n[exporters.otlp.tls]\n'
                           "insecure_skip_verify = true\n")
    assert cli.main(["check-config", "--config", str(path)]) == 0
    assert capsys.readouterr().err.splitlines()[-1] == (
        f'warning: {path}: exporters.otlp[0].tls: files or options are set but the endpoint "{endpoint}" is not '
        "https://, so they are not used and the backend is reached in plain text; write the endpoint with https://, "
        "or remove them")
    warnings: list[str] = []
    load(write(tmp_path, '[[exporters.otlp]]\nendpoint = "https://collector:4317"\n[exporters.otlp.tls]\n'
                         "insecure_skip_verify = true\n"), {}, verify=True, warnings=warnings)
    assert warnings == []
