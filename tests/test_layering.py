"""The one-way rule: core, perf, planner and sim load neither torch, transformers, zmq nor ray.

Every module of those layers is imported (found with pkgutil, so a new module is covered the day
it is added), each layer in a fresh interpreter: what this test process already imported cannot
hide a violation. The simulator is held to more: running it must not load the MILP solver
(HiGHS) or rich, which only `plan` and the command line need.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PURE_LAYERS = ["blockswarm.core", "blockswarm.perf", "blockswarm.planner", "blockswarm.sim"]
HEAVY = ("torch", "transformers", "zmq", "ray")
SIM_ALSO_AVOIDS = ("highspy", "rich")
SCENARIO = Path(__file__).resolve().parent.parent / "scenarios" / "clustered-9.yaml"


def run_fresh(code: str) -> dict:
    """Run `code` in a new interpreter; it prints one JSON object as its last line."""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


IMPORT = """
import importlib, json, pkgutil, sys
names = []
for root in {roots!r}:
    package = importlib.import_module(root)
    names.append(root)
    if {walk!r} and hasattr(package, "__path__"):
        names += sorted(m.name for m in pkgutil.walk_packages(package.__path__, root + "."))
for name in names:
    importlib.import_module(name)
print(json.dumps({{"modules": names, "loaded": [m for m in {avoid!r} if m in sys.modules]}}))
"""


@pytest.mark.parametrize("layer", PURE_LAYERS)
def test_every_module_of_a_pure_layer_imports_without_torch_or_network(layer):
    out = run_fresh(IMPORT.format(roots=[layer], walk=True, avoid=HEAVY))
    assert len(out["modules"]) > 2, f"found no modules under {layer}: {out['modules']}"
    assert out["loaded"] == [], f"importing {layer} ({', '.join(out['modules'])}) loaded {out['loaded']}"


def test_the_package_and_the_command_line_import_nothing_heavy():
    """`blockswarm plan` and `simulate` start instantly: the CLI imports torch only inside commands."""
    out = run_fresh(IMPORT.format(roots=["blockswarm", "blockswarm.cli"], walk=False, avoid=HEAVY))
    assert out["loaded"] == []


RUN_SIMULATOR = """
import json, sys
from blockswarm.perf.scenario import load_scenario
from blockswarm.sim.experiments import compare
from blockswarm.sim.runner import simulate, with_workload
scenario = with_workload(load_scenario({scenario!r}), requests=5)
simulate(scenario, "petals", seed=0)
table = compare(scenario, ["petals", "cgbprr", "cgbp+shortest"], seeds=1)
assert all(row["n_requests"] == 5 for row in table.values()), table
print(json.dumps({{"loaded": [m for m in {avoid!r} if m in sys.modules]}}))
"""


def test_simulating_loads_neither_the_milp_solver_nor_rich():
    out = run_fresh(RUN_SIMULATOR.format(scenario=str(SCENARIO), avoid=HEAVY + SIM_ALSO_AVOIDS))
    assert out["loaded"] == [], f"a simulation loaded {out['loaded']}"


def test_the_coordinator_starts_without_torch():
    """The coordinator never sees a tensor: its modules, the torch-free protocol messages, the
    tickets and its client link load neither torch nor transformers (zmq, of course, they need)."""
    roots = ["blockswarm.runtime.coordinator", "blockswarm.runtime.messages", "blockswarm.runtime.tickets"]
    out = run_fresh(IMPORT.format(roots=roots, walk=True, avoid=("torch", "transformers")))
    assert "blockswarm.runtime.coordinator.service" in out["modules"]
    assert out["loaded"] == [], f"the coordinator's modules loaded {out['loaded']}"


def test_the_runtime_never_reaches_up_to_the_http_api():
    """`api/` sits on the runtime and only the CLI imports it: no runtime or model module loads it,
    nor the web stack under it."""
    out = run_fresh(IMPORT.format(roots=["blockswarm.runtime", "blockswarm.model"], walk=True,
                                  avoid=("blockswarm.api", "starlette", "uvicorn", "pydantic")))
    assert len(out["modules"]) > 10
    assert out["loaded"] == [], f"the runtime loaded {out['loaded']}"
