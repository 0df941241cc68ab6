from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import yaml

from sidetrace.agent.service import hidden_reason, packaged
from sidetrace.agent.systemd import Notifier
from sidetrace.config import load

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_config_is_valid_and_matches_the_unit() -> None:
    config = load(ROOT / "systemd" / "sidetrace.toml", {})
    unit = (ROOT / "systemd" / "sidetrace.service").read_text()
    assert config.agent.data_dir == "/var/lib/sidetrace" and "StateDirectory=sidetrace" in unit
    assert "Type=notify" in unit and "RestartPreventExitStatus=2" in unit
    assert config.host.exclude_devices[0] == "veth.*"


def test_notifier_sends_to_abstract_socket() -> None:
    name = f"sidetrace-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).notify("READY=1")
        assert sock.recv(100) == b"READY=1"


def test_notifier_without_socket_or_for_another_pid_does_nothing() -> None:
    assert Notifier({}).notify("READY=1") is False
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval is None


def test_the_kubernetes_daemonset_carries_a_valid_config_and_the_documented_privileges() -> None:
    manifest = (ROOT / "deploy/kubernetes/sidetrace.yaml").read_text()
    documents = {doc["kind"]: doc for doc in yaml.safe_load_all(manifest)}
    config_file = Path(tempfile.mkdtemp()) / "sidetrace.toml"
    config_file.write_text(documents["ConfigMap"]["data"]["sidetrace.toml"])
    config = load(config_file, env={})
    (balancer,) = config.exporters.loadbalancing
    service = documents["Service"]
    assert service["spec"]["clusterIP"] == "None"  # headless: DNS answers every collector's address
    assert balancer.dns == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:4317"
    pod = documents["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    (agent,) = pod["containers"]
    assert agent["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_RAW"]}
    state = {v["name"]: v for v in pod["volumes"]}["state"]
    assert state["hostPath"]["path"] == config.agent.data_dir
    assert {m["mountPath"] for m in agent["volumeMounts"]} >= {"/etc/sidetrace", config.agent.data_dir}


def test_service_refuses_paths_the_hardened_unit_hides_and_accepts_system_ones() -> None:
    protect_home = "ProtectHome=yes hides /home, /root and /run/user from the service"
    assert hidden_reason("/root/.pyenv/versions/3.11.7/bin/python3.11") == protect_home
    assert hidden_reason("/home/ops/venv/bin/python") == protect_home
    private_tmp = "PrivateTmp=yes gives the service an empty /tmp and /var/tmp of its own"
    assert hidden_reason("/tmp/venv/bin/python") == private_tmp
    assert hidden_reason("/opt/sidetrace/bin/python") is None
    assert hidden_reason("/usr/bin/python3") is None
    assert hidden_reason("/homework/bin/python") is None  # a sibling of /home, not under it


def test_packaged_files_are_the_shipped_ones() -> None:
    assert packaged("sidetrace.service") == (ROOT / "systemd/sidetrace.service").read_bytes()
    assert packaged("sidetrace.toml") == (ROOT / "systemd/sidetrace.toml").read_bytes()
    assert packaged("dashboards/prometheus/rules.yml") == (ROOT / "dashboards/prometheus/rules.yml").read_bytes()


def test_the_kubernetes_receivers_on_the_node_network_take_only_requests_with_the_token() -> None:
    manifest = (ROOT / "deploy/kubernetes/sidetrace.yaml").read_text()
    documents = {doc["kind"]: doc for doc in yaml.safe_load_all(manifest)}
    (agent,) = documents["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item for item in agent["env"]}
    assert env["SIDETRACE_RECEIVERS__OTLP__AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "sidetrace-token",
                                                                                           "key": "token"}
    assert agent["securityContext"]["runAsUser"] == 0  # NET_RAW reaches only a root process in Kubernetes
