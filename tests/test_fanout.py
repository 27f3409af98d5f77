"""Independent runs fanned out over local processes or a local Ray instance give exactly the
serial numbers (the acceptance command's `--workers 2`), and a failing run still fails clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKSWARM = [sys.executable, "-m", "blockswarm"]


def simulate(tmp_path: Path, name: str, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    run = subprocess.run([*BLOCKSWARM, "simulate", "scenarios/clustered-9.yaml", "--policies",
                          "petals,cgbprr,chains", "--seeds", "3", "--requests", "30", "--rate", "0.5",
                          "--json", str(out), *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(out.read_text())


def test_simulate_over_two_processes_equals_the_serial_run(tmp_path):
    serial = simulate(tmp_path, "serial", "--workers", "1")
    assert serial == simulate(tmp_path, "two", "--workers", "2")
    assert serial["policies"]["chains"]["n_requests"] == 90


def test_a_sweep_over_processes_equals_the_serial_sweep(tmp_path):
    curves = []
    for workers in ("1", "2"):
        out = tmp_path / f"sweep{workers}.json"
        run = subprocess.run([*BLOCKSWARM, "sweep", "scenarios/clustered-9.yaml", "--parameter", "rate", "--values",
                              "0.2,1", "--policies", "petals,cgbprr", "--seeds", "2", "--requests", "20",
                              "--workers", workers, "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr
        curves.append(json.loads(out.read_text()))
    assert curves[0] == curves[1] and len(curves[0]["curves"]["petals"]) == 2


def test_a_run_that_fails_in_a_worker_fails_the_command_with_its_reason(tmp_path):
    run = subprocess.run([*BLOCKSWARM, "simulate", "scenarios/clustered-9.yaml", "--policies", "cgbprr,jffc-whole",
                          "--seeds", "2", "--requests", "10", "--workers", "2"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode != 0
    assert "no server can hold the whole model" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
def test_a_local_ray_instance_gives_the_serial_numbers(tmp_path):
    pytest.importorskip("ray")  # `make test` installs the extra, so CI runs this
    assert simulate(tmp_path, "serial", "--workers", "1") == simulate(tmp_path, "ray", "--ray", "local",
                                                                      "--workers", "2")
