"""The shipped systemd unit: hardened to exposure 2.0 or below, valid, and the agent works under its constraints as
far as this machine allows without systemd as PID 1."""

from __future__ import annotations

import errno
import json
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import Agent, free_port, http_get, wait_until
from tests.integration.otlp_servers import Rotel, Sink
from tests.integration.test_traces import send_spans
from tests.integration.unit_sandbox import (
    LAUNCHER,
    MOUNTS,
    Refusals,
    capability_set,
    exec_line,
    mounts_spec,
    read_unit,
    refusal_errno,
    spec,
)

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


def _bytes(size: str) -> int:
    """A systemd size (``512M``) in bytes."""
    factor = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
    return int(size.rstrip("KMG")) * factor


def _dynamic_uid() -> int:
    """A uid in systemd's DynamicUser= range with no passwd entry and no process: what the unit runs as."""
    busy = {p.info["uids"].real for p in psutil.process_iter(["uids"]) if p.info["uids"]}
    for uid in range(61184, 65520):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            if uid not in busy:
                return uid
    raise AssertionError("no free uid in 61184-65519")


@pytest.fixture(scope="module")
def system_install(sidetrace_wheel: Path) -> Iterator[Path]:
    """The built wheel with its agent extra in a venv of Debian's /usr/bin/python3, in a directory every uid can
    read (as /opt/sidetrace is): a pyenv interpreter lives under /root, which ProtectHome= hides."""
    work = Path(tempfile.mkdtemp(prefix="sidetrace-unit-"))
    work.chmod(0o755)
    # Without pip of its own (ensurepip took seconds): this process's pip installs into it.
    made = subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(work / "venv")], capture_output=True,
                          text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(work / "venv/bin/python"), "install", "-q",
                                f"{sidetrace_wheel}[agent]"], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr
    yield work / "venv"
    shutil.rmtree(work, ignore_errors=True)


def _send_udp(port: int, packets: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for _ in range(packets):
            sender.sendto(b"x" * 100, ("127.0.0.1", port))


def _assert_file_system_as_the_unit_lays_it_out(pid: int, state: Path) -> None:
    """What the agent ``pid`` sees: everything read-only but its state directory and a /tmp of its own
    (ProtectSystem=strict, PrivateTmp=), no home directories, only pseudo devices, its own hostname namespace."""
    options = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        options[fields[4]] = (fields[5].split(",")[0], fields[fields.index("-") + 1])
    assert options["/"][0] == "ro" and options["/sys"][0] == "ro" and options["/proc/sys"][0] == "ro"
    assert options[str(state)][0] == "rw"
    assert options["/tmp"] == ("rw", "tmpfs") and options["/var/tmp"] == ("rw", "tmpfs")
    assert os.listdir(f"/proc/{pid}/root/root") == [] and os.listdir(f"/proc/{pid}/root/home") == []
    assert sorted(os.listdir(f"/proc/{pid}/root/dev")) == [
        "fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "tty", "urandom", "zero"]
    assert os.readlink(f"/proc/{pid}/ns/uts") != os.readlink("/proc/self/ns/uts")


def _notified(notify: socket.socket, state: str, agent: Agent) -> str:
    """The next sd_notify datagram that starts with ``state`` (the socket's timeout bounds the wait), checked to
    come from the agent's main process: NotifyAccess=main makes systemd drop any other's."""
    assert agent.proc is not None
    while True:
        try:
            data, ancillary, _, _ = notify.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            raise AssertionError(f"no {state} from the agent:\n{agent.log()}") from None
        (level, kind, credentials), = ancillary
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
        assert struct.unpack("=iII", credentials)[0] == agent.proc.pid, data
        if data.decode().startswith(state):
            return data.decode()


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[tuple[Rotel, Sink]]:
    """A real OTLP collector (rotel) forwarding to a sink the test reads."""
    sink = Sink()
    try:
        rotel = Rotel(tmp_path, sink.port).start()
        yield rotel, sink
        rotel.stop()
    finally:
        sink.stop()


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="setpriv to another uid needs root (CI runs as root)")
def test_agent_runs_as_the_unit_runs_it(system_install: Path, readable_tmp: Path,
                                        collector: tuple[Rotel, Sink]) -> None:
    """The shipped unit's own constraints, read from the installed wheel's copy, applied without systemd: ExecStart
    from the wheel's venv of Debian's Python, as a uid with no passwd entry, holding CAP_NET_RAW only (ambient and
    bounding) with no_new_privs, UMask=, the kernel's write-execute denial, and SystemCallFilter= as a seccomp
    allow-list (every call outside it reported to the test and answered with SystemCallErrorNumber=), next to
    the seccomp refusals of MemoryDenyWriteExecute=, RestrictNamespaces=, LockPersonality=, RestrictRealtime=
    and RestrictAddressFamilies=, in a mount namespace laid out as systemd lays out the unit's. check-config
    passes, the agent becomes ready, takes spans over gRPC and HTTP, exports them to a real collector over
    OTLP/gRPC and, after a reload (SIGHUP, as ExecReload= sends), over OTLP/HTTP, serves /metrics, samples
    loopback packets, keeps its spool to itself, stops cleanly, and makes no system call the filter refuses."""
    (shipped,) = system_install.glob("lib/python*/site-packages/sidetrace/_data/sidetrace.service")
    assert shipped.read_bytes() == UNIT.read_bytes()
    unit = read_unit(shipped)
    uid = _dynamic_uid()
    base = readable_tmp
    state = base / "state"  # StateDirectory=sidetrace with StateDirectoryMode=0700, owned by the dynamic user
    state.mkdir(mode=0o700)
    os.chown(state, uid, uid)
    rotel, sink = collector
    udp_port = free_port()
    netsample = (f'[sources.netsample]\nenabled = true\ninterfaces = ["lo"]\nsampling_rate = 1\n'
                 f'filter = "udp and dst port {udp_port}"\n')

    def exporter(protocol: str) -> str:
        port = rotel.grpc_port if protocol == "grpc" else rotel.http_port
        return (f'[[exporters.otlp]]\nname = "rotel"\nendpoint = "http://127.0.0.1:{port}"\n'
                f'protocol = "{protocol}"\n')
    agent = Agent(base / "agent")
    agent.data_dir = state
    agent.write_config(exporter("grpc") + netsample)
    (base / "agent").chmod(0o755)
    agent.config_path.chmod(0o644)
    notify_name = f"sidetrace-unit-{os.getpid()}-{uid}"
    launcher = base / "launcher.py"
    launcher.write_text(LAUNCHER.read_text())
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "HOME": "/", "USER": "sidetrace", "LOGNAME": "sidetrace", "SHELL": "/usr/sbin/nologin",
           "NOTIFY_SOCKET": "@" + notify_name, "WATCHDOG_USEC": "2000000"}  # the unit's 30 s, shortened to see a ping
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
               f"--inh-caps={capability_set(unit)}", f"--ambient-caps={capability_set(unit)}",
               f"--bounding-set={capability_set(unit)}", "--no-new-privs"]
    errno_value = refusal_errno(unit)
    mounts_path = base / "mounts.json"
    mounts_path.write_text(mounts_spec(unit, state, [system_install.parent, base]))

    def sandboxed(key: str, refusals: Refusals) -> list[str]:
        spec_path = base / f"{key}.json"
        spec_path.write_text(spec(unit, refusals.theirs.fileno()))
        spec_path.chmod(0o644)
        return [sys.executable, str(MOUNTS), str(mounts_path), "--", *setpriv, "--",
                str(system_install / "bin/python"), str(launcher), str(spec_path), "--",
                *exec_line(unit, key, system_install, agent.config_path)]

    checked_refusals = Refusals(errno_value)
    try:
        checking = subprocess.Popen(sandboxed("ExecStartPre", checked_refusals), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, env=env,
                                    pass_fds=[checked_refusals.theirs.fileno()])
        checked_refusals.start()
        output, _ = checking.communicate(timeout=60)
        assert checking.returncode == 0, output
        assert checked_refusals.error is None and checked_refusals.refused == [], checked_refusals.refused
    finally:
        checked_refusals.close()

    refusals = Refusals(errno_value)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        notify.bind("\0" + notify_name)
        notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        notify.settimeout(20)
        with open(agent.log_path, "ab") as log:
            agent.proc = subprocess.Popen(sandboxed("ExecStart", refusals), stdout=log, stderr=subprocess.STDOUT,
                                          env=env, pass_fds=[refusals.theirs.fileno()])
        refusals.start()
        assert _notified(notify, "READY=1", agent).startswith(
            f"READY=1\nSTATUS=serving on 127.0.0.1:{agent.port}\nMAINPID={agent.proc.pid}")
        wait_until(lambda: agent.alive() and http_get(agent.url + "/readyz", 1)[0] == 200, 30, "agent ready")
        _notified(notify, "WATCHDOG=1", agent)

        status = dict(line.split(":\t", 1) for line in
                      Path(f"/proc/{agent.proc.pid}/status").read_text().splitlines() if ":\t" in line)
        assert status["Uid"].split() == [str(uid)] * 4 and status["Gid"].split() == [str(uid)] * 4
        assert status["Groups"].strip() == ""
        for capabilities in ("CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[capabilities], 16) == 1 << 13, (capabilities, status[capabilities])  # CAP_NET_RAW
        assert (status["NoNewPrivs"], status["Seccomp"], status["Seccomp_filters"]) == ("1", "2", "2")
        _assert_file_system_as_the_unit_lays_it_out(agent.proc.pid, state)

        send_spans(agent, 2, protocol="grpc", service="over-grpc")
        wait_until(lambda: sink.collected.unique() == 6, 30, "6 spans at the collector over OTLP/gRPC")
        # ExecReload=: SIGHUP, here switching the exporter to OTLP/HTTP (aiohttp's client under the filter).
        agent.write_config(exporter("http") + netsample)
        agent.signal(signal.SIGHUP)
        _notified(notify, "RELOADING=1", agent)
        _notified(notify, "READY=1", agent)
        wait_until(lambda: f"reloaded {agent.config_path}; changed " in agent.log(), 10, "the reload logged")
        send_spans(agent, 2, protocol="http", service="over-http")
        wait_until(lambda: sink.collected.unique() == 12, 30, "6 more spans at the collector over OTLP/HTTP")
        assert sink.collected.duplicates() == 0
        assert {service for copies in sink.collected.spans.values() for service, _, _ in copies} == {
            "over-grpc", "over-http"}

        _send_udp(udp_port, 200)

        def sampled() -> bool:
            flows = json.loads(http_get(agent.url + "/debug/flows")[1])
            return [f["estimated_packets"] for f in flows["flows"] if f["local_port"] == udp_port] == [200]
        wait_until(sampled, 20, "netsample to count the 200 packets sent to the filtered port")
        _, text = http_get(agent.url + "/metrics")
        assert 'sidetrace_network_sampled_packets_total{device="lo"} 200.0' in text
        assert 'sidetrace_receiver_accepted_spans_total{transport="grpc"} 6.0' in text
        assert 'sidetrace_receiver_accepted_spans_total{transport="http"} 6.0' in text
        assert "sidetrace_config_reloads_total 1.0" in text

        created = list(state.rglob("*"))
        assert created, "the agent wrote nothing to its state directory"
        for path in created:
            mode = path.lstat().st_mode
            assert (path.lstat().st_uid, path.lstat().st_gid) == (uid, uid), path
            assert stat.S_IMODE(mode) == (0o700 if stat.S_ISDIR(mode) else 0o600), (path, oct(mode))

        # MemoryMax= needs a cgroup of the agent's own, which only systemd makes: its peak resident set instead.
        peak = int(Path(f"/proc/{agent.proc.pid}/status").read_text().split("VmHWM:")[1].split()[0]) * 1024
        assert peak < _bytes(unit["MemoryMax"][0]), peak

        assert agent.stop() == 0, agent.log()
        _notified(notify, "STOPPING=1", agent)
        assert refusals.error is None, refusals.error
        assert refusals.refused == [], refusals.refused
        assert "Traceback" not in agent.log(), agent.log()
    finally:
        if agent.proc is not None:
            agent.stop()
        refusals.close()
        notify.close()


# Each call the unit forbids, made through libc; prints {call: errno} (0 when it succeeded).
FORBIDDEN_CALLS = """
import ctypes, json, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
number = ctypes.CDLL("libseccomp.so.2").seccomp_syscall_resolve_name  # this architecture's system call numbers
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
def outcome(failed):
    return ctypes.get_errno() if failed else 0
results = {}
try:
    socket.socket(40, socket.SOCK_STREAM).close()  # AF_VSOCK, which this kernel has
    results["socket(AF_VSOCK)"] = 0
except OSError as exc:
    results["socket(AF_VSOCK)"] = exc.errno
results["unshare(CLONE_NEWNET)"] = outcome(libc.unshare(0x40000000) == -1)
results["clone3"] = outcome(libc.syscall(number(b"clone3"), None, 0) == -1)
results["personality(PER_BSD)"] = outcome(libc.personality(6) == -1)
results["mmap(PROT_WRITE|PROT_EXEC)"] = outcome(libc.mmap(None, 4096, 7, 0x22, -1, 0) in (None, 2**64 - 1))
param = ctypes.c_int(1)
results["sched_setscheduler(SCHED_FIFO)"] = outcome(libc.sched_setscheduler(0, 1, ctypes.byref(param)) == -1)
results["setuid"] = outcome(libc.syscall(number(b"setuid"), 0) == -1)
results["chmod(S_ISUID)"] = outcome(libc.chmod(sys.argv[1].encode(), 0o4755) == -1)
print(json.dumps(results))
"""


def _run_in_unit_sandbox(tmp_path: Path, code: str, *args: str,
                         unit_path: Path = UNIT) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run ``python -c code args`` as root under the unit's seccomp filters and write-execute denial; return what it
    did and the calls the allow-list refused."""
    unit = read_unit(unit_path)
    refusals = Refusals(refusal_errno(unit))
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec(unit, refusals.theirs.fileno()))
    command = ["setpriv", "--no-new-privs", "--", sys.executable, str(LAUNCHER), str(spec_path), "--",
               sys.executable, "-c", code, *args]
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                pass_fds=[refusals.theirs.fileno()])
        refusals.start()
        out, err = proc.communicate(timeout=60)
        # Complete: a refused call is recorded before it is answered, and the process waited for each answer.
        assert refusals.error is None, refusals.error
        return subprocess.CompletedProcess(command, proc.returncode, out, err), refusals.refused
    finally:
        refusals.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="as root each call would succeed: only the filters refuse them")
def test_unit_sandbox_refuses_what_the_unit_forbids(tmp_path: Path) -> None:
    """The emulation behind test_agent_runs_as_the_unit_runs_it, checked as root (who could otherwise do all of
    it): each forbidden call fails with the errno systemd gives, and the one outside SystemCallFilter= is
    reported to the test."""
    victim = tmp_path / "victim"
    victim.write_text("")
    done, refused = _run_in_unit_sandbox(tmp_path, FORBIDDEN_CALLS, str(victim))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "socket(AF_VSOCK)": errno.EAFNOSUPPORT,  # RestrictAddressFamilies=
        "unshare(CLONE_NEWNET)": errno.EPERM,  # RestrictNamespaces=
        "clone3": errno.ENOSYS,  # RestrictNamespaces= (glibc falls back to clone)
        "personality(PER_BSD)": errno.EPERM,  # LockPersonality=
        "mmap(PROT_WRITE|PROT_EXEC)": errno.EPERM,  # MemoryDenyWriteExecute=
        "sched_setscheduler(SCHED_FIFO)": errno.EPERM,  # RestrictRealtime=
        "setuid": errno.EPERM,  # SystemCallFilter=~@privileged, answered with SystemCallErrorNumber=
        "chmod(S_ISUID)": errno.EPERM,  # RestrictSUIDSGID=
    }
    assert [call.split("(")[0] for call in refused] == ["setuid"]


@pytest.mark.skipif(os.geteuid() != 0 or platform.machine() != "x86_64",
                    reason="root for setpriv; the x32 entry point exists on x86-64 only")
def test_unit_sandbox_kills_a_call_through_another_architecture(tmp_path: Path) -> None:
    """SystemCallArchitectures=native: getpid through the x32 entry point (x86-64's other ABI) kills the caller."""
    done, refused = _run_in_unit_sandbox(tmp_path, "import ctypes; ctypes.CDLL(None).syscall(0x40000000 | 39)")
    assert done.returncode == -signal.SIGSYS, (done.returncode, done.stderr)
    assert refused == []


@pytest.mark.skipif(os.geteuid() != 0, reason="root for setpriv")
def test_unit_sandbox_kills_a_refused_call_when_the_unit_names_no_errno(tmp_path: Path) -> None:
    """Without SystemCallErrorNumber= systemd kills a call outside SystemCallFilter= with SIGSYS; so does the
    sandbox (a missing system call is then a crash the test sees)."""
    unit = tmp_path / "sidetrace.service"
    unit.write_text(UNIT.read_text().replace("\nSystemCallErrorNumber=EPERM\n", "\n"))
    assert "SystemCallErrorNumber" not in unit.read_text()
    code = 'import ctypes; libseccomp = ctypes.CDLL("libseccomp.so.2"); ' \
           'ctypes.CDLL(None).syscall(libseccomp.seccomp_syscall_resolve_name(b"setuid"), 0)'
    done, refused = _run_in_unit_sandbox(tmp_path, code, unit_path=unit)
    assert done.returncode == -signal.SIGSYS, (done.returncode, done.stderr)
    assert refused == []
