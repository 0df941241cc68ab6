"""Typed agent configuration: one TOML file plus ``SIDETRACE_<SECTION>__<KEY>`` overrides.

The dataclasses below are the single source of truth for every key, its default and its
meaning: the loader validates against them, and README's key table is generated from them
(``reference_markdown``) and checked by a test, so the two cannot drift apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import ipaddress
import json
import os
import pwd
import re
import socket
import ssl
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sidetrace._files import DataDirLock, in_use_message, make_private_dirs
from sidetrace._sandbox import SERVICE_CONFIG, describe_owner, hidden_reason, service_ids, unreadable_by_service

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python 3.10
    import tomli as tomllib

ENV_PREFIX = "SIDETRACE_"
ENV_SEPARATOR = "__"
# SIDETRACE_* variables that are not settings: the CLI's config path, the instrumented apps' agent endpoint.
OTHER_VARIABLES = frozenset({"SIDETRACE_CONFIG", "SIDETRACE_AGENT_ENDPOINT"})
LOG_LEVELS = ("debug", "info", "warning", "error")
# Protobuf refuses to encode or decode a message of 2 GiB or more, so no OTLP or remote-write request can be larger.
MAX_PROTOBUF_BYTES = 2**31 - 1


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


def _check_optional_listen(value: str) -> str:
    if value:
        parse_host_port(value)
    return value


def _refuse_other_scheme(value: str, allowed: tuple[str, ...]) -> None:
    """Raise ValueError naming the scheme when ``value`` is a URL of a scheme not in ``allowed``."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", value)
    if match is not None and match.group(1).lower() not in allowed:
        raise ValueError(f"expected {' or '.join(f'{scheme}://' for scheme in allowed)}, "
                         f"the {match.group(1)}:// scheme is not supported")


def _check_url_port(authority: str) -> None:
    """Raise ValueError unless the port of a URL's ``authority`` (HOST, HOST:PORT, [IPv6]:PORT, user@...) is absent
    or from 1 to 65535: gRPC would take 99999 modulo 65536 and dial port 34463."""
    match = re.fullmatch(r"(?:[^@]*@)?(\[[^\]]*\]|[^:\[\]]*)(?::(.*))?", authority)
    if match is None:
        raise ValueError(f'expected HOST or HOST:PORT in the URL ("{authority}" is not)')
    port = match.group(2)
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f'expected a port from 1 to 65535 in the URL ("{port}" is not)')


def _check_endpoint(value: str) -> str:
    _refuse_other_scheme(value, ("http", "https"))
    match = re.fullmatch(r"(?:(https?)://)?([^/\s]+?)(/.*)?", value)
    if not value or match is None:
        raise ValueError("expected an endpoint such as http://jaeger:4317 or https://jaeger:4318")
    if match.group(1) is None:
        parse_host_port(match.group(2))  # taken as http:// (plain text), and warned of: see _scheme_warnings
    else:
        _check_url_port(match.group(2))
    return value


def _check_choice(*choices: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return check


def _check_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
        raise ValueError("expected a name of 1 to 64 letters, digits, '_', '.' or '-'")
    return value


def _check_data_dir(value: str) -> str:
    if not value.strip():
        raise ValueError("expected a directory (an empty value would put the lock and the spool in whatever "
                         "directory the agent was started in)")
    return value


_DATA_DIR_VARIABLE = re.compile(r"\$(?:\{([^}]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def resolve_data_dir(value: str, env: Mapping[str, str] | None = None) -> Path:
    """``agent.data_dir`` with ``$VAR``/``${VAR}`` and a leading ``~`` or ``~user`` expanded.

    Raises ValueError (one line) for an empty value, an unset variable (``os.path.expandvars`` would leave it in
    the path literally) or a ``~`` with no home directory to stand for (``Path.expanduser`` raises RuntimeError).
    """
    env = os.environ if env is None else env
    _check_data_dir(value)

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) if match.group(1) is not None else match.group(2)
        if name not in env:
            raise ValueError(f"${name} is not set in the agent's environment; set it (systemd: Environment= or "
                             "EnvironmentFile=) or take it out of the value")
        return env[name]

    expanded = _DATA_DIR_VARIABLE.sub(replace, value)
    if not expanded.strip():
        raise ValueError(f'"{value}" expands to an empty value')
    if expanded.startswith("~"):
        user, slash, rest = expanded[1:].partition("/")
        if user:
            try:
                home = pwd.getpwnam(user).pw_dir
            except KeyError:
                raise ValueError(f'"~{user}" names no user of this host; use an absolute path') from None
        else:
            home = env.get("HOME", "")
            if not home:
                try:
                    home = pwd.getpwuid(os.getuid()).pw_dir
                except KeyError:
                    raise ValueError(f'"~" has no home directory to stand for: HOME is not set and uid {os.getuid()} '
                                     "has no passwd entry; use an absolute path") from None
        expanded = home.rstrip("/") + "/" + rest if slash or rest else home
    return Path(expanded)


def _check_log_level(value: str) -> str:
    if value.lower() not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
    return value.lower()


def _check_positive(value: float) -> float:
    if value <= 0:
        raise ValueError("expected a number greater than 0")
    return value


def _check_non_negative(value: float) -> float:
    if value < 0:
        raise ValueError("expected a number of at least 0")
    return value


def _check_regexes(value: tuple[str, ...]) -> tuple[str, ...]:
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"expected regular expressions, {pattern!r} does not compile: {exc}") from None
    return value


@dataclass(frozen=True)
class ListenerTlsSection:
    """TLS for a listener: setting cert_file and key_file turns it on."""

    cert_file: str = _key("PEM certificate chain; with key_file, the listener serves TLS only.", default="")
    key_file: str = _key("PEM private key matching cert_file.", default="")


@dataclass(frozen=True)
class ClientTlsSection:
    """TLS for an exporter's connection (used with an https:// endpoint)."""

    ca_file: str = _key("PEM CA bundle that signs the backend's certificate (empty: the system's).", default="")
    cert_file: str = _key("PEM client certificate, for mutual TLS.", default="")
    key_file: str = _key("PEM key of cert_file.", default="")
    insecure_skip_verify: bool = _key("Do not verify the backend's certificate (testing only).", default=False)


@dataclass(frozen=True)
class AgentSection:
    """[agent]: process-wide settings."""

    data_dir: str = _key(
        "Directory for the agent's state (spool, caches); created with mode 0700 at start. "
        "`~` and `$VARS` are expanded (an unset variable is an error); the shipped `sidetrace.toml` sets "
        "`/var/lib/sidetrace`.",
        _check_data_dir,
        default="~/.local/state/sidetrace",
    )
    log_level: str = _key(
        "One of debug, info, warning, error. Logs go to stderr, one line per event.",
        _check_log_level,
        default="info",
    )
    log_format: str = _key(
        "`text` (one line per event, for people) or `json` (one JSON object per line with time, level, logger, "
        "message and the event's structured fields, for journald readers and log shippers).",
        _check_choice("text", "json"),
        default="text",
    )


@dataclass(frozen=True)
class ServerSection:
    """[server]: the HTTP endpoint for /metrics, /healthz, /readyz and /debug."""

    listen: str = _key(
        "HOST:PORT for /metrics, /healthz, /readyz and /debug/status (`[::1]:PORT` for IPv6).",
        _check_listen,
        default="127.0.0.1:9464",
    )
    auth_token: str = _key("When set, /debug/* requires `Authorization: Bearer <token>` (/metrics and health "
                           "stay open).", default="")
    tls: ListenerTlsSection = field(default_factory=ListenerTlsSection)


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
class OtlpReceiverSection:
    """[receivers.otlp]: OTLP/gRPC and OTLP/HTTP for traces and metrics from the apps on this host."""

    enabled: bool = _key("Receive OTLP.", default=True)
    grpc_listen: str = _key("HOST:PORT for OTLP/gRPC; empty turns gRPC off.", _check_optional_listen,
                            default="127.0.0.1:4317")
    http_listen: str = _key("HOST:PORT for OTLP/HTTP (/v1/traces, /v1/metrics); empty turns HTTP off.",
                            _check_optional_listen, default="127.0.0.1:4318")
    max_request_bytes: int = _key("Largest request body accepted (after decompression); larger ones get 413 or "
                                  "RESOURCE_EXHAUSTED. At most 2 GiB - 1 (protobuf's limit).", _check_positive,
                                  default=4 * 1024 * 1024)
    auth_token: str = _key("When set, requests must carry `Authorization: Bearer <token>`.", default="")
    read_timeout_seconds: float = _key("A request whose body (HTTP) or message (gRPC) has not arrived in full this "
                                       "long after it began is refused (408 / DEADLINE_EXCEEDED) and counted.",
                                       _check_positive, default=10.0)
    idle_timeout_seconds: float = _key("An HTTP connection that sends no complete request for this long is closed; "
                                       "a gRPC connection idle this long is sent away.", _check_positive,
                                       default=60.0)
    tls: ListenerTlsSection = field(default_factory=ListenerTlsSection)


@dataclass(frozen=True)
class ReceiversSection:
    otlp: OtlpReceiverSection = field(default_factory=OtlpReceiverSection)


@dataclass(frozen=True)
class SpoolSection:
    """[spool]: the durable queue (SQLite, WAL) between receivers and exporters, under agent.data_dir."""

    max_bytes: int = _key("Bound on queued span data as stored (large requests LZ4-compressed); when full the "
                          "oldest batches are dropped and counted.",
                          _check_positive, default=512 * 1024 * 1024)
    sync: str = _key("`full`: fsync before acknowledging (survives power loss); `normal`: survives a crash of "
                     "the agent, not of the host.", _check_choice("full", "normal"), default="full")
    max_pending_bytes: int = _key("Bytes accepted but not yet written; past it receivers refuse with a "
                                  "retryable error (HTTP 429 / gRPC UNAVAILABLE). At least "
                                  "receivers.otlp.max_request_bytes.", _check_positive,
                                  default=64 * 1024 * 1024)


@dataclass(frozen=True)
class OtlpExporterSection:
    """One [[exporters.otlp]] table: an OTLP backend such as Jaeger."""

    name: str = _key("Unique name; used in metrics and as the spool cursor's key.", _check_name, default="jaeger")
    endpoint: str = _key("`http://host:4317` (grpc) or `http://host:4318` (http, /v1/traces is added); "
                         "`https://` turns TLS on (tls.* apply only then; set otherwise, they are warned of). "
                         "`host:4317` alone is taken as `http://` (plain text) and warned of.",
                         _check_endpoint, default="http://127.0.0.1:4317")
    protocol: str = _key("`grpc` or `http` (protobuf).", _check_choice("grpc", "http"), default="grpc")
    headers: dict[str, str] = _key("Extra request headers; `${VAR}` in a value is read from the environment "
                                   "(unset: an error).", default_factory=dict)
    compression: str = _key("`gzip` or `none`.", _check_choice("gzip", "none"), default="gzip")
    timeout_seconds: float = _key("Deadline of one export request.", _check_positive, default=10.0)
    max_batch_spans: int = _key("Most spans sent in one request (spooled batches are joined up to it).",
                                _check_positive, default=8192)
    max_request_bytes: int = _key("Largest request sent: batches are joined up to it, a larger batch is split by "
                                  "spans (gRPC servers take 4 MiB by default). At most 2 GiB - 1 (protobuf's limit).",
                                  _check_positive,
                                  default=4 * 1024 * 1024)
    batch_timeout_seconds: float = _key("How long a request short of max_batch_spans waits for more spans "
                                        "(the data waits on disk); 0 sends at once.", _check_non_negative,
                                        default=0.2)
    tls: ClientTlsSection = field(default_factory=ClientTlsSection)


def _check_host_ports(values: tuple[str, ...]) -> tuple[str, ...]:
    bad = []
    for value in values:
        try:
            parse_host_port(value)
        except ValueError:
            bad.append(f'"{value}"')
    if bad:
        raise ValueError(f"expected HOST:PORT entries, {', '.join(bad)} {'is not one' if len(bad) == 1 else 'are not'}")
    return values


def _check_interval(value: float) -> float:
    if value < 0.1:
        raise ValueError("expected at least 0.1 (seconds)")
    return value


_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _check_label_names(labels: dict[str, str]) -> dict[str, str]:
    bad = [name for name in labels if not _LABEL_NAME.fullmatch(name) or name.startswith("__")]
    if bad:
        raise ValueError(f"expected Prometheus label names ([a-zA-Z_][a-zA-Z0-9_]*, not starting with __), "
                         f"got {', '.join(map(repr, bad))}")
    return labels


def _check_optional_host_port(value: str) -> str:
    if value:
        parse_host_port(value)
    return value


def _check_dns_server(value: str) -> str:
    """An IP address and a port: the resolver asks the server by address (a name would need a resolver itself)."""
    if value:
        try:
            host, _ = parse_host_port(value)
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError("expected IP:PORT, an IPv4 address or an IPv6 one in brackets with a port "
                             "(127.0.0.1:53, [::1]:53): the DNS server is asked by address, not by name") from None
    return value


@dataclass(frozen=True)
class BackendTlsSection(ClientTlsSection):
    """TLS for the connections to a load-balancing exporter's backends."""

    enabled: bool = _key("Connect to the backends with TLS.", default=False)


@dataclass(frozen=True)
class LoadBalancingExporterSection:
    """One [[exporters.loadbalancing]] table: spans routed by trace id (or service) over a set of OTLP
    backends, such as a tier of collectors with tail sampling, so that each trace reaches one of them whole."""

    name: str = _key("Unique name; used in metrics and spool cursors (each backend's share is `NAME/HOST:PORT`).",
                     _check_name, default="loadbalancing")
    routing_key: str = _key("`traceID`: every span of a trace goes to the same backend; `service`: every span of "
                            "a service does.", _check_choice("traceID", "service"), default="traceID")
    backends: tuple[str, ...] = _key("HOST:PORT of each backend (a static list); set this or `dns`.",
                                     _check_host_ports, default=())
    dns: str = _key("HOST:PORT: every address HOST resolves to (A and AAAA) is a backend on PORT, re-resolved "
                    "every dns_interval_seconds (a headless Service's name, say); set this or `backends`.",
                    _check_optional_host_port, default="")
    dns_interval_seconds: float = _key("How often `dns` is resolved again (at least 0.1).", _check_interval,
                                       default=5.0)
    dns_server: str = _key("IP:PORT of the DNS server to ask for `dns` (an IPv6 address in brackets: `[::1]:53`); "
                           "empty: the system's resolver.", _check_dns_server, default="")
    protocol: str = _key("`grpc` or `http` (protobuf, to /v1/traces).", _check_choice("grpc", "http"), default="grpc")
    headers: dict[str, str] = _key("Extra request headers; `${VAR}` in a value is read from the environment "
                                   "(unset: an error).", default_factory=dict)
    compression: str = _key("`gzip` or `none`.", _check_choice("gzip", "none"), default="gzip")
    timeout_seconds: float = _key("Deadline of one export request.", _check_positive, default=10.0)
    max_batch_spans: int = _key("Most spans sent to a backend in one request.", _check_positive, default=8192)
    max_request_bytes: int = _key("Largest request sent to a backend; at most 2 GiB - 1 (protobuf's limit).",
                                  _check_positive, default=4 * 1024 * 1024)
    batch_timeout_seconds: float = _key("How long a request short of max_batch_spans waits for more spans.",
                                        _check_non_negative, default=0.2)
    tls: BackendTlsSection = field(default_factory=BackendTlsSection)


def _check_write_url(value: str) -> str:
    _refuse_other_scheme(value, ("http", "https"))
    match = re.fullmatch(r"(https?)://([^/\s]+)(/\S*)?", value)
    if match is None:
        raise ValueError("expected an http:// or https:// URL such as http://prometheus:9090/api/v1/write")
    _check_url_port(match.group(2))
    return value


@dataclass(frozen=True)
class RemoteWriteExporterSection:
    """One [[exporters.remote_write]] table: the agent's metrics pushed with Prometheus remote-write 1.0 to a
    store such as Prometheus, Mimir, Thanos, Cortex or VictoriaMetrics."""

    name: str = _key("Unique name; used in metrics and as the spool queue's name.", _check_name,
                     default="remote_write")
    url: str = _key("The store's remote-write endpoint (Prometheus: `/api/v1/write`, with "
                    "`--web.enable-remote-write-receiver`; Mimir: `/api/v1/push`).", _check_write_url,
                    default="http://127.0.0.1:9090/api/v1/write")
    interval_seconds: float = _key("How often the agent's metrics are collected and queued (at least 0.1).",
                                   _check_interval,
                                   default=15.0)
    external_labels: dict[str, str] = _key("Labels added to every series (a series' own label wins); `job` "
                                           "(`sidetrace`) and `instance` (the host name) are added unless set here "
                                           "or on the series.", _check_label_names, default_factory=dict)
    headers: dict[str, str] = _key("Extra request headers; `${VAR}` in a value is read from the environment "
                                   "(unset: an error).", default_factory=dict)
    basic_auth_username: str = _key("HTTP basic auth user (with basic_auth_password); empty for none.", default="")
    basic_auth_password: str = _key("HTTP basic auth password; `${VAR}` is read from the environment (unset: an "
                                    "error).", default="")
    bearer_token: str = _key("Sent as `Authorization: Bearer ...`; `${VAR}` is read from the environment "
                             "(unset: an error).",
                             default="")
    timeout_seconds: float = _key("Deadline of one request.", _check_positive, default=10.0)
    max_samples_per_request: int = _key("Most samples in one request (queued collections are joined up to it).",
                                        _check_positive, default=5000)
    max_request_bytes: int = _key("Largest request, before compression; at most 2 GiB - 1 (protobuf's limit).",
                                  _check_positive, default=4 * 1024 * 1024)
    tls: ClientTlsSection = field(default_factory=ClientTlsSection)


@dataclass(frozen=True)
class ExportersSection:
    otlp: tuple[OtlpExporterSection, ...] = _key("OTLP exporters; none by default.", default=())
    loadbalancing: tuple[LoadBalancingExporterSection, ...] = _key(
        "Load-balancing exporters over a tier of OTLP backends; none by default.", default=())
    remote_write: tuple[RemoteWriteExporterSection, ...] = _key(
        "Prometheus remote-write exporters of the agent's metrics; none by default.", default=())


@dataclass(frozen=True)
class ResourceProcessorSection:
    """[processors.resource]: host.name, host.id, os.type, the agent's version, container id."""

    enabled: bool = _key("Add host attributes to every resource that lacks them (never overrides the app's).",
                         default=True)
    attributes: dict[str, str] = _key("Extra resource attributes to add when absent.", default_factory=dict)


@dataclass(frozen=True)
class RedactionProcessorSection:
    """[processors.redaction]: replaces sensitive attribute values on spans, events, links and resources."""

    keys: tuple[str, ...] = _key("Attribute keys (case-insensitive, exact) whose values are replaced.",
                                 default=("authorization", "cookie", "set-cookie", "http.request.header.authorization",
                                          "http.request.header.cookie", "http.response.header.set-cookie"))
    key_patterns: tuple[str, ...] = _key("Regexes searched in attribute keys (case-insensitive).", _check_regexes,
                                         default=("passw(or)?d", "secret", "api[-_.]?key",
                                                  "(access|auth|bearer|refresh|session|id)[-_.]?token",
                                                  "private[-_.]?key", "credential"))
    replacement: str = _key("What redacted values become.", default="[REDACTED]")


@dataclass(frozen=True)
class SpanMetricsProcessorSection:
    """[processors.span_metrics]: calls and duration per service, span name, kind and status (Jaeger SPM)."""

    enabled: bool = _key("Derive traces_span_metrics_* from every accepted span.", default=True)
    max_series: int = _key("Most label sets; spans past it count under span_name=\"__overflow__\".",
                           _check_positive, default=2000)


@dataclass(frozen=True)
class ProcessorsSection:
    resource: ResourceProcessorSection = field(default_factory=ResourceProcessorSection)
    redaction: RedactionProcessorSection = field(default_factory=RedactionProcessorSection)
    span_metrics: SpanMetricsProcessorSection = field(default_factory=SpanMetricsProcessorSection)


@dataclass(frozen=True)
class RecentTracesSection:
    """[recent_traces]: the last traces kept in memory for /debug/traces and `sidetrace traces`."""

    max_traces: int = _key("Traces kept; the least recently updated goes first.", _check_positive, default=1000)
    max_spans_per_trace: int = _key("Spans kept per trace; the rest are counted.", _check_positive, default=1000)
    max_spans: int = _key("Spans kept across all traces.", _check_positive, default=50_000)
    max_bytes: int = _key("Bytes of span data kept across all traces (spans are kept as received, encoded: about "
                          "350 bytes a span with 8 to 10 attributes); the oldest requests go first.", _check_positive,
                          default=8 * 1024 * 1024)


@dataclass(frozen=True)
class AppMetricsSection:
    """[app_metrics]: OTLP metrics received from apps, served on /metrics."""

    max_series: int = _key("Most series kept; new ones past it are dropped and counted.", _check_positive,
                           default=20000)
    stale_seconds: float = _key("A series not updated for this long is removed from /metrics (a delta series once "
                                "its app has sent nothing for this long).", _check_positive, default=300.0)


def _check_nats_urls(values: tuple[str, ...]) -> tuple[str, ...]:
    for value in values:
        try:
            _refuse_other_scheme(value, ("nats", "tls", "ws", "wss"))
            for authority in re.sub(r"^[A-Za-z][A-Za-z0-9+.-]*://", "", value).split("/")[0].split(","):
                _check_url_port(authority)
        except ValueError as exc:
            raise ValueError(f'{exc} (in "{value}")') from None
    return values


@dataclass(frozen=True)
class NatsTraceSourceSection:
    """[sources.nats_trace]: NATS server message-trace events (ADR-41) turned into spans."""

    enabled: bool = _key("Subscribe to the servers' message-trace events.", default=False)
    servers: tuple[str, ...] = _key("NATS URLs to connect to.", _check_nats_urls, default=("nats://127.0.0.1:4222",))
    subject: str = _key("Subject the trace events are published to: an account's `msg_trace { dest: ... }` or "
                        "what publishers put in `Nats-Trace-Dest`.", default="sidetrace.msgtrace")
    credentials: str = _key("A NATS .creds file (JWT and NKey seed) to connect with; empty for none.", default="")


def _check_sampling_rate(value: int | str) -> int | str:
    if value == "auto" or (isinstance(value, int) and value >= 1):
        return value
    raise ValueError('expected "auto" or an integer N >= 1 (keep 1 packet in N)')


def _check_bpf_filter(value: str) -> str:
    if any(ch in value for ch in "\n\r\0"):
        raise ValueError("expected a one-line capture filter (tcpdump syntax)")
    return value


@dataclass(frozen=True)
class NetsampleSourceSection:
    """[sources.netsample]: kernel-side 1-in-N packet sampling into flows (needs CAP_NET_RAW)."""

    enabled: bool = _key("Sample the host's packets.", default=False)
    interfaces: tuple[str, ...] = _key("Interfaces to sample; empty means every interface that is up except lo, "
                                       "looked at again every 5 s.", default=())
    sampling_rate: int | str = _key('Keep 1 packet in N, or "auto" to pick N so user space sees about '
                                    "target_samples_per_second.", _check_sampling_rate, default="auto")
    target_samples_per_second: int = _key("With sampling_rate = \"auto\": samples per second aimed at, per "
                                          "interface.", _check_positive, default=1000)
    filter: str = _key("Capture filter in tcpdump syntax applied in the kernel before sampling; empty for all.",
                       _check_bpf_filter, default="")
    max_flows: int = _key("Flow table bound; the least recently seen flow is evicted and counted.",
                          _check_positive, default=10000)
    top_flows: int = _key("Flows exported with their own labels, those with the most bytes in the last 5 s (chosen "
                          "again every 5 s); the rest are summed as remote=\"other\".",
                          _check_positive, default=20)
    max_processes: int = _key("Process names with their own process label in the per-process traffic series (a "
                              "name idle for process_idle_seconds gives its place up); the traffic of later ones "
                              "is counted under process=\"other\" and its samples in "
                              "sidetrace_network_process_overflow_samples_total.", _check_positive, default=100)
    process_idle_seconds: float = _key(
        "How long a process name's per-process series may go without traffic before they leave /metrics and its "
        "place under max_processes is freed; a name that comes back carries on from its counts.",
        _check_positive, default=600.0)
    receive_buffer_bytes: int = _key("Socket receive buffer per interface.", _check_positive,
                                     default=4 * 1024 * 1024)
    gone_interface_grace_seconds: float = _key(
        "With interfaces = []: how long the traffic, packet size, per-process and top-flow series of an interface "
        "that is gone stay on /metrics (dropped at the first housekeeping tick after; 0: at once).",
        _check_non_negative, default=300.0)


@dataclass(frozen=True)
class SourcesSection:
    nats_trace: NatsTraceSourceSection = field(default_factory=NatsTraceSourceSection)
    netsample: NetsampleSourceSection = field(default_factory=NetsampleSourceSection)


@dataclass(frozen=True)
class Config:
    """The whole agent configuration."""

    agent: AgentSection = field(default_factory=AgentSection)
    server: ServerSection = field(default_factory=ServerSection)
    host: HostSection = field(default_factory=HostSection)
    sources: SourcesSection = field(default_factory=SourcesSection)
    receivers: ReceiversSection = field(default_factory=ReceiversSection)
    spool: SpoolSection = field(default_factory=SpoolSection)
    exporters: ExportersSection = field(default_factory=ExportersSection)
    processors: ProcessorsSection = field(default_factory=ProcessorsSection)
    recent_traces: RecentTracesSection = field(default_factory=RecentTracesSection)
    app_metrics: AppMetricsSection = field(default_factory=AppMetricsSection)

    @property
    def data_path(self) -> Path:
        """agent.data_dir expanded (see resolve_data_dir; ``load(verify=True)`` has checked that it expands)."""
        return resolve_data_dir(self.agent.data_dir)


def _hints(cls: type) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _describe(value: typing.Any) -> str:
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


_KIND_NAMES = {int: "an integer", str: "a string", float: "a number", bool: "true or false"}


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
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        for member in typing.get_args(kind):
            try:
                return _coerce(member, value)
            except ValueError:
                continue
        raise ValueError("expected " + " or ".join(_KIND_NAMES.get(m, str(m)) for m in typing.get_args(kind)))
    if typing.get_origin(kind) is dict:
        if isinstance(value, dict) and all(isinstance(item, str) for item in value.values()):
            return dict(value)
        raise ValueError("expected a table of strings")
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
        self.warnings: list[str] = []

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
            item_kind = _table_array_item(kind)
            if item_kind is not None:
                if isinstance(value, list) and all(isinstance(item, dict) for item in value):
                    kwargs[spec.name] = tuple(
                        self.build(item_kind, item, (*path, f"{spec.name}[{index}]"))
                        for index, item in enumerate(value)
                    )
                else:
                    self._problem(here, f"expected an array of tables [[{'.'.join(here)}]], got {_describe(value)}")
                continue
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
        built = cls(**kwargs)
        ignored = [key for key in data if key != "enabled" and key in hints]
        if "enabled" in hints and not getattr(built, "enabled", True) and ignored:
            # The commonest silent mistake: [sources.netsample] filled in, enabled left at its default false.
            origin = self.origins.get((*path, "enabled"), self.default_origin)
            has, them = ("has", "it") if len(ignored) == 1 else ("have", "them")
            self.warnings.append(f"{origin}: {'.'.join(path)}: enabled = false, so {', '.join(ignored)} {has} no "
                                 f"effect; set enabled = true to use {them}, or remove {them}")
        return built


def _table_array_item(kind: typing.Any) -> type | None:
    """The table type of an array of tables (``tuple[Section, ...]``), else None."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) is tuple and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _walk(cls: type, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], typing.Any, dataclasses.Field]]:
    """Yield (path, type, field) for every leaf key of the schema, in declaration order.

    Keys inside an array of tables have a path element ending in ``[]``.
    """
    hints = _hints(cls)
    for spec in dataclasses.fields(cls):
        kind = hints[spec.name]
        item_kind = _table_array_item(kind)
        if item_kind is not None:
            yield from _walk(item_kind, (*path, f"{spec.name}[]"))
        elif dataclasses.is_dataclass(kind):
            yield from _walk(kind, (*path, spec.name))
        else:
            yield (*path, spec.name), kind, spec


def env_name(path: tuple[str, ...]) -> str:
    return ENV_PREFIX + ENV_SEPARATOR.join(part.upper() for part in path)


_ARRAY_KEYS = ("whose keys have no environment variables; set them in the config file (a header or credential value "
               "can read a variable with ${VAR})")


def _unknown_env_reason(name: str) -> str:
    """Why ``name`` sets nothing, with a suggestion only when each of its parts (section, subsection, key) is close
    to a real one at its own level: matched on whole names, the shared prefix and a common key (ENABLED) would make
    any two look alike, so SIDETRACE_BOGUS__X was offered SIDETRACE_HOST__ENABLED."""
    parts = tuple(name[len(ENV_PREFIX):].lower().split(ENV_SEPARATOR))
    schema = [path for path, _, _ in _walk(Config)]
    arrays = {tuple(p.removesuffix("[]") for p in path[: i + 1]) for path in schema
              for i, p in enumerate(path) if p.endswith("[]")}
    paths = [tuple(p.removesuffix("[]") for p in path) for path in schema]
    matched: tuple[str, ...] = ()
    for part in parts:
        below = [path for path in paths if path[: len(matched)] == matched and len(path) > len(matched)]
        if not below:
            break
        children = list(dict.fromkeys(path[len(matched)] for path in below))
        close = part if part in children else next(iter(difflib.get_close_matches(part, children, n=1, cutoff=0.6)),
                                                   None)
        if close is None:
            if not matched:
                sections = ", ".join(child.upper() for child in children)
                return f"unknown setting: no section {part.upper()} (sections: {sections})"
            if all((*matched, child) in arrays for child in children):
                tables = ", ".join(f"[[{'.'.join((*matched, child))}]]" for child in children)
                return f"{tables} are arrays of tables, {_ARRAY_KEYS}"
            if all((*matched, child) not in paths for child in children):  # only subsections here: name them
                return f"unknown setting (known: {', '.join(env_name((*matched, c)) + '__*' for c in children)})"
            return f"unknown setting (known: {', '.join(sorted(env_name(path) for path in below))})"
        matched = (*matched, close)
        if matched in arrays:
            return f"[[{'.'.join(matched)}]] is an array of tables, {_ARRAY_KEYS}"
    if matched in paths and len(matched) == len(parts):
        return f'unknown setting, did you mean "{env_name(matched)}"?'
    return f"unknown setting (known: {', '.join(sorted(env_name(p) for p in paths if p[: len(matched)] == matched))})"


def _apply_env(
    data: dict[str, typing.Any], env: Mapping[str, str], origins: dict[tuple[str, ...], str], problems: list[str]
) -> None:
    leaves = {env_name(path): (path, kind) for path, kind, _ in _walk(Config) if not any("[" in p for p in path)}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or ENV_SEPARATOR not in name:
            continue
        if name not in leaves:
            problems.append(f"environment {name}: {_unknown_env_reason(name)}")
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


def _cross_checks(config: Config, origin: str, reported: list[str]) -> list[str]:
    problems = []
    seen: set[str] = set()
    for kind in (spec.name for spec in dataclasses.fields(ExportersSection)):
        for index, exporter in enumerate(getattr(config.exporters, kind)):
            if exporter.name in seen:
                problems.append(f'{origin}: exporters.{kind}[{index}].name: expected a name unique among all '
                                f'exporters, got "{exporter.name}" again')
            seen.add(exporter.name)
    for index, writer in enumerate(config.exporters.remote_write):
        if writer.tls != ClientTlsSection() and not writer.url.startswith("https://"):
            problems.append(f"{origin}: exporters.remote_write[{index}].tls: TLS files or options are set but the url "
                            f"is not https://, so the store would be reached in plain text; use an https:// url")
        if bool(writer.basic_auth_username) != bool(writer.basic_auth_password):
            problems.append(f"{origin}: exporters.remote_write[{index}]: expected both basic_auth_username and "
                            "basic_auth_password, or neither")
        if writer.bearer_token and writer.basic_auth_username:
            problems.append(f"{origin}: exporters.remote_write[{index}]: expected bearer_token or basic auth, "
                            "not both")
    for index, balancer in enumerate(config.exporters.loadbalancing):
        if balancer.tls != BackendTlsSection() and not balancer.tls.enabled:
            problems.append(f"{origin}: exporters.loadbalancing[{index}].tls: files or options are set but "
                            "tls.enabled is false, so the backends would be reached in plain text; set "
                            "tls.enabled = true, or remove them")
        if bool(balancer.backends) == bool(balancer.dns) and not any(
                f"exporters.loadbalancing[{index}]." in problem for problem in reported):
            problems.append(f"{origin}: exporters.loadbalancing[{index}]: expected either backends or dns, "
                            f"got {'both' if balancer.backends else 'neither'}")
    receiver = config.receivers.otlp
    if receiver.max_request_bytes > config.spool.max_bytes:
        problems.append(f"{origin}: receivers.otlp.max_request_bytes: expected at most spool.max_bytes "
                        f"({config.spool.max_bytes}), got {receiver.max_request_bytes}")
    if receiver.enabled and receiver.max_request_bytes > config.spool.max_pending_bytes:
        # A request larger than the pending bound could never be accepted: the app would retry it forever.
        problems.append(f"{origin}: spool.max_pending_bytes: expected at least receivers.otlp.max_request_bytes "
                        f"({receiver.max_request_bytes}), or every request that large is refused forever; got "
                        f"{config.spool.max_pending_bytes}")
    if receiver.max_request_bytes > MAX_PROTOBUF_BYTES:
        problems.append(f"{origin}: receivers.otlp.max_request_bytes: expected at most {MAX_PROTOBUF_BYTES} (the "
                        f"largest protobuf message, and so OTLP request), got {receiver.max_request_bytes}")
    for kind in (spec.name for spec in dataclasses.fields(ExportersSection)):
        for index, exporter in enumerate(getattr(config.exporters, kind)):
            if exporter.max_request_bytes > MAX_PROTOBUF_BYTES:
                problems.append(f"{origin}: exporters.{kind}[{index}].max_request_bytes: expected at most "
                                f"{MAX_PROTOBUF_BYTES} (the largest protobuf message, and so "
                                f"{'remote-write' if kind == 'remote_write' else 'OTLP'} request), "
                                f"got {exporter.max_request_bytes}")
    problems += _listener_overlaps(config, origin)
    for path, tls in (("server.tls", config.server.tls), ("receivers.otlp.tls", config.receivers.otlp.tls)):
        if bool(tls.cert_file) != bool(tls.key_file):
            problems.append(f"{origin}: {path}: expected both cert_file and key_file, or neither")
    return problems


_ANY = {4: ipaddress.IPv4Address("0.0.0.0"), 6: ipaddress.IPv6Address("::")}


def _bound_addresses(host: str, grpc: bool) -> set[tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """The (IP version, address) pairs a listener on ``host`` takes, as the agent binds them: the HTTP listeners
    (asyncio) make ``::`` an IPv6-only socket, gRPC makes it dual-stack (it takes IPv4's 0.0.0.0 too); a host name
    takes every address it resolves to here (none when it does not resolve: the bind reports that itself)."""
    try:
        addresses = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            addresses = {ipaddress.ip_address(info[4][0].split("%")[0])
                         for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
        except (OSError, UnicodeError, ValueError):
            return set()
    taken = {(address.version, address) for address in addresses}
    if grpc and (6, _ANY[6]) in taken:
        taken.add((4, _ANY[4]))
    return taken


def _overlapping(first: set[tuple[int, typing.Any]], second: set[tuple[int, typing.Any]]) -> bool:
    return any(version == other_version and (address == other or _ANY[version] in (address, other))
               for version, address in first for other_version, other in second)


def _listener_overlaps(config: Config, origin: str) -> list[str]:
    """One line per pair of listeners the agent would open on one port and overlapping addresses: the second bind
    would fail at start (exit 1), so check-config refuses the pair naming both keys."""
    listeners = [("server.listen", config.server.listen, False)]
    if config.receivers.otlp.enabled:
        listeners += [(f"receivers.otlp.{key}", getattr(config.receivers.otlp, key), key == "grpc_listen")
                      for key in ("grpc_listen", "http_listen") if getattr(config.receivers.otlp, key)]
    parsed = []
    for key, value, grpc in listeners:
        try:
            host, port = parse_host_port(value)
        except ValueError:
            continue  # reported by the key's own check
        parsed.append((key, value, port, _bound_addresses(host, grpc)))
    problems = []
    for index, (key, value, port, taken) in enumerate(parsed):
        for other_key, other_value, other_port, other_taken in parsed[:index]:
            if port == other_port and _overlapping(taken, other_taken):
                problems.append(f'{origin}: {key}: "{value}" takes port {port} that {other_key} ("{other_value}") '
                                "already listens on; give each listener its own port")
    return problems


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(value: str, env: Mapping[str, str] | None = None) -> str:
    """``value`` with each ``${NAME}`` replaced by the environment variable NAME (other ``$`` stay as they are).

    Raises ValueError naming a variable that is not set: sent literally, ``Bearer ${TOKEN}`` would only come back
    as a 401 from the backend that names nothing on this host.
    """
    env = os.environ if env is None else env

    def replace(match: re.Match[str]) -> str:
        if match.group(1) not in env:
            raise ValueError(f"${{{match.group(1)}}} is not set in the agent's environment; set it (systemd: "
                             "Environment= or EnvironmentFile=) or take it out of the value")
        return env[match.group(1)]

    return _ENV_REFERENCE.sub(replace, value)


def expanded_values(config: Config) -> Iterator[tuple[str, str]]:
    """(key path, value) of every value the running agent reads ``${VAR}`` in (headers and credentials)."""
    for kind in (spec.name for spec in dataclasses.fields(ExportersSection)):
        for index, exporter in enumerate(getattr(config.exporters, kind)):
            for header, value in exporter.headers.items():
                yield f"exporters.{kind}[{index}].headers.{header}", value
    for index, writer in enumerate(config.exporters.remote_write):
        if writer.bearer_token:
            yield f"exporters.remote_write[{index}].bearer_token", writer.bearer_token
        elif writer.basic_auth_username:
            yield f"exporters.remote_write[{index}].basic_auth_password", writer.basic_auth_password


def _unreadable(path: str) -> str | None:
    """Why the agent's user cannot read the file ``path``, or None when it can."""
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _tls_problems(key: str, tls: ListenerTlsSection | ClientTlsSection, server: bool) -> list[str]:
    """Each TLS file of ``tls`` that the agent could not use, loaded as the running agent loads it."""
    problems = []
    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, name, "")
        why = _unreadable(path) if path else None
        if why is not None:
            problems.append(f'{key}.{name}: cannot read "{path}": {why}')
    if problems:
        return problems
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    if tls.cert_file:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file or None)
        except ssl.SSLError as exc:
            problems.append(f'{key}.cert_file: "{tls.cert_file}" with key_file "{tls.key_file}" is not a PEM '
                            f"certificate and its private key: {exc.reason or exc}")
    ca_file = getattr(tls, "ca_file", "")
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except ssl.SSLError as exc:
            problems.append(f'{key}.ca_file: "{ca_file}" holds no PEM CA certificate: {exc.reason or exc}')
    return problems


def _data_dir_problem(path: Path) -> str | None:
    """Why ``path`` is not, and cannot become, a directory the agent can write in; None when it is or can."""
    if path.exists() and not path.is_dir():
        return f"{path} exists and is not a directory; point agent.data_dir at a directory"
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"cannot create {path}: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        verb = "write in" if existing == path else "create"
        return (f"cannot {verb} {path}: {existing} is not writable by uid {os.geteuid()}; "
                "give the agent's user that directory or choose another")
    if existing != path:
        # os.access says yes to root everywhere, and /proc or /sys refuse mkdir anyway: create the directories as
        # run does, then take away what was created (check-config leaves the host as it found it).
        created = next(p for p in (path, *path.parents) if p.parent == existing)
        try:
            make_private_dirs(path)
        except OSError as exc:
            return f"cannot create {path}: {exc.strerror or exc}"
        finally:
            for directory in (path, *path.parents):
                with contextlib.suppress(OSError):
                    directory.rmdir()
                if directory == created:
                    break
        return None
    holder = DataDirLock(path).holder()
    if holder is not None and holder != str(os.getpid()):  # a reload verifies while this agent holds the lock
        return in_use_message(path, holder)
    return None


def _capture_filter_problem(section: NetsampleSourceSection) -> str | None:
    """Why the sampler could not compile ``section.filter``, or None: compiled as the sampler compiles it, for each
    interface it would sample that this host has (the link type matters), else for lo."""
    try:
        import psutil

        from sidetrace.agent.sources.netsample import bpf
    except ImportError as exc:  # pragma: no cover - an install without the agent extras cannot run netsample
        return f"cannot compile it here: {exc}"
    try:
        present = psutil.net_if_stats()
    except OSError:  # no /proc/net (systemd's ProcSubset=pid): the interfaces are not known, compiled for lo
        present = {}
    devices = [d for d in section.interfaces if d in present] if section.interfaces else \
        [name for name, stats in present.items() if stats.isup and name != "lo"]
    for device in devices or ["lo"]:
        try:
            bpf.compile_filter(section.filter, device)
        except ImportError as exc:  # pragma: no cover - scapy is an agent extra
            return f"cannot compile it here: {exc}"
        except ValueError as exc:
            return str(exc)
    return None


def _tls_in_use(config: Config) -> list[tuple[str, ListenerTlsSection | ClientTlsSection, bool]]:
    """(key path, section, is a listener's) of each TLS section an enabled component loads, as ``run`` loads them."""
    tls: list[tuple[str, ListenerTlsSection | ClientTlsSection, bool]] = []
    if config.server.tls.cert_file:
        tls.append(("server.tls", config.server.tls, True))
    if config.receivers.otlp.enabled and config.receivers.otlp.tls.cert_file:
        tls.append(("receivers.otlp.tls", config.receivers.otlp.tls, True))
    for index, exporter in enumerate(config.exporters.otlp):
        if exporter.endpoint.startswith("https://"):
            tls.append((f"exporters.otlp[{index}].tls", exporter.tls, False))
    for index, balancer in enumerate(config.exporters.loadbalancing):
        if balancer.tls.enabled:
            tls.append((f"exporters.loadbalancing[{index}].tls", balancer.tls, False))
    for index, writer in enumerate(config.exporters.remote_write):
        if writer.url.startswith("https://"):
            tls.append((f"exporters.remote_write[{index}].tls", writer.tls, False))
    return tls


def files_read(config: Config) -> list[tuple[str, str]]:
    """(key path, file) of every file the running agent reads besides its config: the TLS files and NATS
    credentials of enabled components."""
    files = [(f"{key}.{name}", getattr(section, name)) for key, section, _ in _tls_in_use(config)
             for name in ("ca_file", "cert_file", "key_file") if getattr(section, name, "")]
    nats = config.sources.nats_trace
    if nats.enabled and nats.credentials:
        files.append(("sources.nats_trace.credentials", nats.credentials))
    return files


def _service_read_warnings(config: Config, path: str | os.PathLike[str] | None, origin: str) -> list[str]:
    """One line per file the service's dynamic user could not read although this process (root) can: each of
    ``files_read``, and ``path`` when it is the file the unit runs the agent with (a draft elsewhere is not)."""
    unit_config = path is not None and os.path.realpath(path) == f"/{SERVICE_CONFIG}"
    files = ([("", str(path))] if unit_config else []) + files_read(config)
    why = unreadable_by_service([file for _, file in files])
    lines = []
    for key, file in files:
        if file not in why:
            continue
        where = f'{origin}: {key}: "{file}"' if key else f"{origin}: this file"
        if hidden_reason(file) is not None:
            lines.append(f"{where} is out of the service's sight: {why[file]}; move it (under /etc/sidetrace, say)")
            continue
        owner = describe_owner(file)
        lines.append(f"{where} can be read by root but not by the service's dynamic user (uid "
                     f"{service_ids()[0]}): {why[file]}{f' ({owner})' if owner else ''}; give the service read access "
                     "(a group it joins by SupplementaryGroups= in a drop-in, `systemctl edit sidetrace`), or the "
                     "unit's check-config will refuse it")
    return lines


def _host_checks(config: Config, origins: Mapping[tuple[str, ...], str], origin: str,
                 env: Mapping[str, str]) -> list[str]:
    """What the running agent needs from this host besides a valid file: readable TLS and credential files, a
    writable data_dir, every ``${VAR}`` set. Only what an enabled component uses is checked, as ``run`` does."""
    problems = []
    try:
        why = _data_dir_problem(resolve_data_dir(config.agent.data_dir, env))
    except ValueError as exc:
        why = str(exc)
    if why is not None:
        problems.append(f"{origins.get(('agent', 'data_dir'), origin)}: agent.data_dir: {why}")
    for key, section, server in _tls_in_use(config):
        problems += [f"{origin}: {line}" for line in _tls_problems(key, section, server)]  # _attribute: by key
    nats = config.sources.nats_trace
    if nats.enabled and nats.credentials:
        why = _unreadable(nats.credentials)
        if why is not None:
            problems.append(f"{origins.get(('sources', 'nats_trace', 'credentials'), origin)}: "
                            f'sources.nats_trace.credentials: cannot read "{nats.credentials}": {why}')
    netsample = config.sources.netsample
    if netsample.enabled and netsample.filter:
        why = _capture_filter_problem(netsample)
        if why is not None:
            problems.append(f"{origins.get(('sources', 'netsample', 'filter'), origin)}: [sources.netsample] filter: "
                            f"{why}")
    for key, value in expanded_values(config):
        try:
            expand_env(value, env)
        except ValueError as exc:
            problems.append(f"{origin}: {key}: {exc}")
    return problems


def _attribute(lines: list[str], origins: Mapping[tuple[str, ...], str], origin: str) -> list[str]:
    """``lines`` (each "ORIGIN: KEY: ...") with ORIGIN, when it is the file, replaced by the environment variable
    that set KEY: a problem a SIDETRACE_* override caused names the variable, as README promises."""
    attributed = []
    for line in lines:
        if line.startswith(f"{origin}: "):
            key = line[len(origin) + 2:].split(": ", 1)[0]
            where = origins.get(tuple(key.split(".")))
            if where is not None:
                line = f"{where}: {line[len(origin) + 2:]}"
        attributed.append(line)
    return attributed


def load(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None, *,
         verify: bool = False, warnings: list[str] | None = None, as_service: bool = False) -> Config:
    """Read ``path`` (or only the built-in defaults when None) and apply environment overrides.

    Raises ConfigError with one line per problem, each naming the file or variable, the key
    path and what was expected. ``verify`` also checks what the running agent needs from this host
    (``run``, its reload and ``check-config`` all verify, so they judge alike). Lines about keys that
    have no effect (a disabled section's) are appended to ``warnings`` when given. ``as_service`` (check-config)
    also warns, when this process is root, of each file (the config file, TLS files, credentials) the unit's
    dynamic user could not read: root reads them all, so they would pass here and fail under the unit.
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
    problems = env_problems + builder.problems + _attribute(_cross_checks(config, origin, builder.problems),
                                                            origins, origin)
    if verify and not problems:
        problems = _attribute(_host_checks(config, origins, origin, env), origins, origin)
    if problems:
        raise ConfigError(problems)
    if warnings is not None:
        warnings.extend(builder.warnings)
        for index, balancer in enumerate(config.exporters.loadbalancing):
            if balancer.dns_server and not balancer.dns:
                warnings.append(f"{origin}: exporters.loadbalancing[{index}].dns_server: set without dns, so it has "
                                "no effect (static backends are not resolved); remove it, or set dns")
        warnings.extend(_bound_warnings(config, origins, origin))
        warnings.extend(_scheme_warnings(config, origin))
        warnings.extend(_env_warnings(env))
        if verify and as_service and os.geteuid() == 0:
            warnings.extend(_attribute(_service_read_warnings(config, path, origin), origins, origin))
    return config


def _env_warnings(env: Mapping[str, str]) -> list[str]:
    """One line per SIDETRACE_* variable with no "__" (so not read as a setting), naming the setting it most likely
    meant. Warned, not refused: an unrelated variable of that shape must not stop the agent starting."""
    meant: dict[str, str] = {}  # a setting's variable with "__" written "_" -> the variable
    for path, _, _ in _walk(Config):
        if not any("[" in p for p in path):
            meant.setdefault(env_name(path).replace(ENV_SEPARATOR, "_"), env_name(path))
    lines = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or ENV_SEPARATOR in name or name in OTHER_VARIABLES:
            continue
        close = meant.get(name) or next(iter(difflib.get_close_matches(name, meant, n=1, cutoff=0.8)), None)
        hint = f'did you mean {meant.get(close, close)}?' if close else \
            "a setting's variable is SIDETRACE_<SECTION>__<KEY>, with two underscores between the parts"
        lines.append(f"environment {name}: ignored, not a setting (no \"__\" between section and key); {hint}")
    return lines


def _scheme_warnings(config: Config, origin: str) -> list[str]:
    """One line per exporter endpoint written without a scheme, and per exporter whose tls.* settings a plain-text
    endpoint leaves unused. Warned, not refused: earlier versions took `HOST:PORT` as plain text and ignored tls.*
    there, and a config that ran before must not stop starting after an upgrade; but the OpenTelemetry Collector's
    `otlp` exporter and the SDKs' gRPC exporters take `HOST:PORT` as TLS (their `insecure` defaults to false), so an
    operator used to them may believe the connection is encrypted when it is not."""
    lines = []
    for index, exporter in enumerate(config.exporters.otlp):
        endpoint = exporter.endpoint
        if "://" not in endpoint:
            usual = ("where the OpenTelemetry Collector and SDKs take it as TLS" if exporter.protocol == "grpc" else
                     "where the OpenTelemetry Collector and SDKs expect a URL with its scheme")
            lines.append(f"{origin}: exporters.otlp[{index}].endpoint: \"{endpoint}\" has no scheme and is taken as "
                         f"http://{endpoint} (plain text, as earlier versions did), {usual}; write "
                         f"http://{endpoint} or https://{endpoint}")
        if exporter.tls != ClientTlsSection() and not endpoint.startswith("https://"):
            lines.append(f"{origin}: exporters.otlp[{index}].tls: files or options are set but the endpoint "
                         f"\"{endpoint}\" is not https://, so they are not used and the backend is reached in plain "
                         "text; write the endpoint with https://, or remove them")
    return lines


def _bound_warnings(config: Config, origins: Mapping[tuple[str, ...], str], origin: str) -> list[str]:
    """One line per bound that another bound makes unreachable. Warned, not refused: the agent runs correctly with
    them (the smaller bound wins, and what it lets go is counted), so a config that ran before must not stop
    starting after an upgrade; but the operator asked for something the agent cannot give."""
    lines = []
    netsample = config.sources.netsample
    if netsample.enabled and netsample.top_flows > netsample.max_flows:
        where = origins.get(("sources", "netsample", "top_flows"), origin)
        lines.append(f"{where}: sources.netsample.top_flows: {netsample.top_flows} is more than "
                     f"sources.netsample.max_flows ({netsample.max_flows}), so at most {netsample.max_flows} flows "
                     "get their own series; lower top_flows to max_flows or less, or raise max_flows")
    recent = config.recent_traces
    if recent.max_spans_per_trace > recent.max_spans:
        where = origins.get(("recent_traces", "max_spans_per_trace"), origin)
        lines.append(f"{where}: recent_traces.max_spans_per_trace: {recent.max_spans_per_trace} is more than "
                     f"recent_traces.max_spans ({recent.max_spans}), so no trace shows more than {recent.max_spans} "
                     "spans, and a trace cut this way does not say it lost any; lower max_spans_per_trace to "
                     "max_spans or less, or raise max_spans")
    return lines


def reference_markdown() -> str:
    """README's table of every key: section, key, default, environment variable, meaning."""
    rows = ["| key | default | environment | meaning |", "| --- | --- | --- | --- |"]
    for path, _, spec in _walk(Config):
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        if isinstance(default, tuple):
            default = list(default)
        array = next((i for i, part in enumerate(path) if part.endswith("[]")), None)
        if array is None:
            key, env = f"[{'.'.join(path[:-1])}] {path[-1]}", f"`{env_name(path)}`"
        else:
            key, env = f"[[{'.'.join(path[: array + 1])[:-2]}]] {'.'.join(path[array + 1:])}", "(none)"
        rows.append(f"| `{key}` | `{json.dumps(default)}` | {env} | {spec.metadata['doc']} |")
    return "\n".join(rows) + "\n"
