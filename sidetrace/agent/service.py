"""Installs and removes the agent as a systemd service from the files the wheel carries (sidetrace/_data/).

The unit written is the shipped one with its ``ExecStart`` pointed at a given interpreter; the config is
written only when absent, so an operator's edits survive a re-install and an upgrade.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path, PurePosixPath

UNIT_PATH = PurePosixPath("etc/systemd/system/sidetrace.service")
DROP_IN_DIR = PurePosixPath("etc/systemd/system/sidetrace.service.d")  # `systemctl edit sidetrace` writes here
WANTS_LINK = PurePosixPath("etc/systemd/system/multi-user.target.wants/sidetrace.service")
CONFIG_PATH = PurePosixPath("etc/sidetrace/sidetrace.toml")
# StateDirectory= with DynamicUser=yes keeps the data in /var/lib/private and links /var/lib/sidetrace to it.
STATE_PATHS = (PurePosixPath("var/lib/sidetrace"), PurePosixPath("var/lib/private/sidetrace"))
# The command the shipped unit runs (the README's old venv layout); install-service replaces it.
SHIPPED_COMMAND = "/opt/sidetrace/bin/sidetrace "

# What the shipped unit hides from the service, and the directive that does it.
_HIDDEN = (
    (("/home", "/root", "/run/user"), "ProtectHome=yes hides /home, /root and /run/user from the service"),
    (("/tmp", "/var/tmp"), "PrivateTmp=yes gives the service an empty /tmp and /var/tmp of its own"),
)


class ServiceError(Exception):
    """A refusal to install: what is wrong and what to do instead."""


@dataclass
class Plan:
    """What install-service or uninstall-service did (or, with --dry-run, would do), as lines to print."""

    actions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)


def packaged(name: str) -> bytes:
    """A file the wheel carries under sidetrace/_data/ (``sidetrace.service``, ``dashboards/grafana/...``)."""
    return resources.files("sidetrace").joinpath("_data", *name.split("/")).read_bytes()


def hidden_reason(path: str) -> str | None:
    """Why a service run by the shipped unit cannot reach ``path``, or None when it can."""
    pure = PurePosixPath(os.path.normpath(path))
    for roots, reason in _HIDDEN:
        for root in roots:
            if pure == PurePosixPath(root) or PurePosixPath(root) in pure.parents:
                return reason
    return None


def _probe(python: str) -> tuple[list[str], str | None]:
    """The interpreter's prefixes, and why it cannot run the agent (None when it can)."""
    code = "import sys; print(sys.prefix); print(sys.base_prefix); sys.stdout.flush(); import sidetrace.agent.daemon"
    try:
        # -I: the service sees neither PYTHONPATH nor the user's site-packages, so the probe must not either.
        done = subprocess.run([python, "-I", "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"cannot run it: {exc}"
    prefixes = done.stdout.splitlines()[:2]
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["exit status " + str(done.returncode)])[-1]
        return prefixes, f"it cannot import the agent ({last})"
    return prefixes, None


def check_interpreter(python: str) -> list[str]:
    """Warnings about ``python`` as the service's interpreter; raises ServiceError when the service cannot reach it."""
    if not os.path.isabs(python):
        raise ServiceError(f"--python {python}: give an absolute path (the unit's ExecStart needs one)")
    if any(ch.isspace() for ch in python) or "%" in python:
        raise ServiceError(f"--python {python}: the path has a space or '%', which ExecStart would split or expand; "
                           "install sidetrace under a path without them")
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise ServiceError(f"--python {python}: no executable there; give the interpreter sidetrace is installed in")
    prefixes, problem = _probe(python)
    for path in dict.fromkeys([python, os.path.realpath(python), *prefixes]):
        reason = hidden_reason(path)
        if reason:
            raise ServiceError(
                f"--python {python}: the service cannot reach {path}: {reason}. Install sidetrace with a system "
                "Python outside those directories (python3 -m venv /opt/sidetrace, or pipx with PIPX_HOME=/opt/pipx) "
                "and run install-service with it, or pass --python")
    if problem:
        return [f"{python}: {problem}; install it there ({python} -m pip install 'sidetrace[agent]') before "
                "starting the service"]
    return []


def render_unit(python: str) -> str:
    """The shipped unit, running the agent with ``python``."""
    shipped = packaged("sidetrace.service").decode()
    if shipped.count(SHIPPED_COMMAND) != 2:
        raise ServiceError(f"the packaged sidetrace.service no longer runs {SHIPPED_COMMAND.strip()} in ExecStartPre "
                           "and ExecStart; this is a packaging bug, please report it")
    header = f"# Written by `sidetrace install-service --python {python}`; re-run it after moving the interpreter.\n"
    return header + shipped.replace(SHIPPED_COMMAND, f"{python} -m sidetrace ")


def _write(target: Path, content: bytes, dry_run: bool) -> None:
    if dry_run:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.new")
    temporary.write_bytes(content)
    temporary.chmod(0o644)  # the dynamic user reads the config; neither holds a secret by default
    temporary.replace(target)


def install(root: Path, python: str, dry_run: bool = False) -> Plan:
    """Writes the unit (replacing an older one) and the default config (only when absent) under ``root``."""
    plan = Plan(warnings=check_interpreter(python))
    unit = root / UNIT_PATH
    content = render_unit(python).encode()
    previous = unit.read_bytes() if unit.exists() else None
    verb = "would write" if dry_run else "wrote"
    if previous == content:
        plan.actions.append(f"unchanged: {unit}")
    else:
        _write(unit, content, dry_run)
        plan.actions.append(f"{verb} {unit}" + ("" if previous is None else " (replacing a different one)"))
    config = root / CONFIG_PATH
    if config.exists():
        plan.actions.append(f"kept: {config} (already there; it is never overwritten)")
    else:
        _write(config, packaged("sidetrace.toml"), dry_run)
        plan.actions.append(f"{verb} {config}")
    check = f"{python} -m sidetrace check-config --config /{CONFIG_PATH}"
    plan.commands = [check, "systemctl daemon-reload", "systemctl enable --now sidetrace"]
    if previous is not None and previous != content:
        plan.commands.append("systemctl restart sidetrace")
    return plan



def _remove_kept_unless_purged(path: Path, what: str, purge: bool, dry_run: bool, plan: Plan, verb: str) -> None:
    """Remove ``path`` (a directory tree, a file or a link) with --purge; without it, say it is kept."""
    if not (path.is_symlink() or path.exists()):
        return
    if not purge:
        plan.actions.append(f"kept: {path} ({what}; --purge removes it)")
        return
    if not dry_run:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)
    plan.actions.append(f"{verb} {path}")

def uninstall(root: Path, purge: bool = False, dry_run: bool = False) -> Plan:
    """Removes the unit and its enablement link, the config when unedited (or always with ``purge``), and with
    ``purge`` the unit's drop-ins (``sidetrace.service.d/``, what ``systemctl edit`` writes) and the state
    directory too."""
    plan = Plan()
    verb = "would remove" if dry_run else "removed"
    for path in (root / WANTS_LINK, root / UNIT_PATH):
        if path.is_symlink() or path.exists():
            if not dry_run:
                path.unlink()
            plan.actions.append(f"{verb} {path}")
    _remove_kept_unless_purged(root / DROP_IN_DIR, "your drop-ins", purge, dry_run, plan, verb)
    config = root / CONFIG_PATH
    if config.exists():
        if purge or config.read_bytes() == packaged("sidetrace.toml"):
            if not dry_run:
                config.unlink()
                try:
                    config.parent.rmdir()
                except OSError as exc:
                    # A directory still holding the operator's files (certificates, credentials) stays.
                    if exc.errno != errno.ENOTEMPTY:
                        raise
            plan.actions.append(f"{verb} {config}")
        else:
            plan.actions.append(f"kept: {config} (edited; --purge removes it)")
    for path in STATE_PATHS:
        _remove_kept_unless_purged(root / path, "the spool", purge, dry_run, plan, verb)
    plan.commands = ["systemctl stop sidetrace", "systemctl daemon-reload"]
    return plan

