"""Which commands the launcher forks from the warm process (runtime/forked.py), and which it leaves
to plain subprocesses. (Forked processes themselves run in every slow end-to-end test.)"""

from __future__ import annotations

import subprocess
import sys

from blockswarm.runtime import forked


def command(name: str) -> list[str]:
    return [sys.executable, "-m", "blockswarm", name, "--port", "0"]


def test_only_servers_and_coordinators_are_forked_and_only_when_asked(monkeypatch, tmp_path):
    monkeypatch.setenv(forked.ENV, "1")
    with open(tmp_path / "log", "w") as log:
        assert forked.wanted(command("serve"), None) and forked.wanted(command("coordinator"), log)
    assert not forked.wanted(command("demo"), None)  # a demo runs as users run it
    assert not forked.wanted(command("serve"), subprocess.PIPE)  # a piped stderr: Popen's job
    assert not forked.wanted(["blockswarm", "serve"], None)  # not `python -m blockswarm`
    monkeypatch.setenv(forked.ENV, "0")
    assert not forked.wanted(command("serve"), None)
    monkeypatch.delenv(forked.ENV)
    assert not forked.wanted(command("serve"), None)
