"""How the instrumentation benchmarks run their conditions: each condition in a fresh worker process,
round after round, the order reversed every other round so that neither warm caches nor machine
drift favour one condition. A worker prints one JSON line last."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path


def alternating_runs(conditions: Sequence[str], rounds: int, command: Callable[[str], list[str]],
                     cwd: Path | None = None) -> dict[str, list[dict]]:
    """The parsed last stdout line of ``command(condition)``, per condition, one per round."""
    runs: dict[str, list[dict]] = {c: [] for c in conditions}
    for round_number in range(rounds):
        order = conditions if round_number % 2 == 0 else tuple(reversed(conditions))
        for condition in order:
            done = subprocess.run(command(condition), cwd=cwd, capture_output=True, text=True, timeout=600,
                                  check=True)
            runs[condition].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return runs


def python_version(python: str) -> str:
    return subprocess.run([python, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True,
                          text=True).stdout.strip()
