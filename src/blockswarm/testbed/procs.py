"""The testbed's processes: started so that they die with the testbed (PR_SET_PDEATHSIG), and
written to a state file so that `blockswarm testbed down` can stop whatever a crash left.

The state directory ($BLOCKSWARM_TESTBED_DIR, default /tmp/blockswarm-testbed) holds one file
per running testbed, each line `PID START_TICKS NAME`; the start time (from /proc) keeps a reused
PID from being taken for ours. The testbed makes no aliases or namespaces (hosts.py), so its
processes are all there is to clean.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

from blockswarm.runtime.launcher import stop_all

PR_SET_PDEATHSIG = 1


def state_dir() -> Path:
    return Path(os.environ.get("BLOCKSWARM_TESTBED_DIR", "/tmp/blockswarm-testbed"))


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22: start time


class Processes:
    """Every process of one testbed, recorded as it starts; `stop` ends them all."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.children: list[tuple[str, subprocess.Popen]] = []
        state_dir().mkdir(parents=True, exist_ok=True)
        self.state = state_dir() / f"testbed-{os.getpid()}.pids"
        self.state.write_text(f"{os.getpid()} {start_ticks(os.getpid())} testbed\n")

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "wb")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, preexec_fn=_die_with_parent,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True)
        log.close()
        self.children.append((name, process))
        with open(self.state, "a") as out:
            out.write(f"{process.pid} {start_ticks(process.pid)} {name}\n")
        return process

    def stop(self, grace_s: float = 5.0) -> None:
        stop_all([process for _, process in reversed(self.children)], grace_s)
        self.state.unlink(missing_ok=True)


def down(out=sys.stdout) -> int:
    """Stop every process a testbed left behind (it crashed or was killed); returns how many."""
    stopped = 0
    directory = state_dir()
    for state in sorted(directory.glob("testbed-*.pids")) if directory.is_dir() else []:
        entries = []
        for line in state.read_text().splitlines():
            pid, ticks, name = line.split(maxsplit=2)
            entries.append((int(pid), None if ticks == "None" else int(ticks), name))
        for pid, ticks, name in entries[1:]:  # the first line is the testbed itself
            if ticks is not None and start_ticks(pid) == ticks:
                os.kill(pid, signal.SIGKILL)
                stopped += 1
                print(f"stopped {name} (pid {pid})", file=out)
        owner, owner_ticks, _ = entries[0]
        if owner_ticks is not None and start_ticks(owner) == owner_ticks and owner != os.getpid():
            print(f"testbed {owner} is still running; its processes were stopped", file=out)
        state.unlink(missing_ok=True)
    return stopped


def our_listeners() -> list[str]:
    """Listening TCP sockets on the testbed's address ranges (hosts.py), from /proc/net/tcp."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state = fields[1], fields[3]
        if state != "0A":  # LISTEN
            continue
        ip_hex, port_hex = local.split(":")
        ip = ".".join(str(int(ip_hex[i:i + 2], 16)) for i in (6, 4, 2, 0))
        if ip.startswith(("127.20.", "127.21.")):
            found.append(f"{ip}:{int(port_hex, 16)}")
    return found
