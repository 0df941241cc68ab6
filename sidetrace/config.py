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
import types
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


def _check_optional_listen(value: str) -> str:
    if value:
        parse_host_port(value)
    return value


def _check_endpoint(value: str) -> str:
    match = re.fullmatch(r"(?:(https?)://)?([^/\s]+?)(/.*)?", value)
    if not value or match is None:
        raise ValueError("expected an endpoint such as http://jaeger:4317 or https://jaeger:4318")
    if match.group(1) is None:
        parse_host_port(match.group(2))
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
                                  "RESOURCE_EXHAUSTED.", _check_positive, default=4 * 1024 * 1024)
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

    max_bytes: int = _key("Bound on queued span data; when full the oldest batches are dropped and counted.",
                          _check_positive, default=512 * 1024 * 1024)
    sync: str = _key("`full`: fsync before acknowledging (survives power loss); `normal`: survives a crash of "
                     "the agent, not of the host.", _check_choice("full", "normal"), default="full")
    max_pending_bytes: int = _key("Bytes accepted but not yet written; past it receivers refuse with a "
                                  "retryable error (HTTP 429 / gRPC UNAVAILABLE).", _check_positive,
                                  default=64 * 1024 * 1024)


@dataclass(frozen=True)
class OtlpExporterSection:
    """One [[exporters.otlp]] table: an OTLP backend such as Jaeger."""

    name: str = _key("Unique name; used in metrics and as the spool cursor's key.", _check_name, default="jaeger")
    endpoint: str = _key("`http://host:4317` (grpc) or `http://host:4318` (http, /v1/traces is added); "
                         "`https://` turns TLS on.", _check_endpoint, default="http://127.0.0.1:4317")
    protocol: str = _key("`grpc` or `http` (protobuf).", _check_choice("grpc", "http"), default="grpc")
    headers: dict[str, str] = _key("Extra request headers; `${VAR}` in a value is read from the environment.",
                                   default_factory=dict)
    compression: str = _key("`gzip` or `none`.", _check_choice("gzip", "none"), default="gzip")
    timeout_seconds: float = _key("Deadline of one export request.", _check_positive, default=10.0)
    max_batch_spans: int = _key("Most spans sent in one request (spooled batches are joined up to it).",
                                _check_positive, default=8192)
    max_request_bytes: int = _key("Largest request sent: batches are joined up to it, a larger batch is split by "
                                  "spans (gRPC servers take 4 MiB by default).", _check_positive,
                                  default=4 * 1024 * 1024)
    batch_timeout_seconds: float = _key("How long a request short of max_batch_spans waits for more spans "
                                        "(the data waits on disk); 0 sends at once.", _check_non_negative,
                                        default=0.2)
    tls: ClientTlsSection = field(default_factory=ClientTlsSection)


def _check_host_ports(values: tuple[str, ...]) -> tuple[str, ...]:
    for value in values:
        try:
            parse_host_port(value)
        except ValueError:
            raise ValueError(f'expected HOST:PORT entries, "{value}" is not one') from None
    return values


def _check_optional_host_port(value: str) -> str:
    if value:
        parse_host_port(value)
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
    dns_interval_seconds: float = _key("How often `dns` is resolved again.", _check_positive, default=5.0)
    dns_server: str = _key("HOST:PORT of the DNS server to ask for `dns`; empty: the system's resolver.",
                           _check_optional_host_port, default="")
    protocol: str = _key("`grpc` or `http` (protobuf, to /v1/traces).", _check_choice("grpc", "http"), default="grpc")
    headers: dict[str, str] = _key("Extra request headers; `${VAR}` in a value is read from the environment.",
                                   default_factory=dict)
    compression: str = _key("`gzip` or `none`.", _check_choice("gzip", "none"), default="gzip")
    timeout_seconds: float = _key("Deadline of one export request.", _check_positive, default=10.0)
    max_batch_spans: int = _key("Most spans sent to a backend in one request.", _check_positive, default=8192)
    max_request_bytes: int = _key("Largest request sent to a backend.", _check_positive, default=4 * 1024 * 1024)
    batch_timeout_seconds: float = _key("How long a request short of max_batch_spans waits for more spans.",
                                        _check_non_negative, default=0.2)
    tls: BackendTlsSection = field(default_factory=BackendTlsSection)


def _check_write_url(value: str) -> str:
    match = re.fullmatch(r"(https?)://([^/\s]+)(/\S*)?", value)
    if match is None:
        raise ValueError("expected an http:// or https:// URL such as http://prometheus:9090/api/v1/write")
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
    interval_seconds: float = _key("How often the agent's metrics are collected and queued.", _check_positive,
                                   default=15.0)
    external_labels: dict[str, str] = _key("Labels added to every series (a series' own label wins); `job` "
                                           "(`sidetrace`) and `instance` (the host name) are added unless set here "
                                           "or on the series.", default_factory=dict)
    headers: dict[str, str] = _key("Extra request headers; `${VAR}` in a value is read from the environment.",
                                   default_factory=dict)
    basic_auth_username: str = _key("HTTP basic auth user (with basic_auth_password); empty for none.", default="")
    basic_auth_password: str = _key("HTTP basic auth password; `${VAR}` is read from the environment.", default="")
    bearer_token: str = _key("Sent as `Authorization: Bearer ...`; `${VAR}` is read from the environment.",
                             default="")
    timeout_seconds: float = _key("Deadline of one request.", _check_positive, default=10.0)
    max_samples_per_request: int = _key("Most samples in one request (queued collections are joined up to it).",
                                        _check_positive, default=5000)
    max_request_bytes: int = _key("Largest request, before compression.", _check_positive, default=4 * 1024 * 1024)
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
    stale_seconds: float = _key("A series not updated for this long is removed from /metrics.", _check_positive,
                                default=300.0)


@dataclass(frozen=True)
class NatsTraceSourceSection:
    """[sources.nats_trace]: NATS server message-trace events (ADR-41) turned into spans."""

    enabled: bool = _key("Subscribe to the servers' message-trace events.", default=False)
    servers: tuple[str, ...] = _key("NATS URLs to connect to.", default=("nats://127.0.0.1:4222",))
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
    interfaces: tuple[str, ...] = _key("Interfaces to sample; empty means every interface that is up except lo.",
                                       default=())
    sampling_rate: int | str = _key('Keep 1 packet in N, or "auto" to pick N so user space sees about '
                                    "target_samples_per_second.", _check_sampling_rate, default="auto")
    target_samples_per_second: int = _key("With sampling_rate = \"auto\": samples per second aimed at, per "
                                          "interface.", _check_positive, default=1000)
    filter: str = _key("Capture filter in tcpdump syntax applied in the kernel before sampling; empty for all.",
                       _check_bpf_filter, default="")
    max_flows: int = _key("Flow table bound; the least recently seen flow is evicted and counted.",
                          _check_positive, default=10000)
    top_flows: int = _key("Flows exported with their own labels; the rest are summed as remote=\"other\".",
                          _check_positive, default=20)
    receive_buffer_bytes: int = _key("Socket receive buffer per interface.", _check_positive,
                                     default=4 * 1024 * 1024)


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
        return Path(os.path.expandvars(self.agent.data_dir)).expanduser()


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
        return cls(**kwargs)


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


def _apply_env(
    data: dict[str, typing.Any], env: Mapping[str, str], origins: dict[tuple[str, ...], str], problems: list[str]
) -> None:
    leaves = {env_name(path): (path, kind) for path, kind, _ in _walk(Config) if not any("[" in p for p in path)}
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


def _cross_checks(config: Config, origin: str) -> list[str]:
    problems = []
    seen: set[str] = set()
    for kind in (spec.name for spec in dataclasses.fields(ExportersSection)):
        for index, exporter in enumerate(getattr(config.exporters, kind)):
            if exporter.name in seen:
                problems.append(f'{origin}: exporters.{kind}[{index}].name: expected a name unique among all '
                                f'exporters, got "{exporter.name}" again')
            seen.add(exporter.name)
    for index, writer in enumerate(config.exporters.remote_write):
        if bool(writer.basic_auth_username) != bool(writer.basic_auth_password):
            problems.append(f"{origin}: exporters.remote_write[{index}]: expected both basic_auth_username and "
                            "basic_auth_password, or neither")
        if writer.bearer_token and writer.basic_auth_username:
            problems.append(f"{origin}: exporters.remote_write[{index}]: expected bearer_token or basic auth, "
                            "not both")
    for index, balancer in enumerate(config.exporters.loadbalancing):
        if bool(balancer.backends) == bool(balancer.dns):
            problems.append(f"{origin}: exporters.loadbalancing[{index}]: expected either backends or dns, "
                            f"got {'both' if balancer.backends else 'neither'}")
    if config.receivers.otlp.max_request_bytes > config.spool.max_bytes:
        problems.append(f"{origin}: receivers.otlp.max_request_bytes: expected at most spool.max_bytes "
                        f"({config.spool.max_bytes}), got {config.receivers.otlp.max_request_bytes}")
    for path, tls in (("server.tls", config.server.tls), ("receivers.otlp.tls", config.receivers.otlp.tls)):
        if bool(tls.cert_file) != bool(tls.key_file):
            problems.append(f"{origin}: {path}: expected both cert_file and key_file, or neither")
    return problems


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
    problems = env_problems + builder.problems + _cross_checks(config, origin)
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
        array = next((i for i, part in enumerate(path) if part.endswith("[]")), None)
        if array is None:
            key, env = f"[{'.'.join(path[:-1])}] {path[-1]}", f"`{env_name(path)}`"
        else:
            key, env = f"[[{'.'.join(path[: array + 1])[:-2]}]] {'.'.join(path[array + 1:])}", "(none)"
        rows.append(f"| `{key}` | `{json.dumps(default)}` | {env} | {spec.metadata['doc']} |")
    return "\n".join(rows) + "\n"
