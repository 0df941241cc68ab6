"""The ``sidetrace`` command: argument parsing and printing; the work lives in agent/."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import urllib.error
import urllib.request
from typing import Any

from sidetrace import __version__
from sidetrace.config import Config, ConfigError, load

EXIT_CONFIG = 2


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=os.environ.get("SIDETRACE_CONFIG"),
        help="TOML config file (default: $SIDETRACE_CONFIG, else the built-in defaults); "
        "SIDETRACE_<SECTION>__<KEY> variables override it",
    )


def _load_or_report(path: str | None) -> Config | None:
    try:
        return load(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return None


def cmd_run(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    # Imported here so that `version` and `check-config` stay fast and need no agent extras.
    import asyncio

    from sidetrace.agent.daemon import Daemon, configure_logging

    configure_logging(config.agent.log_level)
    return asyncio.run(Daemon(config, args.config).run())


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    print(f"{args.config or 'built-in defaults'}: OK")
    return 0


def _default_status_url(config_path: str | None) -> str:
    config = load(config_path)
    host, _, port = config.server.listen.rpartition(":")
    if host in ("0.0.0.0", "[::]"):
        host = "127.0.0.1"
    return f"http://{host}:{port}"


def _age(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def render_status(status: dict[str, Any]) -> str:
    """The /debug/status JSON as a table for a person."""
    lines = [
        f"sidetrace {status['version']} (Python {status['python']}, pid {status['pid']}), "
        f"up {_age(status['uptime_seconds'])}, {'ready' if status['ready'] else 'NOT READY'}",
        f"config: {status['config_path'] or 'built-in defaults'}",
    ]
    if status.get("last_reload_error"):
        lines.append(f"last reload FAILED: {status['last_reload_error']}")
    rows = [("COMPONENT", "STATE", "DETAIL", "LAST ERROR")]
    for name, component in status["components"].items():
        rows.append((name, component["state"], component.get("detail") or "", component.get("last_error") or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines.append("")
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[3])
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        url = (args.url or _default_status_url(args.config)).rstrip("/") + "/debug/status"
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return EXIT_CONFIG
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            status = json.load(response)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"cannot reach the agent at {url}: {reason} (is it running? pass --url)", file=sys.stderr)
        return 1
    except json.JSONDecodeError as exc:
        print(f"{url} did not answer with the agent's status JSON: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(render_status(status))
    return 0 if status.get("ready") else 3


def cmd_version(args: argparse.Namespace) -> int:
    print(f"sidetrace {__version__} (Python {platform.python_version()})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidetrace", description="Observability and tracing sidecar agent.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser("run", help="run the agent in the foreground", description="Run the agent in the "
                              "foreground until SIGTERM or SIGINT; SIGHUP reloads the config file.")
    _add_config(run)
    run.set_defaults(func=cmd_run)

    check = commands.add_parser("check-config", help="validate a config file (exit 0 valid, 2 invalid)",
                                description="Validate the config and environment overrides without starting "
                                "anything. Exit 0 when valid, 2 when not, with one line per problem.")
    _add_config(check)
    check.set_defaults(func=cmd_check_config)

    status = commands.add_parser("status", help="show a running agent's components",
                                 description="Show a running agent's version, readiness and components "
                                 "(from its /debug/status). Exit 0 when ready, 3 when not ready, 1 when unreachable.")
    status.add_argument("--url", help="the agent's base URL (default: from --config's server.listen, else "
                        "http://127.0.0.1:9464)")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the agent (default 5)")
    _add_config(status)
    status.set_defaults(func=cmd_status)

    version = commands.add_parser("version", help="print the version", description="Print the version.")
    version.set_defaults(func=cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
