"""The operator's commands against a real agent: where they find it, its token, and what their exit codes say."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.certificates import make_certificate, make_signed_certificate
from tests.conftest import Agent, free_port, http_get, wait_until

EXIT_UNREACHABLE, EXIT_NOT_READY, EXIT_UNAUTHORIZED = 1, 3, 4


def sidetrace(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIDETRACE_")}
    return subprocess.run([sys.executable, "-m", "sidetrace", *args], capture_output=True, text=True, timeout=30,
                          env={**clean, **(env or {})})


def with_server_token(agent: Agent, token: str) -> Agent:
    """``agent`` with [server] auth_token set in its config file."""
    agent.config_path.write_text(agent.config_path.read_text().replace("[server]\n",
                                                                        f'[server]\nauth_token = "{token}"\n'))
    return agent


def test_status_and_traces_take_the_url_and_token_from_the_config(agent_factory: Callable[..., Agent]) -> None:
    agent = with_server_token(agent_factory(), "s3cret").start()
    done = sidetrace("status", "--config", str(agent.config_path), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ready"] is True
    done = sidetrace("traces", "--config", str(agent.config_path))
    assert (done.returncode, done.stdout) == (0, "no recent traces match\n")


def test_a_refused_token_exits_4_and_says_what_to_do(agent_factory: Callable[..., Agent]) -> None:
    agent = with_server_token(agent_factory(), "t").start()
    missing = sidetrace("status", "--url", agent.url)
    assert (missing.returncode, missing.stderr) == (EXIT_UNAUTHORIZED, (
        f"{agent.url}/debug/status: HTTP 401: the agent wants a token; pass --token, or --config with the agent's "
        "config file (its [server] auth_token)\n"))
    wrong = sidetrace("traces", "--url", agent.url, "--token", "nope")
    assert wrong.returncode == EXIT_UNAUTHORIZED
    assert wrong.stderr.startswith(f"{agent.url}/debug/traces?limit=5: HTTP 401: the agent refused the token; ")
    assert sidetrace("status", "--url", agent.url, "--token", "t").returncode == 0


def test_url_may_be_host_and_port(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory().start()
    done = sidetrace("status", "--url", f"127.0.0.1:{agent.port}")
    assert done.returncode == 0, done.stderr


def test_an_unreachable_agent_exits_1() -> None:
    port = free_port()
    done = sidetrace("flows", "--once", "--url", f"127.0.0.1:{port}")
    assert done.returncode == EXIT_UNREACHABLE
    assert done.stderr.startswith(f"cannot reach the agent at http://127.0.0.1:{port}/debug/flows?top=20: ")


@pytest.mark.skipif(os.geteuid() != 0, reason="opening AF_PACKET sockets needs root (CI runs as root)")
def test_netsample_with_its_only_interface_failing_makes_the_agent_not_ready(
    agent_factory: Callable[..., Agent]
) -> None:
    agent = agent_factory('[sources.netsample]\nenabled = true\ninterfaces = ["stnoexist0"]\n')
    agent.start(wait_ready=False)
    agent.wait_started()
    assert http_get(agent.url + "/readyz") == (503, "not ready: netsample failing\n")
    done = sidetrace("status", "--url", agent.url)
    assert done.returncode == EXIT_NOT_READY
    assert "netsample" in done.stdout and "failing" in done.stdout


def test_a_grpc_port_in_use_names_the_key_and_address_and_nothing_from_grpc(
    agent_factory: Callable[..., Agent]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        agent = agent_factory()
        agent.grpc_port = port
        agent.write_config()
        agent.start(wait_ready=False)
        assert agent.proc.wait(20) == 1
    errors = [line for line in agent.log().splitlines() if " INFO " not in line and " DEBUG " not in line]
    assert errors == [line for line in errors if "ERROR sidetrace.daemon: otlp failed to start: "
                      f"receivers.otlp.grpc_listen: cannot listen on 127.0.0.1:{port}: Address already in use; "
                      "stopping" in line]
    assert len(errors) == 1


def test_json_logs_are_one_object_per_line_with_structured_fields(agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory()
    agent.config_path.write_text(agent.config_path.read_text().replace('log_level = "debug"\n',
                                                                        'log_level = "debug"\nlog_format = "json"\n'))
    agent.start()
    agent.stop()
    lines = [json.loads(line) for line in agent.log().splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    ready = next(line for line in lines if line["message"].startswith("sidetrace 0.1.0 ready: "))
    assert (ready["level"], ready["logger"], ready["version"]) == ("info", "sidetrace.daemon", "0.1.0")
    assert ready["components"] == ["server", "host", "app_metrics", "pipeline", "otlp"]


def test_status_from_a_config_listening_on_the_ipv6_wildcard_asks_the_ipv6_loopback(
        agent_factory: Callable[..., Agent]) -> None:
    agent = agent_factory()
    agent.write_config(listen=f"[::]:{agent.port}")  # asyncio makes "::" an IPv6-only socket: 127.0.0.1 is refused
    agent.start(wait_ready=False)
    wait_until(lambda: agent.alive() and http_get(f"http://[::1]:{agent.port}/readyz", 1)[0] == 200, 20,
               "agent ready on [::1]")
    done = sidetrace("status", "--config", str(agent.config_path))
    assert done.returncode == 0, done.stderr


def test_the_debug_token_scheme_is_case_insensitive(agent_factory: Callable[..., Agent]) -> None:
    agent = with_server_token(agent_factory(), "s3cret").start()
    for scheme in ("Bearer", "bearer", "BEARER"):
        request = urllib.request.Request(agent.url + "/debug/status", headers={"Authorization": f"{scheme} s3cret"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
    for header in ("bearer s3cre", "Basic s3cret", "s3cret", "bearers3cret"):
        request = urllib.request.Request(agent.url + "/debug/status", headers={"Authorization": header})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=5)
        assert info.value.code == 401, header


def test_status_verifies_a_tls_agent_with_cacert_or_not_at_all_with_insecure(
    agent_factory: Callable[..., Agent], tmp_path: Path
) -> None:
    ca, cert, key = make_signed_certificate(tmp_path)
    agent = agent_factory(f'[server.tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n').start(wait_ready=False)
    url = f"https://127.0.0.1:{agent.port}"
    wait_until(lambda: sidetrace("status", "--url", url, "--cacert", str(ca)).returncode == 0, 20,
               "the TLS agent ready through --cacert")
    untrusted = sidetrace("status", "--url", url)
    assert (untrusted.returncode, untrusted.stderr) == (EXIT_UNREACHABLE, (
        f"{url}/debug/status: the agent's certificate is not trusted here (unable to get local issuer certificate); "
        "pass --cacert with the CA that signed it (the certificate itself when self-signed), --config with the "
        "agent's config file, or --insecure\n"))
    # The config's own certificate is not self-signed here, so --config alone cannot stand for its CA: not offered
    # again, and a --cacert that does not hold the CA is named.
    by_config = sidetrace("status", "--config", str(agent.config_path), "--cacert", str(cert))
    assert (by_config.returncode, by_config.stderr) == (EXIT_UNREACHABLE, (
        f"{url}/debug/status: the agent's certificate is not trusted here (unable to get local issuer certificate); "
        f"pass --cacert with the CA that signed it ({cert} does not hold it), or "
        "--insecure\n"))
    assert sidetrace("status", "--config", str(agent.config_path)).returncode == EXIT_UNREACHABLE
    by_name = sidetrace("status", "--url", f"https://localhost:{agent.port}", "--cacert", str(ca))
    assert (by_name.returncode, by_name.stderr) == (EXIT_UNREACHABLE, (
        f"https://localhost:{agent.port}/debug/status: the agent's certificate does not hold the name asked for "
        "(Hostname mismatch, certificate is not valid for 'localhost'.); ask it by a name or address its certificate "
        "holds (--url), or pass --insecure\n"))
    plain = sidetrace("status", "--url", f"http://127.0.0.1:{agent.port}")
    assert plain.returncode == EXIT_UNREACHABLE
    assert plain.stderr.endswith(f"(if it serves https, as with [server.tls], ask https://127.0.0.1:{agent.port})\n")
    assert sidetrace("status", "--config", str(agent.config_path), "--cacert", str(ca)).returncode == 0
    insecure = sidetrace("traces", "--url", url, "--insecure")
    assert (insecure.returncode, insecure.stdout) == (0, "no recent traces match\n"), insecure.stderr


def test_cacert_and_insecure_are_refused_where_they_cannot_apply(tmp_path: Path) -> None:
    plain = sidetrace("status", "--url", "127.0.0.1:9", "--insecure")
    assert (plain.returncode, plain.stderr) == (2, (
        "--insecure: the agent is asked over plain http:// here, so there is no certificate to verify; give an "
        "https:// --url, or leave the option out\n"))
    missing = sidetrace("flows", "--once", "--url", "https://127.0.0.1:9", "--cacert", str(tmp_path / "nope.pem"))
    assert (missing.returncode, missing.stderr) == (2, f"--cacert {tmp_path / 'nope.pem'}: cannot read: No such file "
                                                       "or directory\n")
    (tmp_path / "empty.pem").write_text("not a certificate\n")
    empty = sidetrace("status", "--url", "https://127.0.0.1:9", "--cacert", str(tmp_path / "empty.pem"))
    assert empty.returncode == 2
    assert empty.stderr.startswith(f"--cacert {tmp_path / 'empty.pem'}: holds no PEM CA certificate: ")
    both = sidetrace("status", "--url", "https://127.0.0.1:9", "--cacert", "x", "--insecure")
    assert both.returncode == 2
    assert "--insecure: not allowed with argument --cacert" in both.stderr


def check_config_under_etc_overlay(upper: Path, *commands: str) -> subprocess.CompletedProcess[str]:
    """`sidetrace check-config --config /etc/sidetrace/sidetrace.toml` as root in a mount namespace of its own, where
    /etc is this host's with ``upper`` laid over it (what the test put there, and ``commands``' changes, stay in
    ``upper``): the unit's own config path and drop-in directory, without touching this host's /etc."""
    work = upper.parent / f"{upper.name}-work"
    upper.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    script = " && ".join([f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc",
                          *commands, f"exec {sys.executable} -m sidetrace check-config --config "
                          "/etc/sidetrace/sidetrace.toml"])
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIDETRACE_")}
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60, env=clean)


@pytest.mark.skipif(os.geteuid() != 0, reason="check-config judges for the service's user only when run as root")
def test_check_config_as_root_warns_of_files_the_service_user_cannot_read(tmp_path: Path) -> None:
    upper = tmp_path / "etc"
    (upper / "sidetrace").mkdir(parents=True)
    cert, key = make_certificate(upper / "sidetrace")  # written as /etc/sidetrace/cert.pem and key.pem
    key.chmod(0o600)
    cert.chmod(0o644)
    config = upper / "sidetrace/sidetrace.toml"
    config.write_text(f'[agent]\ndata_dir = "{tmp_path / "data"}"\n[server.tls]\ncert_file = '
                      '"/etc/sidetrace/cert.pem"\nkey_file = "/etc/sidetrace/key.pem"\n')
    config.chmod(0o644)
    advice = ("; give the service read access (a group it joins by SupplementaryGroups= in a drop-in, `systemctl "
              "edit sidetrace`), or the unit's check-config will refuse it\n")
    done = check_config_under_etc_overlay(upper)
    assert (done.returncode, done.stdout) == (0, "/etc/sidetrace/sidetrace.toml: OK\n"), done.stderr
    assert done.stderr == (
        'warning: /etc/sidetrace/sidetrace.toml: server.tls.key_file: "/etc/sidetrace/key.pem" can be read by root '
        f"but not by the service's dynamic user (uid 61184): Permission denied (0600 root:root){advice}")

    # The fix the warning offers: a group for the key, which a drop-in gives the service.
    drop_in = upper / "systemd/system/sidetrace.service.d/tls.conf"
    drop_in.parent.mkdir(parents=True)
    drop_in.write_text("[Service]\nSupplementaryGroups=sidetrace-tls\n")
    done = check_config_under_etc_overlay(upper, "groupadd --system sidetrace-tls",
                                          "chgrp sidetrace-tls /etc/sidetrace/key.pem",
                                          "chmod 0640 /etc/sidetrace/key.pem")
    assert (done.returncode, done.stderr) == (0, "")
    # Read as systemd reads drop-ins: in name order, an empty value taking back the groups set before it.
    reset = drop_in.with_name("zz-reset.conf")
    reset.write_text("[Service]\nSupplementaryGroups=\n")
    done = check_config_under_etc_overlay(upper)
    assert done.stderr.startswith('warning: /etc/sidetrace/sidetrace.toml: server.tls.key_file: "/etc/sidetrace/'
                                  "key.pem\" can be read by root but not by the service's dynamic user (uid 61184): "
                                  "Permission denied (0640 root:sidetrace-tls)")
    reset.unlink()

    # The config file itself, and a file the unit hides from the service however readable.
    config.chmod(0o600)
    outside, _ = make_certificate(tmp_path)
    outside.chmod(0o644)
    config.write_text(config.read_text() + f'[[exporters.otlp]]\nendpoint = "https://127.0.0.1:4317"\n'
                                           f'tls = {{ ca_file = "{outside}" }}\n')
    done = check_config_under_etc_overlay(upper)
    assert done.returncode == 0
    assert done.stderr == (
        "warning: /etc/sidetrace/sidetrace.toml: this file can be read by root but not by the service's dynamic user "
        f"(uid 61184): Permission denied (0600 root:root){advice}"
        f'warning: /etc/sidetrace/sidetrace.toml: exporters.otlp[0].tls.ca_file: "{outside}" is out of the service\'s '
        "sight: PrivateTmp=yes gives the service an empty /tmp and /var/tmp of its own; move it (under "
        "/etc/sidetrace, say)\n")

    # While the service runs, its dynamic user has a name (the unit's): that uid is the one judged by.
    done = check_config_under_etc_overlay(upper, "useradd --no-create-home --uid 61190 sidetrace 2>/dev/null")
    assert done.returncode == 0
    assert done.stderr.startswith("warning: /etc/sidetrace/sidetrace.toml: this file can be read by root but not by "
                                  "the service's dynamic user (uid 61190): Permission denied (0600 root:root)")
