"""Start and stop local server processes (the demo, the tests and the benchmarks use it).

Each server is a real `blockswarm serve` process on a free loopback port; readiness is its
READY line on stdout, never a sleep. Leaving the context stops them all, on errors and Ctrl-C too.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time

from blockswarm.core.errors import BlockswarmError
from blockswarm.runtime import forked
from blockswarm.runtime.messages import model_name


def even_spans(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return list(zip(bounds, bounds[1:]))


def serve_command(model: str, start: int, end: int, extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "blockswarm", "serve", "--model", str(model), "--blocks", f"{start}:{end}",
            "--port", "0", *extra]


@contextlib.contextmanager
def local_swarm(model: str, spans: list[tuple[int, int]], extra_args: list[str] = (), timeout_s: float = 180.0):
    """Yields the servers' addresses in span order once every one has printed READY."""
    with server_processes(model, spans, extra_args, timeout_s) as servers:
        yield list(servers)


@contextlib.contextmanager
def server_processes(model: str, spans: list[tuple[int, int]], extra_args: list[str] = (),
                     timeout_s: float = 180.0):
    """Like local_swarm, but yields {address: process} for callers that signal servers (failure tests)."""
    processes = [start(serve_command(model, a, b, list(extra_args))) for a, b in spans]
    try:
        yield {wait_ready(p, timeout_s): p for p in processes}
    finally:
        stop_all(processes)


def coordinator_command(model: str, extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "blockswarm", "coordinator", "--model", model_name(str(model)), "--port", "0",
            *extra]


def member_command(model: str, coordinator: str, memory: str, extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "blockswarm", "serve", "--model", str(model), "--coordinator", coordinator,
            "--memory", memory, "--port", "0", *extra]


def start(command: list[str], stderr=None) -> subprocess.Popen:
    """A blockswarm process whose stdout the launcher reads (READY lines); stderr: inherited, or a file.
    With BLOCKSWARM_FORK_SERVERS=1 a `python -m blockswarm` command is forked from a process that
    imported the runtime once (`forked.py`; the tests do this), otherwise it is a plain subprocess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if forked.wanted(command, stderr):
        return forked.ForkedProcess(command, env, stderr)
    env.pop(forked.ENV, None)  # only the program that set it forks: a demo it starts runs as users run it
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)


@contextlib.contextmanager
def coordinated_swarm(model: str, memories: list[str], coordinator_args: list[str] = (),
                      server_args: list[str] = (), timeout_s: float = 180.0, stderr=None,
                      known_servers=None, coordinator_key=None):
    """A coordinator and one server per memory budget, none told its blocks. Yields (coordinator
    address, {server address: process}, coordinator process) once every server serves its span.
    A private swarm: `known_servers` is written with the coordinator's address and
    `coordinator_key` (its public key file) once its port is known, and handed to the servers."""
    processes = []
    try:
        coordinator = start(coordinator_command(model, list(coordinator_args)), stderr)
        processes.append(coordinator)
        address = wait_ready(coordinator, 30)
        server_args = list(server_args)
        if known_servers is not None:
            with open(known_servers, "w") as out:
                out.write(f"{address} {os.path.abspath(coordinator_key)}\n")
            server_args += ["--known-servers", str(known_servers)]
        servers = [start(member_command(model, address, memory, server_args), stderr) for memory in memories]
        processes.extend(servers)
        yield address, {wait_ready(p, timeout_s): p for p in servers}, coordinator
    finally:
        stop_all(processes[::-1])


def wait_ready(process: subprocess.Popen, timeout_s: float, on_line=None) -> str:
    """The address in the process's READY line. Earlier lines (a coordinated server's JOINED) go
    to `on_line`. Reads the descriptor itself: a buffered readline could swallow the READY line
    behind an earlier one, and select would then wait for data already read."""
    deadline = time.monotonic() + timeout_s
    fd = process.stdout.fileno()
    pending = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 65536)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                if line.startswith("READY "):
                    return line.split()[1]
                if on_line is not None:
                    on_line(line)
            if not chunk and process.poll() is not None:
                break
        elif process.poll() is not None:
            break
    raise BlockswarmError(f"server {' '.join(process.args[-6:])} did not become ready "
                          f"(exit code {process.poll()}); see its messages above")


def stop_all(processes: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout:
            process.stdout.close()
