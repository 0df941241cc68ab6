"""`sidetrace install-service` and `uninstall-service` from the built wheel, installed into a fresh venv, into a
temporary root: the files the wheel carries are the shipped ones, the unit runs the given interpreter, a re-run
changes nothing, and uninstalling keeps the spool unless asked."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = {
    "sidetrace.service": ROOT / "systemd/sidetrace.service",
    "sidetrace.toml": ROOT / "systemd/sidetrace.toml",
    **{f"dashboards/{p.relative_to(ROOT / 'dashboards')}": p for p in (ROOT / "dashboards").rglob("*") if p.is_file()},
}


def run(*command: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout)


def interpreter_in(root: Path, path: str = "/usr/bin/python3") -> Path:
    """A copy of this host's /usr/bin/python3 at ``path`` inside ``root``, as an image would have it."""
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path("/usr/bin/python3").resolve(), target)
    return target


def venv_in(root: Path, home: str) -> None:
    """The layout `python3 -m venv /opt/sidetrace` leaves inside ``root``, its interpreter a link to ``home``'s."""
    (root / "opt/sidetrace/bin").mkdir(parents=True)
    (root / "opt/sidetrace/bin/python").symlink_to(f"{home}/python3")
    (root / "opt/sidetrace/pyvenv.cfg").write_text(f"home = {home}\ninclude-system-site-packages = false\n")


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, sidetrace_wheel: Path) -> Path:
    """A fresh venv with only the built wheel in it (no dependencies: the service commands need none)."""
    work = tmp_path_factory.mktemp("venv")
    # Without pip of its own (ensurepip took seconds): this process's pip installs into it.
    made = run(sys.executable, "-m", "venv", "--without-pip", work / "venv")
    assert made.returncode == 0, made.stderr
    installed = run(sys.executable, "-m", "pip", "--python", work / "venv/bin/python", "install", "-q", "--no-deps",
                    "--no-index", sidetrace_wheel)
    assert installed.returncode == 0, installed.stderr
    return work / "venv"


@pytest.mark.slow
def test_wheel_carries_the_shipped_unit_config_and_dashboards(venv: Path) -> None:
    (package,) = venv.glob("lib/python*/site-packages/sidetrace")
    carried = {str(p.relative_to(package / "_data")): p for p in (package / "_data").rglob("*") if p.is_file()}
    assert sorted(carried) == sorted(SHIPPED)
    for name, path in carried.items():
        assert not path.is_symlink() and path.read_bytes() == SHIPPED[name].read_bytes(), name


@pytest.mark.slow
def test_install_service_refuses_an_interpreter_under_private_tmp(venv: Path, tmp_path: Path) -> None:
    done = run(venv / "bin/sidetrace", "install-service", "--root", tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith(f"sidetrace install-service: --python {venv}/bin/python")
    assert "PrivateTmp=yes gives the service an empty /tmp and /var/tmp of its own" in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_install_service_writes_unit_and_config_once_and_uninstall_keeps_the_spool(venv: Path, tmp_path: Path) -> None:
    sidetrace = venv / "bin/sidetrace"
    unit = tmp_path / "etc/systemd/system/sidetrace.service"
    config = tmp_path / "etc/sidetrace/sidetrace.toml"
    interpreter = interpreter_in(tmp_path)

    dry = run(sidetrace, "install-service", "--root", tmp_path, "--python", "/usr/bin/python3", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[:2] == [f"would write {unit}", f"would write {config}"]
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [interpreter]

    first = run(sidetrace, "install-service", "--root", tmp_path, "--python", "/usr/bin/python3")
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        f"wrote {unit}", f"wrote {config}", "Then run:",
        "  /usr/bin/python3 -m sidetrace check-config --config /etc/sidetrace/sidetrace.toml",
        "  systemctl daemon-reload", "  systemctl enable --now sidetrace"]
    shipped_unit = SHIPPED["sidetrace.service"].read_text()
    assert unit.read_text() == (
        "# Written by `sidetrace install-service --python /usr/bin/python3`; re-run it after moving the interpreter.\n"
        + shipped_unit.replace("/opt/sidetrace/bin/sidetrace ", "/usr/bin/python3 -m sidetrace "))
    assert "\nExecStart=/usr/bin/python3 -m sidetrace run --config /etc/sidetrace/sidetrace.toml\n" in unit.read_text()
    assert config.read_bytes() == SHIPPED["sidetrace.toml"].read_bytes()
    assert unit.stat().st_mode & 0o777 == 0o644 and config.stat().st_mode & 0o777 == 0o644
    verified = run(shutil.which("systemd-analyze") or "systemd-analyze", "verify", unit, timeout=60)
    assert (verified.stdout + verified.stderr).strip() == ""

    stamps = (unit.stat().st_mtime_ns, config.stat().st_mtime_ns)
    again = run(sidetrace, "install-service", "--root", tmp_path, "--python", "/usr/bin/python3")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[:2] == [
        f"unchanged: {unit}", f"kept: {config} (already there; it is never overwritten)"]
    assert (unit.stat().st_mtime_ns, config.stat().st_mtime_ns) == stamps

    # What `systemctl enable` and a first start leave behind: the enablement link and the dynamic user's spool.
    wants = tmp_path / "etc/systemd/system/multi-user.target.wants/sidetrace.service"
    wants.parent.mkdir()
    wants.symlink_to("/etc/systemd/system/sidetrace.service")
    spool = tmp_path / "var/lib/private/sidetrace"
    spool.mkdir(parents=True)
    (spool / "spool.db").write_bytes(b"unsent spans")
    (tmp_path / "var/lib/sidetrace").symlink_to("private/sidetrace")
    # What `systemctl edit sidetrace` leaves: a drop-in, which install-service never rewrites.
    drop_ins = tmp_path / "etc/systemd/system/sidetrace.service.d"
    drop_ins.mkdir()
    (drop_ins / "override.conf").write_text("[Service]\nEnvironment=JAEGER_TOKEN=t\n")

    removed = run(sidetrace, "uninstall-service", "--root", tmp_path)
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.splitlines() == [
        f"removed {wants}", f"removed {unit}", f"kept: {drop_ins} (your drop-ins; --purge removes it)",
        f"removed {config}",
        f"kept: {tmp_path}/var/lib/sidetrace (the spool; --purge removes it)",
        f"kept: {spool} (the spool; --purge removes it)",
        "Then run:", "  systemctl stop sidetrace", "  systemctl daemon-reload"]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "etc", "etc/systemd", "etc/systemd/system", "etc/systemd/system/multi-user.target.wants",
        "etc/systemd/system/sidetrace.service.d", "etc/systemd/system/sidetrace.service.d/override.conf", "usr",
        "usr/bin", "usr/bin/python3", "var", "var/lib", "var/lib/private", "var/lib/private/sidetrace",
        "var/lib/private/sidetrace/spool.db", "var/lib/sidetrace"]

    purged = run(sidetrace, "uninstall-service", "--root", tmp_path, "--purge")
    assert purged.returncode == 0, purged.stderr
    assert not spool.exists() and not (tmp_path / "var/lib/sidetrace").is_symlink()
    assert f"removed {drop_ins}" in purged.stdout.splitlines() and not drop_ins.exists()


@pytest.mark.slow
def test_uninstall_service_keeps_an_edited_config(venv: Path, tmp_path: Path) -> None:
    sidetrace = venv / "bin/sidetrace"
    interpreter_in(tmp_path)
    assert run(sidetrace, "install-service", "--root", tmp_path, "--python", "/usr/bin/python3").returncode == 0
    config = tmp_path / "etc/sidetrace/sidetrace.toml"
    config.write_text(config.read_text().replace('log_level = "info"', 'log_level = "debug"'))
    done = run(sidetrace, "uninstall-service", "--root", tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"kept: {config} (edited; --purge removes it)" in done.stdout.splitlines()
    assert 'log_level = "debug"' in config.read_text()


@pytest.mark.slow
def test_install_service_with_root_looks_for_the_interpreter_inside_the_root(venv: Path, tmp_path: Path) -> None:
    sidetrace = venv / "bin/sidetrace"
    assert not Path("/opt/sidetrace/bin/python").exists()  # on this host: only the image has it
    image = tmp_path / "image"
    interpreter_in(image)
    venv_in(image, "/usr/bin")
    done = run(sidetrace, "install-service", "--root", image, "--python", "/opt/sidetrace/bin/python")
    assert done.returncode == 0, done.stderr
    assert "\nExecStart=/opt/sidetrace/bin/python -m sidetrace run --config /etc/sidetrace/sidetrace.toml\n" in (
        image / "etc/systemd/system/sidetrace.service").read_text()

    empty = tmp_path / "empty"
    empty.mkdir()
    missing = run(sidetrace, "install-service", "--root", empty, "--python", "/usr/bin/python3")  # the host has it
    assert (missing.returncode, missing.stderr) == (2, (
        f"sidetrace install-service: --python /usr/bin/python3: no executable at {empty}/usr/bin/python3 (with "
        f"--root, the interpreter is looked for inside {empty}, where the service will run it); install sidetrace "
        "there first\n"))
    assert list(empty.iterdir()) == []

    # The venv's link names /usr/bin/python3, which this host has and the image does not: looked up in the image.
    dangling = tmp_path / "dangling"
    venv_in(dangling, "/usr/bin")
    refused = run(sidetrace, "install-service", "--root", dangling, "--python", "/opt/sidetrace/bin/python")
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"sidetrace install-service: --python /opt/sidetrace/bin/python: no executable "
                                     f"at {dangling}/opt/sidetrace/bin/python, a link to /usr/bin/python3 there, ")


@pytest.mark.slow
def test_install_service_with_root_refuses_a_venv_whose_base_the_service_cannot_reach(
        venv: Path, tmp_path: Path) -> None:
    pyenv = "/root/.pyenv/versions/3.12.7/bin"
    interpreter_in(tmp_path, f"{pyenv}/python3")
    venv_in(tmp_path, pyenv)
    done = run(venv / "bin/sidetrace", "install-service", "--root", tmp_path, "--python", "/opt/sidetrace/bin/python")
    assert (done.returncode, done.stderr) == (2, (
        f"sidetrace install-service: --python /opt/sidetrace/bin/python: the service cannot reach {pyenv}/python3: "
        "ProtectHome=yes hides /home, /root and /run/user from the service. Install sidetrace with a system Python "
        "outside those directories (python3 -m venv /opt/sidetrace, or pipx with PIPX_HOME=/opt/pipx) and run "
        "install-service with it, or pass --python\n"))
    assert not (tmp_path / "etc").exists()


@pytest.mark.slow
def test_install_service_with_root_follows_the_venv_home_inside_the_root(venv: Path, tmp_path: Path) -> None:
    def copied_venv(root: Path, home: str) -> None:  # `python3 -m venv --copies`: no link to follow to the base
        interpreter_in(root, "/opt/sidetrace/bin/python")
        (root / "opt/sidetrace/pyvenv.cfg").write_text(f"home = {home}\n")

    missing = tmp_path / "missing"
    copied_venv(missing, "/usr/local/python/bin")  # absent from the image
    done = run(venv / "bin/sidetrace", "install-service", "--root", missing, "--python", "/opt/sidetrace/bin/python")
    assert (done.returncode, done.stderr) == (2, (
        "sidetrace install-service: --python /opt/sidetrace/bin/python: its venv's base interpreter directory "
        f"(pyvenv.cfg's home = /usr/local/python/bin) is missing at {missing}/usr/local/python/bin (with --root, it "
        f"is looked for inside {missing}, where the service will run it); install that Python there first, or make "
        "the venv inside the image\n"))
    assert not (missing / "etc").exists()

    linked = tmp_path / "linked"
    copied_venv(linked, "/opt/python/bin")
    (linked / "root/.pyenv/bin").mkdir(parents=True)
    (linked / "opt/python").symlink_to("/root/.pyenv")  # absolute: followed inside the image, not on this host
    done = run(venv / "bin/sidetrace", "install-service", "--root", linked, "--python", "/opt/sidetrace/bin/python")
    assert done.returncode == 2
    assert done.stderr.startswith("sidetrace install-service: --python /opt/sidetrace/bin/python: the service cannot "
                                  "reach /root/.pyenv/bin: ProtectHome=yes hides ")
    assert not (linked / "etc").exists()


@pytest.mark.slow
def test_install_service_with_root_refuses_a_symbolic_link_loop(venv: Path, tmp_path: Path) -> None:
    (tmp_path / "opt/sidetrace/bin").mkdir(parents=True)
    (tmp_path / "opt/sidetrace/bin/python").symlink_to("/opt/sidetrace/bin/python3")
    (tmp_path / "opt/sidetrace/bin/python3").symlink_to("python")
    done = run(venv / "bin/sidetrace", "install-service", "--root", tmp_path, "--python", "/opt/sidetrace/bin/python")
    assert (done.returncode, done.stderr) == (2, (
        f"sidetrace install-service: /opt/sidetrace/bin/python: too many levels of symbolic links under {tmp_path}\n"))
