"""What the shipped unit's sandbox lets the agent see and read: the paths it hides, and the dynamic user it runs as.

Used where the answer for root would be wrong: install-service (an interpreter the service cannot reach) and
check-config run as root (a file root can read and the service's user cannot).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
from pathlib import Path, PurePosixPath

# What the shipped unit hides from the service, and the directive that does it.
_HIDDEN = (
    (("/home", "/root", "/run/user"), "ProtectHome=yes hides /home, /root and /run/user from the service"),
    (("/tmp", "/var/tmp"), "PrivateTmp=yes gives the service an empty /tmp and /var/tmp of its own"),
)
# systemd's DynamicUser= range (61184-65519); the unit's dynamic user is named after it, "sidetrace", while it runs.
DYNAMIC_UIDS = range(61184, 65520)
UNIT_PATH = PurePosixPath("etc/systemd/system/sidetrace.service")
DROP_IN_DIR = PurePosixPath("etc/systemd/system/sidetrace.service.d")  # `systemctl edit sidetrace` writes here
SERVICE_CONFIG = PurePosixPath("etc/sidetrace/sidetrace.toml")  # what the unit runs the agent with


def hidden_reason(path: str) -> str | None:
    """Why a service run by the shipped unit cannot reach ``path``, or None when it can."""
    pure = PurePosixPath(os.path.normpath(path))
    for roots, reason in _HIDDEN:
        for root in roots:
            if pure == PurePosixPath(root) or PurePosixPath(root) in pure.parents:
                return reason
    return None


def supplementary_groups() -> list[int]:
    """The group ids the installed unit and its drop-ins (``systemctl edit sidetrace``) give the service through
    ``SupplementaryGroups=``, read as systemd reads them (drop-ins in name order, an empty value resets); a name no
    group of this host has is left out (systemd would not start the service with it)."""
    files = [Path("/", UNIT_PATH), *sorted(Path("/", DROP_IN_DIR).glob("*.conf"))]
    names: list[str] = []
    for path in files:
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for line in lines:
            key, equals, value = line.strip().partition("=")
            if equals and key.strip() == "SupplementaryGroups":
                names = names + value.split() if value.strip() else []
    gids = []
    for name in dict.fromkeys(names):
        try:
            gids.append(int(name) if name.isdigit() else grp.getgrnam(name).gr_gid)
        except KeyError:
            continue
    return gids


def service_ids() -> tuple[int, int]:
    """The uid and gid the service runs as: its dynamic user's while it runs (systemd names it after the unit),
    else the first of the dynamic range (a dynamic user's group has its uid's number)."""
    try:
        entry = pwd.getpwnam("sidetrace")
    except KeyError:
        return DYNAMIC_UIDS.start, DYNAMIC_UIDS.start
    if entry.pw_uid not in DYNAMIC_UIDS:
        return DYNAMIC_UIDS.start, DYNAMIC_UIDS.start
    return entry.pw_uid, entry.pw_gid


def unreadable_by_service(paths: list[str]) -> dict[str, str]:
    """Each of ``paths`` the unit's dynamic user could not read, with why: hidden by the sandbox, or refused when
    opened as that user (its uid and gid, the unit's supplementary groups, nothing else).

    Needs root (to take the user's ids) and forks: for check-config, a single-threaded process.
    """
    why = {path: reason for path in paths if (reason := hidden_reason(path)) is not None}
    rest = [path for path in dict.fromkeys(paths) if path not in why]
    if not rest:
        return why
    uid, gid = service_ids()
    groups = supplementary_groups()
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - measured through the parent's result
        try:
            os.close(reading)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            answers = []
            for path in rest:
                try:
                    with open(path, "rb") as handle:
                        handle.read(1)
                    answers.append(None)
                except OSError as exc:
                    answers.append(exc.strerror or str(exc))
            os.write(writing, json.dumps(answers).encode())
        finally:
            os._exit(0)
    os.close(writing)
    with os.fdopen(reading, "rb") as pipe:
        output = pipe.read()
    os.waitpid(child, 0)
    answers = json.loads(output) if output else ["could not be checked as the service's user"] * len(rest)
    why.update({path: answer for path, answer in zip(rest, answers, strict=True) if answer is not None})
    return why


def describe_owner(path: str) -> str:
    """``path``'s mode and owner as ``ls -l`` would name them (``0600 root:root``), or "" when it cannot be read."""
    try:
        status = os.stat(path)
    except OSError:
        return ""
    try:
        user = pwd.getpwuid(status.st_uid).pw_name
    except KeyError:
        user = str(status.st_uid)
    try:
        group = grp.getgrgid(status.st_gid).gr_name
    except KeyError:
        group = str(status.st_gid)
    return f"{status.st_mode & 0o7777:04o} {user}:{group}"
