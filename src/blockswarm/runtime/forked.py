"""blockswarm processes forked from one that has imported torch and transformers once.

Why: a `blockswarm serve` process spends ~7 s of CPU importing torch, transformers and
torch._dynamo (pulled in by transformers' masking code) before it does anything, and the slow
tests start well over a hundred of them on two cores. With `BLOCKSWARM_FORK_SERVERS=1` the
launcher asks multiprocessing's fork server, which imported the runtime once, to fork each
process instead: the same CLI in a real process of its own, on its own sockets, started in a
fraction of a second. The tests set it (conftest); everything else starts plain subprocesses.

The fork server has imported modules and nothing more (no torch operation, no thread, no ZeroMQ
context), which is what makes forking it safe. A forked process does not pass the variable on, so
a CLI it runs (the demo) starts its own servers as plain subprocesses.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
from multiprocessing.connection import Connection

ENV = "BLOCKSWARM_FORK_SERVERS"
PRELOAD = ["blockswarm.cli", "blockswarm.runtime.member", "blockswarm.runtime.server",
           "blockswarm.runtime.coordinator.service"]
FORKED = ("serve", "coordinator")  # the processes started by the dozen; the rest stay subprocesses


def wanted(command: list[str], stderr) -> bool:
    """Fork `command` (`python -m blockswarm serve|coordinator ...`, stderr inherited or a file)
    when the variable asks for it."""
    return (os.environ.get(ENV) == "1" and command[:3] == [sys.executable, "-m", "blockswarm"]
            and len(command) > 3 and command[3] in FORKED and (stderr is None or hasattr(stderr, "fileno")))


def _context():
    # multiprocessing keeps one fork server per process; asking for its context again is cheap
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


class ForkedProcess:
    """What the launcher and the tests use of `subprocess.Popen` (text stdout, a pipe; stderr
    inherited or a file), for a `python -m blockswarm ...` command run in a forked process."""

    def __init__(self, command: list[str], env: dict, stderr=None):
        self.args = command
        read, write = os.pipe()
        # Connections pickle as descriptors handed to the child through the fork server; closing
        # them closes the launcher's copies once the child has its own
        out = Connection(write, readable=False)
        err = Connection(os.dup(stderr.fileno() if stderr is not None else 2), readable=False)
        env = {k: v for k, v in env.items() if k != ENV}
        try:
            # daemon: multiprocessing stops it if the launcher exits first
            self._process = _context().Process(target=_run, args=(command[2:], env, os.getcwd(), out, err),
                                               name=command[3], daemon=True)
            self._process.start()
        except BaseException:
            os.close(read)
            raise
        finally:
            out.close()
            err.close()
        self.pid = self._process.pid
        self.stdout = open(read, encoding="utf-8", errors="replace")

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._process.exitcode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # it died and the fork server reaped it (Popen ignores this too)
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _run(argv: list[str], env: dict, cwd: str, stdout: Connection, stderr: Connection) -> None:
    """In the forked process: the launcher's pipe as stdout (unbuffered, as PYTHONUNBUFFERED gives
    a subprocess), its stderr, its environment and folder, then the CLI as `python -m` runs it."""
    os.dup2(stdout.fileno(), 1)
    os.dup2(stderr.fileno(), 2)
    stdout.close()
    stderr.close()
    sys.stdout = io.TextIOWrapper(open(1, "wb", buffering=0, closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(open(2, "wb", buffering=0, closefd=False), write_through=True,
                                  errors="backslashreplace")
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = argv
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
