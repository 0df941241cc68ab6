"""The ``sidetrace`` command: argument parsing and printing; the work lives in agent/."""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidetrace import __version__
from sidetrace.config import Config, ConfigError, load

EXIT_UNREACHABLE = 1
EXIT_CONFIG = 2
EXIT_NOT_READY = 3
EXIT_UNAUTHORIZED = 4


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=os.environ.get("SIDETRACE_CONFIG"),
        help="TOML config file (default: $SIDETRACE_CONFIG, else the built-in defaults); "
        "SIDETRACE_<SECTION>__<KEY> variables override it",
    )


def _load_or_report(path: str | None, warnings: list[str]) -> Config | None:
    """The config ``run`` would use, verified against this host (and, as root, against what the service's user can
    read); None after printing why not."""
    try:
        return load(path, verify=True, warnings=warnings, as_service=True)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return None


def _log_format_wanted(path: str | None) -> str:
    """The [agent] log_format a config that failed to load asks for ($SIDETRACE_AGENT__LOG_FORMAT, else the file's
    value when the file is readable TOML), so that its error lines reach a log shipper in that format; "text" when
    neither says "json" (a file that cannot be read or parsed says nothing)."""
    wanted = os.environ.get("SIDETRACE_AGENT__LOG_FORMAT")
    if wanted is None and path is not None:
        from sidetrace.config import tomllib
        try:
            with open(path, "rb") as handle:
                agent = tomllib.load(handle).get("agent")
            wanted = agent.get("log_format") if isinstance(agent, dict) else None
        except (OSError, ValueError):
            wanted = None
    return "json" if wanted == "json" else "text"


def cmd_run(args: argparse.Namespace) -> int:
    warnings: list[str] = []
    try:
        config = load(args.config, verify=True, warnings=warnings)
    except ConfigError as exc:
        if _log_format_wanted(args.config) == "json":
            import logging

            from sidetrace.agent.logs import JsonFormatter
            formatter = JsonFormatter()
            for line in exc.problems:
                record = logging.LogRecord("sidetrace.config", logging.ERROR, __file__, 0, line, (), None)
                print(formatter.format(record), file=sys.stderr)
        else:
            for line in exc.problems:
                print(line, file=sys.stderr)
        return EXIT_CONFIG
    # Imported here so that `version` and `check-config` stay fast and need no agent extras.
    import asyncio
    import logging

    from sidetrace.agent.daemon import Daemon
    from sidetrace.agent.logs import configure_logging

    configure_logging(config.agent.log_level, config.agent.log_format)
    for line in warnings:
        logging.getLogger("sidetrace.config").warning("%s", line)
    return asyncio.run(Daemon(config, args.config).run())


def cmd_check_config(args: argparse.Namespace) -> int:
    warnings: list[str] = []
    config = _load_or_report(args.config, warnings)
    if config is None:
        return EXIT_CONFIG
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    print(f"{args.config or 'built-in defaults'}: OK")
    return 0


def _url_from_config(config: Config) -> str:
    host, _, port = config.server.listen.rpartition(":")
    # A wildcard listener is asked on the loopback of its own family: `[::]` may be an IPv6-only socket.
    host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
    return f"{'https' if config.server.tls.cert_file else 'http'}://{host}:{port}"


def _age(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


_CONTROL = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROL.update({0x9: "\\t", 0xA: "\\n", 0xD: "\\r"})


def printable(text: str) -> str:
    """``text`` with control characters escaped, so a span name cannot drive the operator's terminal."""
    return text.translate(_CONTROL)


def _exporter_row(name: str, state: dict[str, Any]) -> tuple[str, str, str, str]:
    detail = f"sent {state['sent']}, oldest unsent {_age(state['oldest_unsent_age_seconds'])}"
    return (name, state["state"], detail,
            printable(state.get("last_error") or "-") if state["state"] == "failing" else "-")


def render_status(status: dict[str, Any]) -> str:
    """The /debug/status JSON as a table for a person."""
    lines = [
        f"sidetrace {status['version']} (Python {status['python']}, pid {status['pid']}), "
        f"up {_age(status['uptime_seconds'])}, {'ready' if status['ready'] else 'NOT READY'}",
        f"config: {status['config_path'] or 'built-in defaults'}",
    ]
    if status.get("not_ready") and status.get("ready") is False:
        lines.append(f"not ready: {printable('; '.join(status['not_ready']))}")
    if status.get("last_reload_error"):
        lines.append(f"last reload FAILED: {status['last_reload_error']}")
    rows = [("COMPONENT", "STATE", "DETAIL", "LAST ERROR")]
    for name, component in status["components"].items():
        rows.append((name, component["state"], printable(component.get("detail") or ""),
                     printable(component.get("last_error") or "-")))
        for exporter, state in (component.get("exporters") or {}).items():
            rows.append(_exporter_row(f"  exporter {printable(exporter)}", state))
            for backend, backend_state in (state.get("backends") or {}).items():  # a load-balancing exporter's
                rows.append(_exporter_row(f"    backend {printable(backend)}", backend_state))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines.append("")
    for row in rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[3])
    return "\n".join(lines)


class AgentUnreachable(Exception):
    """The running agent could not be asked; the message says where and why."""


class UsageError(Exception):
    """An option the command cannot use (exit 2, as argparse's own usage errors); the message says which."""


class AgentRefused(Exception):
    """The agent answered 401 or 403: the /debug token is missing or wrong."""


@dataclass(frozen=True)
class AgentAddress:
    """Where the running agent answers and how to ask it: from --url/--token, else from --config."""

    base: str
    token: str | None
    ssl_context: ssl.SSLContext | None


def _agent_address(args: argparse.Namespace) -> AgentAddress:
    """The agent's base URL and /debug token: --url and --token win, the config file fills in the rest (its
    server.listen and server.auth_token, with TLS when server.tls is set). Raises ConfigError."""
    config = load(args.config) if args.config or not (args.url and args.token) else None
    url = args.url or (_url_from_config(config) if config else "")
    if "://" not in url:
        url = f"http://{url}"  # `--url 127.0.0.1:9464`, as server.listen is written
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number from 0 to 65535
    except ValueError as exc:
        raise UsageError(f"--url {args.url or url}: not a URL or HOST:PORT the agent can be asked at: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--url {args.url or url}: expected http://HOST:PORT, https://HOST:PORT or HOST:PORT")
    token = args.token or (config.server.auth_token if config else None) or None
    return AgentAddress(url.rstrip("/"), token, _agent_tls(args, parts.scheme, config))


def _agent_tls(args: argparse.Namespace, scheme: str, config: Config | None) -> ssl.SSLContext | None:
    """How to trust an https:// agent: --insecure not at all; else the system's CAs, --cacert, and the config's own
    server.tls.cert_file (a self-signed listener certificate is its own CA). Raises UsageError."""
    if scheme != "https":
        if args.cacert or args.insecure:
            option = "--cacert" if args.cacert else "--insecure"
            raise UsageError(f"{option}: the agent is asked over plain http:// here, so there is no certificate to "
                             "verify; give an https:// --url, or leave the option out")
        return None
    context = ssl.create_default_context()
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if args.cacert:
        try:
            context.load_verify_locations(cafile=args.cacert)
        except ssl.SSLError as exc:  # before OSError, which it is a kind of
            raise UsageError(f"--cacert {args.cacert}: holds no PEM CA certificate: {exc.reason or exc}") from None
        except OSError as exc:
            raise UsageError(f"--cacert {args.cacert}: cannot read: {exc.strerror or exc}") from None
    if config is not None and config.server.tls.cert_file:
        with contextlib.suppress(OSError, ssl.SSLError):  # a self-signed listener certificate is its own CA
            context.load_verify_locations(cafile=config.server.tls.cert_file)
    return context


def _ask(args: argparse.Namespace, agent: AgentAddress, path: str) -> Any:
    """GET ``path`` from the agent as JSON, with the /debug bearer token when there is one."""
    url = agent.base + path
    headers = {"Authorization": f"Bearer {agent.token}"} if agent.token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=args.timeout,
                                    context=agent.ssl_context) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            what = "refused the token" if agent.token else "wants a token"
            raise AgentRefused(f"{url}: HTTP {exc.code}: the agent {what}; pass --token, or --config with the "
                               "agent's config file (its [server] auth_token)") from None
        raise AgentUnreachable(f"{url}: HTTP {exc.code}: {exc.read().decode(errors='replace').strip()}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise AgentUnreachable(_untrusted(args, url, reason)) from None
        if url.startswith("http://") and isinstance(reason, (ConnectionResetError, http.client.BadStatusLine)):
            # A TLS listener drops a plain-text request without an answer.
            raise AgentUnreachable(f"cannot reach the agent at {url}: {reason} (if it serves https, as with "
                                   f"[server.tls], ask {agent.base.replace('http://', 'https://', 1)})") from None
        raise AgentUnreachable(f"cannot reach the agent at {url}: {reason} "
                               "(is it running? pass --url, or --config with its config file)") from None
    except json.JSONDecodeError as exc:
        raise AgentUnreachable(f"{url} did not answer with the agent's JSON: {exc}") from None


def _untrusted(args: argparse.Namespace, url: str, error: ssl.SSLCertVerificationError) -> str:
    """Why an https:// agent's certificate was refused, suggesting only what was not tried already."""
    if error.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
        return (f"{url}: the agent's certificate does not hold the name asked for ({error.verify_message}); ask it "
                "by a name or address its certificate holds (--url), or pass --insecure")
    cacert = getattr(args, "cacert", None)
    hints = [f"--cacert with the CA that signed it ({cacert} does not hold it)" if cacert else
             "--cacert with the CA that signed it (the certificate itself when self-signed)"]
    if not getattr(args, "config", None):
        hints.append("--config with the agent's config file")
    return (f"{url}: the agent's certificate is not trusted here ({error.verify_message}); pass {', '.join(hints)}, "
            "or --insecure")


def _with_agent(command: Callable[[argparse.Namespace, AgentAddress], int]) -> Callable[[argparse.Namespace], int]:
    """Run ``command`` with the agent's address; config, connection and token problems become exit codes."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args, _agent_address(args))
        except ConfigError as exc:
            print("\n".join(exc.problems), file=sys.stderr)
            return EXIT_CONFIG
        except UsageError as exc:
            print(exc, file=sys.stderr)
            return EXIT_CONFIG
        except AgentRefused as exc:
            print(exc, file=sys.stderr)
            return EXIT_UNAUTHORIZED
        except AgentUnreachable as exc:
            print(exc, file=sys.stderr)
            return EXIT_UNREACHABLE

    return run


@_with_agent
def cmd_status(args: argparse.Namespace, agent: AgentAddress) -> int:
    status = _ask(args, agent, "/debug/status")
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(render_status(status))
    return 0 if status.get("ready") else EXIT_NOT_READY


def render_trace(trace: dict[str, Any], width: int = 30) -> str:
    """One trace as an indented tree, each span with its duration and a bar placed on the trace's timeline."""
    spans = trace["spans"]
    by_id = {span["span_id"]: span for span in spans}
    children: dict[str, list[dict[str, Any]]] = {}
    roots = []
    for span in spans:
        if span["parent_span_id"] in by_id:
            children.setdefault(span["parent_span_id"], []).append(span)
        else:
            roots.append(span)
    start = min(span["start_unix_nano"] for span in spans)
    total = max(1, max(span["end_unix_nano"] for span in spans) - start)
    rows: list[tuple[str, dict[str, Any]]] = []

    def walk(span: dict[str, Any], depth: int) -> None:
        rows.append(("  " * (depth + 1) + printable(span["name"]), span))
        for child in sorted(children.get(span["span_id"], []), key=lambda s: s["start_unix_nano"]):
            walk(child, depth + 1)

    for root in sorted(roots, key=lambda s: s["start_unix_nano"]):
        walk(root, 0)
    status = "ERROR" if trace["error"] else "OK"
    lines = [f"trace {printable(trace['trace_id'])}  {printable(trace['root_service'])}: "
             f"{printable(trace['root_name'])}  {trace['span_count']} spans  {trace['duration_ms']:.3f} ms  {status}"]
    name_width = max(len(label) for label, _ in rows)
    service_width = max(len(printable(span["service"])) for span in spans)
    for label, span in rows:
        offset = int((span["start_unix_nano"] - start) / total * width)
        length = max(1, round((span["end_unix_nano"] - span["start_unix_nano"]) / total * width))
        bar = (" " * offset + "#" * length)[:width].ljust(width)
        kind = span["kind"].removeprefix("SPAN_KIND_")
        code = span["status_code"].removeprefix("STATUS_CODE_")
        lines.append(f"{label.ljust(name_width)}  {printable(span['service']).ljust(service_width)}  {kind:<8}  "
                     f"{span['duration_ms']:>10.3f} ms  |{bar}|  {code}")
    if trace.get("spans_dropped"):
        lines.append(f"  ({trace['spans_dropped']} more spans not kept: recent_traces.max_spans_per_trace)")
    return "\n".join(lines)


@_with_agent
def cmd_traces(args: argparse.Namespace, agent: AgentAddress) -> int:
    query = urllib.parse.urlencode({k: v for k, v in (("service", args.service),
                                                      ("min_duration_ms", args.min_duration_ms),
                                                      ("limit", args.limit)) if v is not None})
    if args.trace_id:
        traces = [_ask(args, agent, f"/debug/traces/{args.trace_id}")]
    else:
        summaries = _ask(args, agent, f"/debug/traces?{query}")["traces"]
        traces = [_ask(args, agent, f"/debug/traces/{s['trace_id']}") for s in summaries]
    if not traces:
        print("no recent traces match")
        return 0
    print("\n\n".join(render_trace(trace) for trace in traces))
    return 0


def _rate(bytes_per_second: float) -> str:
    for unit in ("B/s", "KB/s", "MB/s", "GB/s"):
        if bytes_per_second < 1000 or unit == "GB/s":
            return f"{bytes_per_second:.1f} {unit}"
        bytes_per_second /= 1000
    return ""


def render_flows(snapshot: dict[str, Any]) -> str:
    """The /debug/flows JSON as a table: estimated rates, totals with their 95 % bounds, processes."""
    interfaces = ", ".join(f"{name} 1:{info['sampling_rate']} (drops {info['kernel_drops']})"
                           for name, info in snapshot["interfaces"].items())
    rows = [("DEVICE", "DIR", "PROTO", "LOCAL", "REMOTE", "RATE", "PACKETS", "BYTES", "+-95%", "PROCESS")]
    for flow in snapshot["flows"]:
        rows.append((flow["device"], flow["direction"], flow["protocol"], f"{flow['local']}:{flow['local_port']}",
                     f"{flow['remote']}:{flow['remote_port']}", _rate(flow["bytes_per_second"]),
                     str(flow["estimated_packets"]), str(flow["estimated_bytes"]), f"{flow['error_bound_percent']}%",
                     printable(flow["process"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"sampling {interfaces or 'no interface'}; {snapshot['flow_count']} flows, "
             f"{snapshot['evicted_flows']} evicted"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


@_with_agent
def cmd_flows(args: argparse.Namespace, agent: AgentAddress) -> int:
    while True:
        table = render_flows(_ask(args, agent, f"/debug/flows?top={args.top}"))
        if args.once:
            print(table)
            return 0
        print("\033[H\033[2J" + table, flush=True)  # clear the screen, draw from the top
        try:
            time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0


BOOTSTRAP_DIR = Path(__file__).resolve().parent / "instrumentors" / "bootstrap"


def cmd_instrument(args: argparse.Namespace) -> int:
    if args.list:
        return _list_instrumentations()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("sidetrace instrument: give the command to run, e.g. sidetrace instrument -- python app.py",
              file=sys.stderr)
        return EXIT_CONFIG
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BOOTSTRAP_DIR), env.get("PYTHONPATH", "")) if p)
    if args.service:
        env["OTEL_SERVICE_NAME"] = args.service
    if args.endpoint:
        # HOST:PORT is what people type: the agent on its host speaks plain OTLP, where the stock gRPC
        # exporter would take an endpoint without a scheme as one to reach over TLS.
        env["SIDETRACE_AGENT_ENDPOINT"] = args.endpoint if "://" in args.endpoint else f"http://{args.endpoint}"
    # uWSGI forks its workers from C: without this (an option uWSGI also reads from the environment) Python's
    # at-fork hooks never run in them, so the SDK's export threads are not restarted and exit waits on threads
    # that only existed in the master.
    env.setdefault("UWSGI_PY_CALL_OSAFTERFORK", "true")
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        print(f"sidetrace instrument: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127
    return 0  # not reached: exec replaced this process


def _list_instrumentations() -> int:
    from sidetrace.instrumentors.bootstrap import survey

    found = sorted(survey(), key=lambda i: (not i.enabled, i.name))
    width = max((len(i.name) for i in found), default=0)
    for item in found:
        print(f"{'on' if item.enabled else 'skipped':8} {item.name:{width}}  {item.distribution}: {item.reason}")
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    # Imported here: the table of contrib instrumentations is large and only this command needs it.
    from opentelemetry.instrumentation import bootstrap
    from opentelemetry.instrumentation.bootstrap_gen import default_instrumentations, libraries

    wanted = list(bootstrap._find_installed_libraries(default_instrumentations, libraries))
    if not args.install:
        print("\n".join(wanted))
        return 0
    if not wanted:
        return 0
    if subprocess.run([sys.executable, "-m", "pip", "install", *wanted], check=False).returncode == 0:
        return 0
    # One pin pip cannot install (not on the index, not built for this Python) fails the whole call: each is then
    # installed alone, so the others still go in, and each that did not is named.
    print("sidetrace bootstrap: pip could not install them together; installing each alone", file=sys.stderr)
    failed = [package for package in wanted
              if subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", package], check=False).returncode]
    for package in failed:
        print(f"sidetrace bootstrap: not installed: {package} (pip's reason is above)", file=sys.stderr)
    if failed:
        print(f"sidetrace bootstrap: {len(wanted) - len(failed)} of {len(wanted)} installed", file=sys.stderr)
    return 1 if failed else 0


def _print_plan(plan: Any, intro: str) -> None:
    for line in plan.warnings:
        print(f"warning: {line}", file=sys.stderr)
    print("\n".join(plan.actions))
    print(intro)
    print("\n".join(f"  {command}" for command in plan.commands))


def cmd_install_service(args: argparse.Namespace) -> int:
    from sidetrace.agent.service import ServiceError, install

    try:
        plan = install(Path(args.root), args.python, dry_run=args.dry_run)
    except ServiceError as exc:
        print(f"sidetrace install-service: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"sidetrace install-service: cannot write {exc.filename}: {exc.strerror} (run it as root, or pass "
              "--root)", file=sys.stderr)
        return EXIT_UNREACHABLE
    _print_plan(plan, "Then run:" if not args.dry_run else "Nothing written (--dry-run). It would then say to run:")
    return 0


def cmd_uninstall_service(args: argparse.Namespace) -> int:
    from sidetrace.agent.service import uninstall

    try:
        plan = uninstall(Path(args.root), purge=args.purge, dry_run=args.dry_run)
    except OSError as exc:
        print(f"sidetrace uninstall-service: cannot remove {exc.filename}: {exc.strerror} (run it as root, or pass "
              "--root)", file=sys.stderr)
        return EXIT_UNREACHABLE
    _print_plan(plan, "Then run:" if not args.dry_run else "Nothing removed (--dry-run). It would then say to run:")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"sidetrace {__version__} (Python {platform.python_version()})")
    return 0


_EXIT_CODES = "Exit {ok}1 when the agent is unreachable or answers with another HTTP error (such as 404 or 503), 2 " \
    "when the config or an option is invalid, {not_ready}4 when it refuses the token."


def _add_agent_options(parser: argparse.ArgumentParser) -> None:
    """The options of the commands that ask a running agent: where it is and its /debug token."""
    parser.add_argument("--url", help="the agent's base URL, or HOST:PORT (default: from --config's server.listen, "
                        "else http://127.0.0.1:9464)")
    parser.add_argument("--token", default=os.environ.get("SIDETRACE_SERVER__AUTH_TOKEN"),
                        help="bearer token for /debug (default: $SIDETRACE_SERVER__AUTH_TOKEN, else --config's "
                        "[server] auth_token)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the agent (default 5)")
    trust = parser.add_mutually_exclusive_group()
    trust.add_argument("--cacert", metavar="FILE", help="PEM CA bundle that signs an https:// agent's certificate "
                       "(added to the system's CAs; with --config, a self-signed server.tls.cert_file is trusted "
                       "without it)")
    trust.add_argument("--insecure", action="store_true", help="do not verify an https:// agent's certificate")
    _add_config(parser)


def _one_to_1000(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to 1000, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidetrace", description="Observability and tracing sidecar agent.")
    parser.add_argument("--version", action="version",
                        version=f"sidetrace {__version__} (Python {platform.python_version()})")
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
                                 f"(from its /debug/status). "
                                 f"{_EXIT_CODES.format(ok='0 when ready, ', not_ready='3 when it is not ready, ')}")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    _add_agent_options(status)
    status.set_defaults(func=cmd_status)

    traces = commands.add_parser("traces", help="print recent traces as trees",
                                 description="Print the agent's recent traces (newest first) as trees with "
                                 "per-span durations and timeline bars; works without Jaeger. "
                                 f"{_EXIT_CODES.format(ok='0 when answered (ready or not), ', not_ready='')}")
    traces.add_argument("trace_id", nargs="?", help="print only this trace (32 hex digits)")
    traces.add_argument("--service", help="only traces with a span of this service")
    traces.add_argument("--min-duration-ms", type=float, help="only traces at least this long")
    traces.add_argument("--limit", type=_one_to_1000, default=5, help="how many traces, 1 to 1000 (default 5)")
    _add_agent_options(traces)
    traces.set_defaults(func=cmd_traces)

    flows = commands.add_parser("flows", help="live table of the top sampled flows",
                                description="A live, refreshing table of the top flows the netsample source "
                                "estimates: rates, packet and byte totals with their 95 % error bounds, processes. "
                                f"{_EXIT_CODES.format(ok='0 when answered (ready or not), ', not_ready='')}")
    flows.add_argument("--top", type=_one_to_1000, default=20, help="how many flows, 1 to 1000 (default 20)")
    flows.add_argument("--once", action="store_true", help="print once and exit (no screen refresh)")
    flows.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    _add_agent_options(flows)
    flows.set_defaults(func=cmd_flows)

    instrument = commands.add_parser(
        "instrument", help="run a Python app with tracing, no code changes",
        description="Run COMMAND (a Python app) with the OpenTelemetry SDK sending to this host's agent and "
        "every instrumentation whose library is installed switched on (sidetrace's and the "
        "OpenTelemetry contrib ones, found through the opentelemetry_instrumentor entry points). Standard "
        "OTEL_* variables apply; OTEL_PYTHON_DISABLED_INSTRUMENTATIONS switches some off. Needs "
        "'sidetrace[sdk]' (or 'sidetrace[contrib]') in the app's environment.")
    instrument.add_argument("--list", action="store_true", help="print which instrumentations would be switched "
                            "on for this Python, which are skipped and why, and exit")
    instrument.add_argument("--service", help="service.name of the app (sets OTEL_SERVICE_NAME)")
    instrument.add_argument("--endpoint", help="the agent's OTLP/gRPC endpoint (default http://127.0.0.1:4317, "
                            "or $OTEL_EXPORTER_OTLP_ENDPOINT)")
    instrument.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command, e.g. -- python app.py")
    instrument.set_defaults(func=cmd_instrument)

    bootstrap = commands.add_parser(
        "bootstrap", help="list or install the contrib instrumentations for the installed libraries",
        description="Print the OpenTelemetry contrib instrumentation packages that match the libraries installed "
        "in this Python (as opentelemetry-bootstrap does), or install them with --install.")
    bootstrap.add_argument("--install", action="store_true", help="pip install them into this Python")
    bootstrap.set_defaults(func=cmd_bootstrap)

    install = commands.add_parser(
        "install-service", help="install the agent as a systemd service (unit and default config)",
        description="Write /etc/systemd/system/sidetrace.service, running the agent with this Python (or --python), "
        "and /etc/sidetrace/sidetrace.toml when absent; then print the systemctl lines to run. Safe to run again "
        "(after an upgrade, too): the config is never overwritten. Refuses an interpreter the hardened unit cannot "
        "reach (under /home, /root or /tmp). Exit 0 when done, 1 when a file cannot be written, 2 when refused.")
    install.add_argument("--root", default="/", metavar="DIR", help="install under DIR instead of / (for images)")
    install.add_argument("--python", default=sys.executable, metavar="PATH",
                         help=f"the interpreter the service runs (default: this one, {sys.executable}); with --root, "
                         "looked for inside DIR and not run")
    install.add_argument("--dry-run", action="store_true", help="print what would be written; write nothing")
    install.set_defaults(func=cmd_install_service)

    uninstall = commands.add_parser(
        "uninstall-service", help="remove the systemd service; keeps the spool unless --purge",
        description="Remove the unit and its enablement link, and /etc/sidetrace/sidetrace.toml when it is unedited; "
        "keep the state directory (the spool) and an edited config unless --purge. Then print the systemctl lines "
        "to run.")
    uninstall.add_argument("--root", default="/", metavar="DIR", help="uninstall under DIR instead of /")
    uninstall.add_argument("--purge", action="store_true",
                           help="also remove the config and /var/lib/sidetrace (unsent spans are lost)")
    uninstall.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    uninstall.set_defaults(func=cmd_uninstall_service)

    version = commands.add_parser("version", help="print the version", description="Print the version.")
    version.set_defaults(func=cmd_version)
    return parser


EXIT_BROKEN_PIPE = 128 + 13  # what a shell shows for a command ended by SIGPIPE


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (`sidetrace flows | head`): stop quietly, as other command-line tools do. Python
        # would otherwise print a traceback, and another error when it flushes stdout at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
