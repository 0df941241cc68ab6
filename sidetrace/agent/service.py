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

from sidetrace._sandbox import DROP_IN_DIR, SERVICE_CONFIG, UNIT_PATH, hidden_reason

WANTS_LINK = PurePosixPath("etc/systemd/system/multi-user.target.wants/sidetrace.service")
CONFIG_PATH = SERVICE_CONFIG
# StateDirectory= with DynamicUser=yes keeps the data in /var/lib/private and links /var/lib/sidetrace to it.
STATE_PATHS = (PurePosixPath("var/lib/sidetrace"), PurePosixPath("var/lib/private/sidetrace"))
# The command the shipped unit runs (the README's old venv layout); install-service replaces it.
SHIPPED_COMMAND = "/opt/sidetrace/bin/sidetrace "


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


def _hidden_refusal(python: str, path: str) -> ServiceError | None:
    reason = hidden_reason(path)
    if reason is None:
        return None
    return ServiceError(
        f"--python {python}: the service cannot reach {path}: {reason}. Install sidetrace with a system "
        "Python outside those directories (python3 -m venv /opt/sidetrace, or pipx with PIPX_HOME=/opt/pipx) "
        "and run install-service with it, or pass --python")


def inside(root: Path, path: str) -> PurePosixPath:
    """``path`` (absolute) as a system whose / is ``root`` resolves it: each symbolic link followed inside ``root``
    (an absolute target starts again from ``root``, not from this host's /). Raises ServiceError on a loop."""
    pending = list(PurePosixPath(path).parts[1:])
    resolved = PurePosixPath("/")
    links = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            resolved = resolved.parent
            continue
        candidate = resolved / part
        on_host = root / candidate.relative_to("/")
        if not on_host.is_symlink():
            resolved = candidate
            continue
        links += 1
        if links > 40:  # the kernel's own limit (ELOOP)
            raise ServiceError(f"{path}: too many levels of symbolic links under {root}")
        target = PurePosixPath(os.readlink(on_host))
        if target.is_absolute():
            resolved = PurePosixPath("/")
            pending = list(target.parts[1:]) + pending
        else:
            pending = list(target.parts) + pending
    return resolved


def _venv_home(root: Path, python: str) -> str | None:
    """The base interpreter's directory a venv's ``pyvenv.cfg`` names (looked for where Python looks: beside the
    interpreter and one level up), as it reads inside ``root``; None for an interpreter that is not a venv's."""
    for directory in (PurePosixPath(python).parent, PurePosixPath(python).parent.parent):
        config = root / inside(root, str(directory / "pyvenv.cfg")).relative_to("/")
        try:
            lines = config.read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for line in lines:
            key, equals, value = line.partition("=")
            if equals and key.strip() == "home":
                return value.strip()
    return None


def check_interpreter(python: str, root: Path = Path("/")) -> list[str]:
    """Warnings about ``python`` as the service's interpreter; raises ServiceError when the service cannot reach it.

    With a ``root`` other than /, ``python`` is looked for inside it (where the service will run it), symbolic links
    and a venv's base interpreter included, and it is not run: it may be built for another system, and the
    check-config line install-service prints runs it there.
    """
    if not os.path.isabs(python):
        raise ServiceError(f"--python {python}: give an absolute path (the unit's ExecStart needs one)")
    if any(ch.isspace() for ch in python) or "%" in python:
        raise ServiceError(f"--python {python}: the path has a space or '%', which ExecStart would split or expand; "
                           "install sidetrace under a path without them")
    refusal = _hidden_refusal(python, python)
    if refusal is not None:
        raise refusal
    if os.path.realpath(root) != "/":
        resolved = inside(root, python)
        found = root / resolved.relative_to("/")
        if not (found.is_file() and os.access(found, os.X_OK)):
            via = f", a link to {resolved} there," if resolved != PurePosixPath(python) else ""
            raise ServiceError(f"--python {python}: no executable at {root / python.lstrip('/')}{via} (with --root, "
                               f"the interpreter is looked for inside {root}, where the service will run it); "
                               "install sidetrace there first")
        paths = [str(resolved)]
        home = _venv_home(root, python)
        if home is not None:
            home_inside = inside(root, home) if home.startswith("/") else None
            if home_inside is None or not (root / home_inside.relative_to("/")).is_dir():
                link = f", a link to {home_inside} there," if home_inside not in (None, PurePosixPath(home)) else ""
                raise ServiceError(f"--python {python}: its venv's base interpreter directory (pyvenv.cfg's home = "
                                   f"{home}) is missing at {root / home.lstrip('/')}{link} (with --root, it is looked "
                                   f"for inside {root}, where the service will run it); install that Python there "
                                   "first, or make the venv inside the image")
            paths += [home, str(home_inside)]
        for path in paths:
            refusal = _hidden_refusal(python, path)
            if refusal is not None:
                raise refusal
        return []
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        raise ServiceError(f"--python {python}: no executable there; give the interpreter sidetrace is installed in")
    prefixes, problem = _probe(python)
    for path in dict.fromkeys([os.path.realpath(python), *prefixes]):
        refusal = _hidden_refusal(python, path)
        if refusal is not None:
            raise refusal
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
    plan = Plan(warnings=check_interpreter(python, root))
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

