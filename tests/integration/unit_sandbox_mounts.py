"""Runs as root before the uid changes: gives the process a mount and hostname namespace of its own laid out as
systemd lays out the unit's (ProtectSystem=strict, ProtectHome=, PrivateTmp=, PrivateDevices=,
ProtectKernelTunables=, ProtectControlGroups=, ProtectKernelModules=, ProtectKernelLogs=, ProtectHostname=, the
StateDirectory= left writable), then execs COMMAND (setpriv, which drops to the unit's uid).

Usage: python unit_sandbox_mounts.py SPEC.json -- COMMAND...

SPEC: {"state": the state directory, "keep": [directories under /tmp the command needs (the install, the
config)], "directives": the unit's [Service] directives}.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import sys

CLONE_NEWNS, CLONE_NEWUTS = 0x00020000, 0x04000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PER_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")  # what PrivateDevices= leaves
libc = ctypes.CDLL(None, use_errno=True)


def check(result: int, what: str) -> None:
    if result != 0:
        sys.exit(f"unit sandbox mounts: {what}: {os.strerror(ctypes.get_errno())}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    check(libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags,
                     data and data.encode()), f"mount {source} on {target}")


def bind(source: str, target: str, read_only: bool = False) -> None:
    mount(source, target, None, MS_BIND | MS_REC)
    if read_only:
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def mounts() -> list[tuple[str, str, int]]:
    """(mount point, filesystem type, per-mount flags) of every mount, from /proc/self/mountinfo. (Nothing here may
    import lazily: ProtectHome= has hidden the test's interpreter under /root by now.)"""
    found = []
    with open("/proc/self/mountinfo") as file:
        for line in file:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # \040 is a space
            fstype = fields[fields.index("-") + 1]
            flags = sum(flag for name, flag in PER_MOUNT_FLAGS.items() if name in fields[5].split(","))
            found.append((point, fstype, flags))
    return found


def under(path: str, *roots: str) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def main() -> None:
    spec_path, separator, *command = sys.argv[1:]
    if separator != "--" or not command:
        sys.exit("usage: unit_sandbox_mounts.py SPEC.json -- COMMAND...")
    with open(spec_path) as file:
        spec = json.load(file)
    unit = spec["directives"]

    def on(key: str) -> bool:
        return unit.get(key) in (["yes"], ["strict"])

    check(libc.unshare(CLONE_NEWNS | (CLONE_NEWUTS if on("ProtectHostname") else 0)), "unshare")
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # Handles on what the new /tmp and /dev will hide, bound back through /proc/self/fd.
    kept = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in spec["keep"]}
    dev = os.open("/dev", os.O_PATH | os.O_DIRECTORY)

    # Inaccessible nodes (mode 000, as systemd's /run/systemd/inaccessible) from a tmpfs detached once bound.
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    os.mkdir("/tmp/dir", 0)
    os.close(os.open("/tmp/reg", os.O_CREAT | os.O_WRONLY, 0))
    if on("ProtectHome"):
        for path in ("/home", "/root", "/run/user"):
            if os.path.isdir(path):
                bind("/tmp/dir", path, read_only=True)
    if on("ProtectKernelModules"):
        for path in sorted({os.path.realpath(p) for p in ("/usr/lib/modules", "/lib/modules")}):
            if os.path.isdir(path):
                bind("/tmp/dir", path, read_only=True)
    if on("ProtectKernelLogs") and os.path.exists("/proc/kmsg"):
        bind("/tmp/reg", "/proc/kmsg", read_only=True)
    check(libc.umount2(b"/tmp", MNT_DETACH), "umount /tmp")

    if on("PrivateTmp"):
        for path in ("/tmp", "/var/tmp"):
            mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for path, handle in kept.items():
        os.makedirs(path, exist_ok=True)
        bind(f"/proc/self/fd/{handle}", path)
    if on("PrivateDevices"):
        mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755")
        for name in DEVICES:
            os.close(os.open(f"/dev/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
            bind(f"/proc/self/fd/{dev}/{name}", f"/dev/{name}")
        os.mkdir("/dev/shm")
        mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        os.mkdir("/dev/pts")
        mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620")
        for link, target in (("ptmx", "pts/ptmx"), ("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
            os.symlink(target, f"/dev/{link}")
    if on("ProtectKernelTunables"):
        for path in ("/proc/sys", "/proc/sysrq-trigger"):
            if os.path.exists(path):  # systemd skips those this kernel lacks too
                bind(path, path, read_only=True)
    bind(spec["state"], spec["state"])  # StateDirectory=: the one writable place
    if on("ProtectSystem"):
        # Everything read-only but the API file systems, the private /tmp and /var/tmp and the state directory.
        for point, fstype, flags in mounts():
            if (under(point, "/dev") or (under(point, "/proc") and not under(point, "/proc/sys"))
                    or point in ("/tmp", "/var/tmp", spec["state"]) or fstype == "nsfs"):
                continue
            mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
    elif on("ProtectControlGroups"):
        bind("/sys/fs/cgroup", "/sys/fs/cgroup", read_only=True)
    for handle in (*kept.values(), dev):
        os.close(handle)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
