"""Shared fixtures: free loopback ports and a real `sidetrace run` process."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(probe: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Call ``probe`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = probe()
        except Exception as exc:  # the probe's target may not be up yet
            last = exc
        else:
            if result:
                return result
            last = result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


async def until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """The asyncio twin of ``wait_until``: poll ``condition`` until it is truthy, or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host``:``port``."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate ``proc``, killing it if it does not exit within ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def http_get(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class Agent:
    """A `sidetrace run` subprocess with its own config file and data dir."""

    def __init__(self, tmp: Path, config_text: str = "", env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.otlp_http = f"http://127.0.0.1:{self.http_port}"
        self.config_path = tmp / "sidetrace.toml"
        self.data_dir = tmp / "data"
        self.log_path = tmp / "agent.log"
        tmp.mkdir(parents=True, exist_ok=True)
        self.write_config(config_text)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, extra: str = "", listen: str | None = None) -> None:
        """Write the config: loopback ports of this agent's own, then ``extra`` (TOML) after them."""
        self.config_path.write_text(
            f'[agent]\ndata_dir = "{self.data_dir}"\nlog_level = "debug"\n'
            f'[server]\nlisten = "{listen or f"127.0.0.1:{self.port}"}"\n'
            f'[receivers.otlp]\ngrpc_listen = "127.0.0.1:{self.grpc_port}"\n'
            f'http_listen = "127.0.0.1:{self.http_port}"\n{extra}'
        )

    def start(self, wait_ready: bool = True, prefix: tuple[str, ...] = ()) -> Agent:
        """Start `sidetrace run`; ``prefix`` runs it under another command (setpriv, say)."""
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "sidetrace", "run", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, env=self.env,
            )
        if wait_ready:
            wait_until(lambda: self.alive() and http_get(self.url + "/readyz", 1)[0] == 200, 20, "agent ready")
        return self

    def wait_started(self, timeout: float = 20) -> None:
        """Wait until every component has started, whether or not the agent is then ready."""
        wait_until(lambda: self.alive() and http_get(self.url + "/readyz", 1)[1] != "not ready: starting\n",
                   timeout, "the agent's components started")

    def alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc and self.proc.returncode}:\n{self.log()}")
        return True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        stop_process(self.proc, timeout)
        return self.proc.returncode


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def make(config_text: str = "", env: dict[str, str] | None = None) -> Agent:
        agent = Agent(tmp_path / f"agent{len(agents)}", config_text, env)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        if agent.proc is not None:
            agent.stop()


@pytest.fixture(scope="session")
def sidetrace_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sidetrace wheel built from this checkout (once per session): what users install."""
    work = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(Path(__file__).resolve().parents[1]),
                            "--no-deps", "-q", "-w", str(work)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = work.glob("sidetrace-*.whl")
    return wheel


# Jaeger's Monitor tab reads these names as they are; promtool's unit lint cannot be satisfied without breaking it.
_ACCEPTED_LINT = ('traces_span_metrics_duration_milliseconds use base unit "seconds" instead of "milliseconds"',)


def assert_promtool_clean(exposition: str) -> None:
    """``promtool check metrics`` finds no error in ``exposition`` and no lint but the accepted ones."""
    done = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True,
                          timeout=30)
    problems = [line for line in (done.stdout + done.stderr).splitlines() if line and line not in _ACCEPTED_LINT]
    assert done.returncode in (0, 3) and not problems, "\n".join(problems)


def scrape_clean(agent: Agent) -> set[str]:
    """The sample lines of ``agent``'s /metrics, after ``promtool check metrics`` found the scrape clean."""
    status, text = http_get(agent.url + "/metrics")
    assert status == 200, text
    assert_promtool_clean(text)
    return {line for line in text.splitlines() if not line.startswith("#")}


@pytest.fixture
def readable_tmp() -> Iterator[Path]:
    """A temporary directory every uid can enter (pytest's own are root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="sidetrace-readable-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)
