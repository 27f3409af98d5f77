"""`blockswarm plan` as users run it, and scenario validation that names the offending field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from blockswarm.core.errors import ConfigError
from blockswarm.perf.scenario import load_scenario, parse_scenario


def plan(*args):
    return subprocess.run([sys.executable, "-m", "blockswarm", "plan", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("policy", ["petals", "cgbprr", "wsrr", "milp", "rr-ilp"])
def test_plan_writes_the_promised_json(tmp_path, policy):
    out = tmp_path / "plan.json"
    extra = ["--milp-requests", "2"] if policy == "milp" else []
    run = plan("scenarios/clustered-9.yaml", "--policy", policy, "--json", str(out), *extra)
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    for key in ("placement", "routes", "predicted_per_token_s", "predicted_ttft_s", "bound_per_token_s", "R"):
        assert key in data
    L = 70
    for hops in data["routes"].values():
        assert hops[0]["start"] == 0 and hops[-1]["end"] == L
        assert all(a["end"] == b["start"] for a, b in zip(hops, hops[1:]))
    assert all(0 <= s["start"] < s["end"] <= L for s in data["placement"])
    if policy in ("cgbprr", "wsrr", "rr-ilp"):
        assert data["predicted_per_token_s"] <= data["bound_per_token_s"] + 1e-9
    if policy == "milp":
        assert data["solver"]["optimal"] and "2 concurrent requests" in data["notes"][0]


def test_plan_unknown_policy_is_a_clear_error():
    run = plan("scenarios/clustered-9.yaml", "--policy", "magic")
    assert run.returncode == 2 and "unknown policy 'magic'" in run.stderr and "Traceback" not in run.stderr


def test_clustered_26_parses_with_its_servers():
    scenario = load_scenario("scenarios/clustered-26.yaml")
    assert [s.hardware for s in scenario.servers].count("a100-80gb") == 5
    assert [s.hardware for s in scenario.servers].count("mig-1g.10gb") == 21


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["servers"][1].pop("location"), "servers[1].location"),
    (lambda d: d["servers"][0].update(memory_gb=-3), "servers[0].memory_gb"),
    (lambda d: d["servers"][0].update(hardware="abacus"), "unknown hardware 'abacus'"),
    (lambda d: d["model"].update(catalogue="gpt-9"), "model.catalogue"),
    (lambda d: d["workload"].update(output_tokens="many"), "workload.output_tokens"),
    (lambda d: d["network"].update(rtt_ms={"cluster0 cluster1": 10}), "network.rtt_ms: no value"),
    (lambda d: d.update(clients=[]), "clients"),
])
def test_scenario_errors_name_the_field(mutate, field):
    import yaml

    data = yaml.safe_load(open("scenarios/clustered-9.yaml"))
    mutate(data)
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_scenario(data)
