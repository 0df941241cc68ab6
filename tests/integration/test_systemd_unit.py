"""The shipped systemd unit: hardened to exposure 2.0 or below, valid, and the agent works under its constraints as
far as this machine allows without systemd as PID 1."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Agent, http_get, wait_until
from tests.integration.test_traces import send_spans

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "sidetrace.service"
PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("systemd-analyze")
    assert path, "systemd-analyze comes with Debian's systemd package"
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=60)


def test_unit_exposure_is_at_most_2_0() -> None:
    done = systemd_analyze("security", "--offline=true", "--no-pager", str(UNIT))
    match = re.search(r"Overall exposure level for sidetrace\.service: (\d+\.\d)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 2.0, done.stdout


def test_unit_sets_every_hardening_directive_the_agent_allows() -> None:
    directives = {line.split("=", 1)[0] for line in UNIT.read_text().splitlines() if "=" in line
                  and not line.startswith("#")}
    assert {"SystemCallFilter", "SystemCallArchitectures", "RestrictNamespaces", "ProtectKernelModules",
            "ProtectKernelLogs", "ProtectClock", "ProtectHostname", "PrivateDevices", "LockPersonality",
            "MemoryDenyWriteExecute", "RestrictRealtime", "UMask", "AmbientCapabilities",
            "CapabilityBoundingSet", "RestrictAddressFamilies"} <= directives
    text = UNIT.read_text()
    assert "\nUMask=0077\n" in text
    assert "\nAmbientCapabilities=CAP_NET_RAW\nCapabilityBoundingSet=CAP_NET_RAW\n" in text
    assert "\nRestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK AF_PACKET\n" in text


def test_unit_verifies_but_for_the_absent_install_path() -> None:
    """`systemd-analyze verify` finds nothing wrong but the agent's own executable, not installed on a test host."""
    done = systemd_analyze("verify", str(UNIT))
    lines = {line for line in (done.stdout + done.stderr).splitlines() if line.strip()}
    assert lines <= {"sidetrace.service: Command /opt/sidetrace/bin/sidetrace is not executable: No such file or "
                     "directory"}, lines


def _mdwe_available() -> bool:
    release = tuple(int(part) for part in re.findall(r"\d+", platform.release())[:2])
    return platform.system() == "Linux" and release >= (6, 3)


# Turns on the kernel's write-execute denial, which execve keeps, then runs the agent in the same process.
MDWE_LAUNCHER = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_MDWE): " + os.strerror(ctypes.get_errno()))
if libc.prctl({PR_GET_MDWE}, 0, 0, 0, 0) != {PR_MDWE_REFUSE_EXEC_GAIN}:
    sys.exit("PR_SET_MDWE did not take")
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.skipif(not _mdwe_available(), reason="PR_SET_MDWE needs Linux 6.3 or later")
def test_agent_receives_and_serves_with_write_execute_memory_denied(
    agent_factory: Callable[..., Agent], tmp_path: Path
) -> None:
    """The kernel's own write-execute denial (what MemoryDenyWriteExecute=yes asks for), kept across exec: the
    interpreter, grpcio and the rest of the agent run under it."""
    launcher = tmp_path / "mdwe.py"
    launcher.write_text(MDWE_LAUNCHER)
    agent = agent_factory().start(prefix=(sys.executable, str(launcher)))
    send_spans(agent, 2)  # 2 traces of 3 spans over OTLP/gRPC: grpcio's C core under the denial
    wait_until(lambda: 'sidetrace_receiver_accepted_spans_total{transport="grpc"} 6.0' in
               http_get(agent.url + "/metrics")[1], 20, "the spans accepted")
    assert agent.alive()
