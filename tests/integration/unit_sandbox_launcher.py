"""Runs inside the sandbox (the unprivileged uid, under the installed agent's own interpreter, standard library
only): applies the unit's umask, write-execute denial and seccomp filters to itself, hands the filter's
notification descriptor to the test, then execs the agent, which keeps all of it.

Usage: python unit_sandbox_launcher.py SPEC.json -- COMMAND...

SPEC (written by tests/integration/unit_sandbox.py from the shipped unit):
  umask            the unit's UMask= (an int)
  mdwe             MemoryDenyWriteExecute=yes: prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN), the kernel's own denial
  allow            SystemCallFilter= expanded: the names of the only system calls allowed
  kill             the unit leaves SystemCallErrorNumber= unset: a call outside `allow` kills the process (SIGSYS),
                   as systemd's default does, so a missing system call shows as a crash
  notify_fd        a Unix socket to the test: unless `kill`, every call outside `allow` is reported there (the
                   filter's notification descriptor is sent over it), and answered by the test with the unit's errno
  rules            [[syscall, errno, [[arg, op, a, b], ...]], ...]: conditional refusals (another filter)
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys

PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_NOTIFY = 0x7FC00000
SCMP_ACT_KILL_PROCESS = 0x80000000


def SCMP_ACT_ERRNO(errno: int) -> int:  # noqa: N802 - libseccomp's macro name
    return 0x00050000 | (errno & 0xFFFF)


class ArgCmp(ctypes.Structure):
    """struct scmp_arg_cmp."""

    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def fail(message: str) -> None:
    sys.exit(f"unit sandbox: {message}")


def load_libseccomp() -> ctypes.CDLL:
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_notify_fd.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def syscall_number(lib: ctypes.CDLL, name: str) -> int | None:
    """The native number of ``name``, or None when this architecture has no such call (systemd skips those)."""
    number = lib.seccomp_syscall_resolve_name(name.encode())
    return number if number >= 0 else None


def allow_list_filter(lib: ctypes.CDLL, names: list[str], kill: bool) -> ctypes.c_void_p:
    """Only ``names`` allowed; every other call kills the process or waits for the test's answer
    (SCMP_ACT_NOTIFY). Native architecture only: libseccomp kills a call made through another architecture's
    entry point."""
    ctx = lib.seccomp_init(SCMP_ACT_KILL_PROCESS if kill else SCMP_ACT_NOTIFY)
    for name in names:
        number = syscall_number(lib, name)
        if number is not None and lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, number, 0, None) != 0:
            fail(f"cannot allow {name}")
    return ctx


def refusal_filter(lib: ctypes.CDLL, rules: list) -> ctypes.c_void_p:
    """Everything allowed but the calls whose arguments match a rule, refused with the rule's errno."""
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    for name, errno, conditions in rules:
        number = syscall_number(lib, name)
        if number is None:
            continue
        array = (ArgCmp * max(1, len(conditions)))(*[ArgCmp(*c) for c in conditions])
        if lib.seccomp_rule_add_array(ctx, SCMP_ACT_ERRNO(errno), number, len(conditions), array) != 0:
            fail(f"cannot add the rule {name} {conditions}")
    return ctx


def main() -> None:
    spec_path, separator, *command = sys.argv[1:]
    if separator != "--" or not command:
        fail("usage: unit_sandbox_launcher.py SPEC.json -- COMMAND...")
    with open(spec_path) as file:
        spec = json.load(file)
    os.umask(spec["umask"])
    libc = ctypes.CDLL(None, use_errno=True)
    if spec["mdwe"]:
        if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
            fail("prctl(PR_SET_MDWE): " + os.strerror(ctypes.get_errno()))
        if libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) != PR_MDWE_REFUSE_EXEC_GAIN:
            fail("PR_SET_MDWE did not take")
    lib = load_libseccomp()
    # The refusals first: once the allow-list is loaded, seccomp(2) itself may be outside it.
    refusals = refusal_filter(lib, spec["rules"])
    if lib.seccomp_load(refusals) != 0:
        fail("loading the refusal filter failed (no_new_privs must be set: setpriv --no-new-privs)")
    allow = allow_list_filter(lib, spec["allow"], spec["kill"])
    if lib.seccomp_load(allow) != 0:
        fail("loading the allow-list filter failed")
    with socket.socket(fileno=spec["notify_fd"]) as channel:
        if not spec["kill"]:
            listener = lib.seccomp_notify_fd(allow)
            socket.send_fds(channel, [b"listener"], [listener])
            os.close(listener)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
