"""What a benchmark result was measured on: the commit, the date and the machine.

A number means little without these: the same benchmark moves by tens of percent between a quiet
and a busy host (see the README's runtime table), and a result from uncommitted code cannot be
reproduced. Every benchmark that writes JSON puts `run_metadata()` under the key "meta".
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent


def run_metadata() -> dict:
    """Commit (+ whether the tree had uncommitted changes), UTC date, and the machine with its load now."""
    return {
        "commit": _git("rev-parse", "HEAD"),
        "dirty": _dirty(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
    }


def _git(*args: str) -> str | None:
    """git's answer in this repository, or None where there is no git or no repository (an sdist)."""
    try:
        run = subprocess.run(["git", *args], cwd=REPOSITORY, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return run.stdout.strip() if run.returncode == 0 else None


def _dirty() -> bool | None:
    status = _git("status", "--porcelain")
    return None if status is None else bool(status)


def _machine() -> dict:
    machine = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        # 1, 5 and 15 minute load averages, as `uptime` prints them: how busy the host was
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    torch = sys.modules.get("torch")  # only where the benchmark uses torch; never imported here
    if torch is not None:
        machine["torch"] = torch.__version__
        machine["torch_threads"] = torch.get_num_threads()
    return machine


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
