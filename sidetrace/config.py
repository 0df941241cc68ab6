"""Typed agent configuration: one TOML file plus ``SIDETRACE_<SECTION>__<KEY>`` overrides.

The dataclasses below are the single source of truth for every key, its default and its
meaning: the loader validates against them, and README's key table is generated from them
(``reference_markdown``) and checked by a test, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import os
import re
import sys
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

ENV_PREFIX = "SIDETRACE_"
ENV_SEPARATOR = "__"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` holds one printable line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _key(doc: str, check: Callable[[typing.Any], typing.Any] | None = None, **kwargs: typing.Any):
    metadata = {"doc": doc}
    if check is not None:
        metadata["check"] = check
    return field(metadata=metadata, **kwargs)


def parse_host_port(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv6 hosts in brackets) or raise ValueError("expected HOST:PORT")."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", value)
    if match is None:
        raise ValueError("expected HOST:PORT")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 1 <= port <= 65535:
        raise ValueError("expected HOST:PORT with PORT from 1 to 65535")
    if match.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("expected HOST:PORT with a valid IPv6 address in brackets") from None
    return host, port


def _check_listen(value: str) -> str:
    parse_host_port(value)
    return value


def _check_log_level(value: str) -> str:
    if value.lower() not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
    return value.lower()


def _check_positive(value: float) -> float:
    if value <= 0:
        raise ValueError("expected a number greater than 0")
    return value


def _check_regexes(value: tuple[str, ...]) -> tuple[str, ...]:
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"expected regular expressions, {pattern!r} does not compile: {exc}") from None
    return value


@dataclass(frozen=True)
class AgentSection:
    """[agent]: process-wide settings."""

    data_dir: str = _key(
        "Directory for the agent's state (spool, caches); created with mode 0700 at start. "
        "`~` and `$VARS` are expanded; the shipped systemd unit sets `/var/lib/sidetrace`.",
        default="~/.local/state/sidetrace",
    )
    log_level: str = _key(
        "One of debug, info, warning, error. Logs go to stderr, one line per event.",
        _check_log_level,
        default="info",
    )


@dataclass(frozen=True)
class ServerSection:
    """[server]: the HTTP endpoint for /metrics, /healthz, /readyz and /debug."""

    listen: str = _key(
        "HOST:PORT for /metrics, /healthz, /readyz and /debug/status (`[::1]:PORT` for IPv6).",
        _check_listen,
        default="127.0.0.1:9464",
    )


@dataclass(frozen=True)
class HostSection:
    """[host]: CPU, memory, filesystem, disk and network interface metrics from psutil and /proc."""

    enabled: bool = _key("Collect host metrics.", default=True)
    interval_seconds: float = _key(
        "Seconds between two host collections; each scrape serves the latest one.",
        _check_positive,
        default=15.0,
    )
    include_devices: tuple[str, ...] = _key(
        "Regexes (full match) of network interfaces, block devices and filesystem devices to "
        "export; empty means all.",
        _check_regexes,
        default=(),
    )
    exclude_devices: tuple[str, ...] = _key(
        "Regexes (full match) of devices never exported; applied after include_devices.",
        _check_regexes,
        default=(),
    )
    max_devices: int = _key(
        "At most this many devices of each kind (network, disk, filesystem) are exported; the rest "
        "are counted in sidetrace_host_devices_over_limit. Devices already exported keep their place.",
        _check_positive,
        default=64,
    )
    max_routes: int = _key(
        "At most this many routes in system_network_route_info; the rest are counted in "
        "sidetrace_host_routes_over_limit.",
        _check_positive,
        default=256,
    )


@dataclass(frozen=True)
class Config:
    """The whole agent configuration."""

    agent: AgentSection = field(default_factory=AgentSection)
    server: ServerSection = field(default_factory=ServerSection)
    host: HostSection = field(default_factory=HostSection)

    @property
    def data_path(self) -> Path:
        return Path(os.path.expandvars(self.agent.data_dir)).expanduser()


def _hints(cls: type) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _describe(value: typing.Any) -> str:
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


def _coerce(kind: typing.Any, value: typing.Any) -> typing.Any:
    """Return ``value`` as ``kind`` or raise ValueError saying what was expected."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError("expected true or false")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError("expected an integer")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError("expected a number")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ValueError("expected a string")
    if typing.get_origin(kind) is tuple:
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise ValueError("expected an array of strings")
    raise TypeError(f"config.py: unsupported key type {kind!r}")  # a bug in this module


def _from_env_text(kind: typing.Any, text: str) -> typing.Any:
    """Turn an environment variable's text into the TOML value it stands for."""
    if kind is str:
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # _coerce then reports the mismatch with the expected type


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f', did you mean "{close[0]}"?' if close else f" (known: {', '.join(sorted(choices))})"


class _Builder:
    def __init__(self, origins: dict[tuple[str, ...], str], default_origin: str) -> None:
        self.origins = origins
        self.default_origin = default_origin
        self.problems: list[str] = []

    def _problem(self, path: tuple[str, ...], message: str) -> None:
        origin = self.origins.get(path, self.default_origin)
        self.problems.append(f"{origin}: {'.'.join(path)}: {message}")

    def build(self, cls: type, data: Mapping[str, typing.Any], path: tuple[str, ...]) -> typing.Any:
        hints = _hints(cls)
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in hints:
                noun = "section" if isinstance(data[key], dict) else "key"
                self._problem((*path, key), f"unknown {noun}{_suggest(key, known)}")
        kwargs: dict[str, typing.Any] = {}
        for spec in dataclasses.fields(cls):
            if spec.name not in data:
                continue
            kind, value, here = hints[spec.name], data[spec.name], (*path, spec.name)
            if dataclasses.is_dataclass(kind):
                if isinstance(value, dict):
                    kwargs[spec.name] = self.build(kind, value, here)
                else:
                    self._problem(here, f"expected a table [{'.'.join(here)}], got {_describe(value)}")
                continue
            try:
                value = _coerce(kind, value)
                check = spec.metadata.get("check")
                kwargs[spec.name] = check(value) if check else value
            except ValueError as exc:
                self._problem(here, f"{exc}, got {_describe(data[spec.name])}")
        return cls(**kwargs)


def _walk(cls: type, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], typing.Any, dataclasses.Field]]:
    """Yield (path, type, field) for every leaf key of the schema, in declaration order."""
    hints = _hints(cls)
    for spec in dataclasses.fields(cls):
        kind = hints[spec.name]
        if dataclasses.is_dataclass(kind):
            yield from _walk(kind, (*path, spec.name))
        else:
            yield (*path, spec.name), kind, spec


def env_name(path: tuple[str, ...]) -> str:
    return ENV_PREFIX + ENV_SEPARATOR.join(part.upper() for part in path)


def _apply_env(
    data: dict[str, typing.Any], env: Mapping[str, str], origins: dict[tuple[str, ...], str], problems: list[str]
) -> None:
    leaves = {env_name(path): (path, kind) for path, kind, _ in _walk(Config)}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or ENV_SEPARATOR not in name:
            continue
        if name not in leaves:
            problems.append(f"environment {name}: unknown setting{_suggest(name, list(leaves))}")
            continue
        path, kind = leaves[name]
        table = data
        for part in path[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                break
        else:
            table[path[-1]] = _from_env_text(kind, env[name])
            origins[path] = f"environment {name}"


def load(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (or only the built-in defaults when None) and apply environment overrides.

    Raises ConfigError with one line per problem, each naming the file or variable, the key
    path and what was expected.
    """
    env = os.environ if env is None else env
    origin = "defaults" if path is None else str(path)
    data: dict[str, typing.Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError([f"{origin}: file not found"]) from None
        except OSError as exc:
            raise ConfigError([f"{origin}: cannot read: {exc.strerror}"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{origin}: TOML syntax error: {exc}"]) from None
        except UnicodeDecodeError as exc:
            raise ConfigError([f"{origin}: not UTF-8 text: {exc.reason} at byte {exc.start}"]) from None
    origins: dict[tuple[str, ...], str] = {}
    env_problems: list[str] = []
    _apply_env(data, env, origins, env_problems)
    builder = _Builder(origins, origin)
    config = builder.build(Config, data, ())
    problems = env_problems + builder.problems
    if problems:
        raise ConfigError(problems)
    return config


def reference_markdown() -> str:
    """README's table of every key: section, key, default, environment variable, meaning."""
    rows = ["| key | default | environment | meaning |", "| --- | --- | --- | --- |"]
    for path, _, spec in _walk(Config):
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        if isinstance(default, tuple):
            default = list(default)
        rows.append(
            f"| `[{'.'.join(path[:-1])}] {path[-1]}` | `{json.dumps(default)}` | "
            f"`{env_name(path)}` | {spec.metadata['doc']} |"
        )
    return "\n".join(rows) + "\n"
