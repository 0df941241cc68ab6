"""The shipped unit's sandbox without systemd as PID 1: what its directives ask for, read from the unit file and
turned into what this machine can apply to a process (mount and hostname namespaces, a uid, capabilities, a
umask, the kernel's write-execute denial and seccomp filters), and the watcher that reports every system call
the filter refused. What is not applied here is listed in README "Install as a service"."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import select
import shlex
import shutil
import socket
import struct
import subprocess
import threading
from pathlib import Path

LAUNCHER = Path(__file__).with_name("unit_sandbox_launcher.py")
MOUNTS = Path(__file__).with_name("unit_sandbox_mounts.py")

# libseccomp's enum scmp_compare.
CMP_NE, CMP_EQ, CMP_GT, CMP_MASKED_EQ = 1, 4, 6, 7
# linux/sched.h and linux/mman.h, linux/shm.h.
NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x00000080)
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
SCHED_FIFO, SCHED_RR, SCHED_IDLE = 1, 2, 5
S_ISUID, S_ISGID, O_CREAT = 0o4000, 0o2000, 0o100
AF_MAX = 46  # linux/socket.h on 6.x: families at or above it do not exist
# linux/seccomp.h: SECCOMP_IOCTL_NOTIF_RECV and _SEND (_IOWR('!', 0 and 1, the 80- and 24-byte structs)).
NOTIF_RECV, NOTIF_SEND = 0xC0502100, 0xC0182101


def read_unit(path: Path) -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit's [Service] section, values in file order."""
    directives: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith(("#", ";")):
            key, value = line.split("=", 1)
            directives.setdefault(key, []).append(value)
    return directives


def syscall_groups() -> dict[str, list[str]]:
    """``systemd-analyze syscall-filter``: each group's members (names and nested @groups)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze comes with Debian's systemd package"
    done = subprocess.run([analyze, "syscall-filter", "--no-pager"], capture_output=True, text=True, timeout=60)
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in done.stdout.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith(" ") and not line.strip().startswith("#") and line.strip():
            current.append(line.strip())
        elif line.startswith("#"):
            current = []  # the kernel's calls systemd lists in no group
    assert "@system-service" in groups, done.stdout + done.stderr
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    found: set[str] = set()
    for name in names:
        found |= expand(groups[name], groups) if name.startswith("@") else {name}
    return found


# The system calls other directives take away (systemd.exec(5)); all are in @privileged already, which this unit
# takes away itself, but a unit without that line still gets them.
IMPLIED_FILTERS = {"PrivateDevices": ["@raw-io"], "ProtectClock": ["@clock"], "ProtectKernelModules": ["@module"],
                   "ProtectKernelLogs": ["syslog"], "ProtectHostname": ["sethostname", "setdomainname"]}


def allowed_syscalls(unit: dict[str, list[str]]) -> set[str]:
    """SystemCallFilter= as systemd reads it: an allow-list (with @default added, as systemd adds it) from which
    the later ``~`` lines take names away."""
    groups = syscall_groups()
    lines = unit["SystemCallFilter"]
    assert not lines[0].startswith("~"), "the unit's first SystemCallFilter= is an allow-list"
    allowed = expand(["@default"], groups)
    for line in lines:
        names = line.lstrip("~").split()
        if line.startswith("~"):
            allowed -= expand(names, groups)
        else:
            allowed |= expand(names, groups)
    for directive, implied in IMPLIED_FILTERS.items():
        if unit.get(directive) == ["yes"]:
            allowed -= expand(implied, groups)
    return allowed


def refusals(unit: dict[str, list[str]]) -> list[list]:
    """The argument-dependent refusals systemd 252 loads for the unit's other seccomp-based directives, as
    [syscall, errno, [[arg, op, a, b], ...]]."""
    rules: list[list] = []
    if unit.get("MemoryDenyWriteExecute") == ["yes"]:
        both = PROT_WRITE | PROT_EXEC
        rules += [["mmap", errno.EPERM, [[2, CMP_MASKED_EQ, both, both]]],
                  ["mprotect", errno.EPERM, [[2, CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC]]],
                  ["pkey_mprotect", errno.EPERM, [[2, CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC]]],
                  ["shmat", errno.EPERM, [[2, CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC]]]]
    if unit.get("RestrictNamespaces") == ["yes"]:
        rules += [["setns", errno.EPERM, []], ["clone3", errno.ENOSYS, []]]  # clone3's flags are out of reach
        for flag in NAMESPACE_FLAGS:
            rules += [["unshare", errno.EPERM, [[0, CMP_MASKED_EQ, flag, flag]]],
                      ["clone", errno.EPERM, [[0, CMP_MASKED_EQ, flag, flag]]]]
    if unit.get("RestrictSUIDSGID") == ["yes"]:
        for bit in (S_ISUID, S_ISGID):
            mode = [CMP_MASKED_EQ, bit, bit]
            rules += [[name, errno.EPERM, [[arg, *mode]]] for name, arg in (
                ("chmod", 1), ("fchmod", 1), ("fchmodat", 2), ("mkdir", 1), ("mkdirat", 2), ("mknod", 1),
                ("mknodat", 2), ("creat", 1))]
            rules += [["open", errno.EPERM, [[1, CMP_MASKED_EQ, O_CREAT, O_CREAT], [2, *mode]]],
                      ["openat", errno.EPERM, [[2, CMP_MASKED_EQ, O_CREAT, O_CREAT], [3, *mode]]]]
    if unit.get("LockPersonality") == ["yes"]:
        rules.append(["personality", errno.EPERM, [[0, CMP_NE, 0, 0]]])  # PER_LINUX only
    if unit.get("RestrictRealtime") == ["yes"]:
        rules += [["sched_setscheduler", errno.EPERM, [[1, CMP_EQ, policy, 0]]] for policy in (SCHED_FIFO, SCHED_RR)]
        rules.append(["sched_setscheduler", errno.EPERM, [[1, CMP_GT, SCHED_IDLE, 0]]])
    if "RestrictAddressFamilies" in unit:
        (families,) = unit["RestrictAddressFamilies"]
        allowed = {getattr(socket, name) for name in families.split()}
        rules += [["socket", errno.EAFNOSUPPORT, [[0, CMP_EQ, family, 0]]]
                  for family in range(AF_MAX) if family not in allowed]
        rules.append(["socket", errno.EAFNOSUPPORT, [[0, CMP_GT, AF_MAX - 1, 0]]])
    return rules


def capability_set(unit: dict[str, list[str]]) -> str:
    """AmbientCapabilities= (equal to CapabilityBoundingSet= in this unit) as setpriv's ``-all,+net_raw``."""
    (ambient,) = unit["AmbientCapabilities"]
    assert unit["CapabilityBoundingSet"] == [ambient]
    return "-all," + ",".join("+" + name.removeprefix("CAP_").lower() for name in ambient.split())


def exec_line(unit: dict[str, list[str]], key: str, install: Path, config: Path) -> list[str]:
    """The unit's ExecStart= (or ExecStartPre=) with /opt/sidetrace and the config path moved to the test's."""
    (line,) = unit[key]
    return [word.replace("/opt/sidetrace", str(install)).replace("/etc/sidetrace/sidetrace.toml", str(config))
            for word in shlex.split(line)]


class Notif(ctypes.Structure):
    """struct seccomp_notif (with its struct seccomp_data)."""

    _fields_ = [("id", ctypes.c_uint64), ("pid", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("nr", ctypes.c_int32), ("arch", ctypes.c_uint32), ("instruction_pointer", ctypes.c_uint64),
                ("args", ctypes.c_uint64 * 6)]


def refusal_errno(unit: dict[str, list[str]]) -> int | None:
    """SystemCallErrorNumber= as a number; None when unset or ``kill`` (systemd then kills with SIGSYS)."""
    name = unit.get("SystemCallErrorNumber", ["kill"])[0]
    return None if name == "kill" else getattr(errno, name)


class Refusals:
    """Receives the sandbox's seccomp notification descriptor, answers each call outside the allow-list with
    ``errno`` (as SystemCallErrorNumber= makes systemd do) and records it as ``name(arg0, arg1)``. With no errno
    the filter kills instead, and the launcher sends nothing."""

    def __init__(self, errno_value: int | None) -> None:
        self.errno = errno_value
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.refused: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="seccomp-refusals", daemon=True)
        libseccomp = ctypes.CDLL("libseccomp.so.2")
        libseccomp.seccomp_syscall_resolve_num_arch.restype = ctypes.c_char_p
        libseccomp.seccomp_syscall_resolve_num_arch.argtypes = [ctypes.c_uint32, ctypes.c_int]
        self._name = libseccomp.seccomp_syscall_resolve_num_arch
        self.listener: int | None = None
        self.error: str | None = None

    def start(self) -> None:
        """Once the sandboxed process started: it holds the other end (pass ``theirs.fileno()`` to it)."""
        self.theirs.close()
        self._thread.start()

    def _serve(self) -> None:
        try:
            self.ours.settimeout(60)
            _, fds, _, _ = socket.recv_fds(self.ours, 64, 1)
            if not fds:
                if self.errno is not None:
                    self.error = "the launcher closed its end before sending the filter's descriptor"
                return
            self.listener = fds[0]
            poller = select.poll()
            poller.register(self.listener, select.POLLIN)
            while not self._stop.is_set():
                events = poller.poll(100)
                if any(event & (select.POLLHUP | select.POLLERR) for _, event in events):
                    return  # every filtered task has exited
                if events:
                    self._answer()
        except Exception as exc:  # surfaced by the test through .error
            self.error = f"{type(exc).__name__}: {exc}"

    def _answer(self) -> None:
        request = bytearray(ctypes.sizeof(Notif))
        try:
            fcntl.ioctl(self.listener, NOTIF_RECV, request, True)
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # the caller was interrupted (a signal) before we read it
                return
            raise
        notif = Notif.from_buffer(request)
        name = self._name(notif.arch, notif.nr)
        self.refused.append(f"{name.decode() if name else notif.nr}({notif.args[0]:#x}, {notif.args[1]:#x})")
        response = struct.pack("=QqiI", notif.id, 0, -self.errno, 0)
        try:
            fcntl.ioctl(self.listener, NOTIF_SEND, response)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.ours.close()
        if self.listener is not None:
            os.close(self.listener)


def spec(unit: dict[str, list[str]], notify_fd: int) -> str:
    """The launcher's JSON spec (see unit_sandbox_launcher.py) for ``unit``."""
    return json.dumps({"umask": int(unit["UMask"][0], 8), "mdwe": unit.get("MemoryDenyWriteExecute") == ["yes"],
                       "allow": sorted(allowed_syscalls(unit)), "kill": refusal_errno(unit) is None,
                       "notify_fd": notify_fd, "rules": refusals(unit)})


def mounts_spec(unit: dict[str, list[str]], state: Path, keep: list[Path]) -> str:
    """unit_sandbox_mounts.py's JSON spec: the unit's directives, its state directory and what to keep visible."""
    return json.dumps({"directives": unit, "state": str(state), "keep": [str(path) for path in keep]})
