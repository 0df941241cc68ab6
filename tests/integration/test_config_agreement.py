"""`check-config` and a dry start of the agent agree on every generated config.

The dry start is the daemon itself, run in this process on the config as loaded without the host checks: its
components build and start as under `sidetrace run` (TLS files loaded, data_dir created and locked, headers
expanded) and it stops as soon as it is ready. Whatever makes it fail must make `check-config` fail, and the
other way round.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import os
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidetrace import cli
from sidetrace.agent.daemon import Daemon
from sidetrace.config import ConfigError, load
from tests.certificates import make_certificate
from tests.conftest import free_port

SET_VARIABLE, UNSET_VARIABLE = "AGREEMENT_TEST_TOKEN", "AGREEMENT_TEST_NEVER_SET"
HELD: list[int] = []  # lock files held for the "locked" data_dir while both judges look at it
CERTIFICATES = make_certificate(Path(tempfile.mkdtemp(prefix="sidetrace-agreement-")))

listener_tls = st.sampled_from(["none", "valid", "missing_cert", "key_is_a_directory"])
client_tls = st.sampled_from(["none", "valid", "missing_ca", "ca_is_a_directory"])
secret = st.sampled_from(["plain", "set_variable", "unset_variable"])
configs = st.fixed_dictionaries({
    "data_dir": st.sampled_from(["existing", "creatable", "a_file", "under_a_file", "in_proc", "in_sys", "locked",
                                 "unset_variable", "no_such_user", "empty"]),
    "server_listen": st.sampled_from(["127.0.0.1", "[::]", "localhost"]),
    "receiver_port": st.sampled_from(["own", "server_port_same_address", "server_port_wildcard",
                                      "server_port_ipv6_wildcard", "server_port_ipv6_loopback"]),
    "server_tls": listener_tls,
    "receiver_tls": listener_tls,
    "max_pending_bytes": st.sampled_from([1 << 20, 64 << 20]),
    "otlp": st.none() | st.fixed_dictionaries({"protocol": st.sampled_from(["grpc", "http"]),
                                                "scheme": st.sampled_from(["http", "https"]),
                                                "tls": client_tls, "header": secret}),
    "loadbalancing": st.none() | st.fixed_dictionaries({"tls_enabled": st.booleans(), "tls": client_tls,
                                                         "header": secret}),
    "remote_write": st.none() | st.fixed_dictionaries({"scheme": st.sampled_from(["http", "https"]),
                                                        "tls": client_tls, "bearer": secret}),
})


def _listener_tls(kind: str, directory: Path) -> str:
    cert, key = CERTIFICATES
    files = {"valid": (cert, key), "missing_cert": (directory / "gone.pem", key),
             "key_is_a_directory": (cert, directory)}.get(kind)
    return "" if files is None else f'tls = {{ cert_file = "{files[0]}", key_file = "{files[1]}" }}\n'


def _client_tls(kind: str, directory: Path, enabled: str = "") -> str:
    ca = {"valid": CERTIFICATES[0], "missing_ca": directory / "gone.pem", "ca_is_a_directory": directory}.get(kind)
    return f"tls = {{ {enabled}ca_file = \"{ca}\" }}\n" if ca else (f"tls = {{ {enabled.rstrip(', ')} }}\n"
                                                                  if enabled else "")


def _secret(kind: str) -> str:
    return {"plain": "token", "set_variable": f"${{{SET_VARIABLE}}}", "unset_variable": f"${{{UNSET_VARIABLE}}}"}[kind]


def render(choice: dict[str, Any], directory: Path) -> str:
    """The TOML of one generated ``choice``, with loopback ports of its own and files under ``directory``."""
    (directory / "existing").mkdir()
    (directory / "a_file").write_text("")
    data_dir = {"existing": directory / "existing", "creatable": directory / "new" / "state",
                "a_file": directory / "a_file", "under_a_file": directory / "a_file" / "state",
                "in_proc": "/proc/sidetrace", "in_sys": "/sys/sidetrace", "locked": directory / "existing",
                "unset_variable": f"${UNSET_VARIABLE}/state", "no_such_user": "~nosuchuser/state",
                "empty": ""}[choice["data_dir"]]
    if choice["data_dir"] == "locked":  # another agent holds the directory (flock is per open file, so this counts)
        fd = os.open(directory / "existing" / "sidetrace.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"4242\n")
        HELD.append(fd)
    server_port = free_port()
    grpc_listen = {"own": f"127.0.0.1:{free_port()}", "server_port_same_address": f"127.0.0.1:{server_port}",
                   "server_port_wildcard": f"0.0.0.0:{server_port}", "server_port_ipv6_wildcard": f"[::]:{server_port}",
                   "server_port_ipv6_loopback": f"[::1]:{server_port}"}[choice["receiver_port"]]
    text = (f'[agent]\ndata_dir = "{data_dir}"\n'
            f'[server]\nlisten = "{choice["server_listen"]}:{server_port}"\n'
            f'{_listener_tls(choice["server_tls"], directory)}'
            f'[receivers.otlp]\ngrpc_listen = "{grpc_listen}"\nhttp_listen = "127.0.0.1:{free_port()}"\n'
            f'{_listener_tls(choice["receiver_tls"], directory)}'
            f'[spool]\nmax_pending_bytes = {choice["max_pending_bytes"]}\n')
    if (otlp := choice["otlp"]) is not None:
        text += (f'[[exporters.otlp]]\nname = "o"\nendpoint = "{otlp["scheme"]}://127.0.0.1:1"\n'
                 f'protocol = "{otlp["protocol"]}"\nheaders = {{ authorization = "{_secret(otlp["header"])}" }}\n'
                 f'{_client_tls(otlp["tls"], directory)}')
    if (balancer := choice["loadbalancing"]) is not None:
        enabled = f"enabled = {str(balancer['tls_enabled']).lower()}, "
        text += (f'[[exporters.loadbalancing]]\nname = "lb"\nbackends = ["127.0.0.1:1"]\n'
                 f'headers = {{ x-token = "{_secret(balancer["header"])}" }}\n'
                 f'{_client_tls(balancer["tls"], directory, enabled)}')
    if (writer := choice["remote_write"]) is not None:
        text += (f'[[exporters.remote_write]]\nname = "rw"\nurl = "{writer["scheme"]}://127.0.0.1:1/api/v1/write"\n'
                 f'bearer_token = "{_secret(writer["bearer"])}"\n{_client_tls(writer["tls"], directory)}')
    return text


def check_config(path: Path) -> tuple[bool, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["check-config", "--config", str(path)])
    return code == 0, err.getvalue()


async def _start_then_stop(daemon: Daemon) -> int:
    running = asyncio.create_task(daemon.run())
    for _ in range(200):  # 20 s at most
        if daemon._ready or running.done():
            break
        await asyncio.sleep(0.1)
    daemon._stop.set()
    return await asyncio.wait_for(running, 30)


def dry_start(path: Path) -> tuple[bool, str]:
    """Start the daemon on ``path`` and stop it once ready: (started, why not)."""
    try:
        config = load(path)
    except ConfigError as exc:
        return False, "\n".join(exc.problems)
    code = asyncio.run(_start_then_stop(Daemon(config, str(path))))
    return code == 0, f"exit {code}"  # run() returns 0 only after it was ready and stopped on request


# 200, not 40: most generated configs hold several problems, and one that both judges refuse (a missing TLS file, a
# small max_pending_bytes) masks the one under test; at 40 the landed code passed 3 runs in 4 with /proc data_dirs
# and shared ports in the space. An example takes 5-110 ms.
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(choice=configs)
def test_check_config_and_a_dry_start_agree(choice: dict[str, Any]) -> None:
    os.environ[SET_VARIABLE] = "from-the-environment"
    os.environ.pop(UNSET_VARIABLE, None)
    with tempfile.TemporaryDirectory(prefix="sidetrace-agreement-") as name:
        directory = Path(name)
        path = directory / "sidetrace.toml"
        path.write_text(render(choice, directory))
        try:
            checked, problems = check_config(path)
            started, why = dry_start(path)
        finally:
            while HELD:
                os.close(HELD.pop())
        assert checked == started, (f"check-config {'passed' if checked else 'failed'} ({problems.strip()}) but the "
                                    f"dry start {'started' if started else 'failed'} ({why}) on:\n{path.read_text()}")
