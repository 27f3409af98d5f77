"""The simulator: hand-computable cases, conservation, determinism, fast path = step path, the
published shape on clustered-9, workloads, topologies, and the engine's ordering."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from dataclasses import dataclass

import pytest

from blockswarm.core.errors import ConfigError
from blockswarm.core.specs import Request
from blockswarm.perf.model import route_time
from blockswarm.perf.scenario import load_scenario
from blockswarm.planner import cgbprr
from blockswarm.planner.view import SwarmView
from blockswarm.sim.engine import Engine
from blockswarm.sim.runner import Outage, simulate, with_workload
from blockswarm.perf.network import great_circle_m, rtt_from_coordinates
from blockswarm.sim.topology import place_on_topology, rtt_from_gml
from blockswarm.sim.workload import Lengths, arrivals, generate, load_trace

from planner_instances import tiny_scenario


def test_same_time_events_run_by_priority_then_schedule_order():
    seen = []

    @dataclass
    class Mark:
        time: float
        priority: int
        name: str

        def handle(self, world):
            seen.append(self.name)
            return []

    engine = Engine()
    for event in [Mark(1.0, 2, "late-low"), Mark(1.0, 1, "first"), Mark(0.5, 9, "earliest"), Mark(1.0, 2, "late-2")]:
        engine.schedule(event)
    engine.run(None)
    assert seen == ["earliest", "first", "late-low", "late-2"]
    with pytest.raises(ValueError, match="in the past"):
        engine.schedule(Mark(0.1, 0, "past"))


def test_one_server_one_request_matches_the_performance_model_exactly():
    scenario = tiny_scenario(3, [6.5e9], [0.01], ["a"], ["b"])
    request = Request(client=0, prompt_tokens=4, output_tokens=6, arrival_s=2.0)
    result = simulate(scenario, "cgbp+wsrr", requests=[request], R=1)
    record = result.records[0]
    # by hand, from tiny_scenario: RTT 50 ms between sites, 10 ms overheads, τ = 10 ms,
    # prefill 1e-5 s/token + 1 ms per block, 3 blocks, 4 prompt tokens, 6 output tokens
    net = scenario.network
    prefill = (0.05 + net.prefill_s_per_token * 4 + 0.01) + 3 * (1e-5 * 4 + 1e-3)
    per_token = (0.05 + 0.01) + 3 * 0.01
    assert math.isclose(record.ttft_s, prefill, rel_tol=1e-12)
    assert math.isclose(record.completion - record.arrival, prefill + 5 * per_token, rel_tol=1e-12)
    assert record.wait_s == 0


def test_a_chain_without_contention_matches_route_time():
    scenario = load_scenario("scenarios/clustered-9.yaml")
    requests = [Request(0, 20, 128, arrival_s=1000.0 * i, request_id=i) for i in range(5)]  # far apart
    result = simulate(scenario, "cgbp+shortest", requests=requests, R=2)
    placement = cgbprr.place(scenario, 2).placement
    expected = route_time(scenario, cgbprr.route(SwarmView(scenario, placement), requests[0]), requests[0])
    for record in result.records:
        assert math.isclose(record.ttft_s, expected.ttft_s, rel_tol=1e-12)
        assert math.isclose(record.completion - record.arrival, expected.completion_s, rel_tol=1e-12)


@pytest.mark.parametrize("policy", ["petals", "cgbprr", "cgbp+shortest", "petals+wsrr", "cgbp+petals", "chains",
                                    "loadfit", "cgbp+wsrr-queue", "petals+jffc"])
def test_every_request_completes_once_and_slots_stay_within_capacity(policy):
    scenario = with_workload(load_scenario("scenarios/clustered-9.yaml"), rate=1.5, requests=150)
    result = simulate(scenario, policy, seed=3)
    assert result.summary["n_requests"] == 150 and result.summary["n_unfinished"] == 0
    assert len({r.request_id for r in result.records}) == 150
    for record in result.records:
        assert record.arrival <= record.start <= record.first_token <= record.completion
    assert min(held for _, held in result.occupancy) >= 0 and result.occupancy[-1][1] == 0
    assert_in_use_within_capacity(scenario, result, _placement(scenario, policy, result))


def _placement(scenario, policy, result):
    from blockswarm.planner.registry import PLACEMENTS, parse_policy

    return PLACEMENTS[parse_policy(policy)[0]](scenario, result.R, result.seed)


def assert_in_use_within_capacity(scenario, result, placement):
    """Slots in use (sessions between start and completion) never exceed a server's capacity."""
    routes = _routes_by_request(scenario, result)
    for span in placement.spans:
        sessions = [(r.start, r.completion, blocks) for r in result.records
                    for server, blocks in routes[r.request_id] if server == span.server]
        for start, _, _ in sessions:
            assert sum(b for s, e, b in sessions if s <= start < e) <= span.slots


def test_in_use_slots_never_exceed_capacity_under_wsrr():
    scenario = with_workload(load_scenario("scenarios/clustered-9.yaml"), rate=2.0, requests=200)
    result = simulate(scenario, "cgbprr", seed=1, R=3)  # deliberately under-sized: requests must wait
    assert result.summary["mean_wait_s"] > 0
    assert_in_use_within_capacity(scenario, result, cgbprr.place(scenario, 3).placement)


def _routes_by_request(scenario, result):
    """Rerun with a spy on reservations to learn each request's route (hops per server)."""
    from blockswarm.sim import world as world_module

    routes = {}
    original = world_module.World._reserve

    def spy(self, request, route, now, start):
        routes[request.request_id] = [(h.server, h.blocks) for h in route.hops]
        return original(self, request, route, now, start)

    world_module.World._reserve = spy
    try:
        again = simulate(scenario, result.policy, seed=result.seed, R=result.R)
    finally:
        world_module.World._reserve = original
    assert [r.completion for r in again.records] == [r.completion for r in result.records]
    return routes


@pytest.mark.parametrize("policy", ["petals", "cgbprr", "chains", "loadfit"])
def test_fixed_seed_is_deterministic(policy):
    scenario = with_workload(load_scenario("scenarios/clustered-9.yaml"), rate=0.5)
    one, two = simulate(scenario, policy, seed=7), simulate(scenario, policy, seed=7)
    assert one.summary == two.summary
    assert simulate(scenario, policy, seed=8).summary != one.summary


@pytest.mark.parametrize("policy", ["petals", "cgbprr", "cgbp+shortest"])
def test_fast_path_equals_step_by_step(policy):
    scenario = with_workload(load_scenario("scenarios/clustered-9.yaml"), rate=0.5, output_tokens=64)
    fast = simulate(scenario, policy, seed=2)
    steps = simulate(scenario, policy, seed=2, step_by_step=True)
    assert steps.events > fast.events + 50 * 60  # it really stepped every token
    for a, b in zip(fast.records, steps.records):
        assert math.isclose(a.completion, b.completion, rel_tol=1e-9)
        assert math.isclose(a.first_token, b.first_token, rel_tol=1e-12)
        assert a.start == b.start


def test_clustered_9_reproduces_the_published_shape():
    """CG-BPRR + WS-RR well below PETALS, mostly in the first token (PETALS runs out of cache)."""
    scenario = with_workload(load_scenario("scenarios/clustered-9.yaml"), rate=0.5, output_tokens=128)
    petals_runs = [simulate(scenario, "petals", seed=s).summary for s in range(3)]
    ours = [simulate(scenario, "cgbprr", seed=s).summary for s in range(3)]
    mean = lambda runs, key: sum(r[key] for r in runs) / len(runs)
    reduction = 1 - mean(ours, "mean_per_token_s") / mean(petals_runs, "mean_per_token_s")
    assert reduction >= 0.5
    ttft_saved = mean(petals_runs, "mean_ttft_s") - mean(ours, "mean_ttft_s")
    total_saved = (mean(petals_runs, "mean_per_token_s") - mean(ours, "mean_per_token_s")) * 128
    assert ttft_saved > 0.5 * total_saved


def test_a_failure_restarts_its_sessions_and_all_still_complete():
    scenario = with_workload(load_scenario("scenarios/clustered-9.yaml"), rate=0.5, requests=60)
    steady = simulate(scenario, "cgbprr", seed=0)
    failed = simulate(scenario, "cgbprr", seed=0, outages=(Outage(server=0, at_s=30.0, back_s=90.0),))
    assert failed.summary["n_unfinished"] == 0 and failed.summary["restarts"] > 0
    assert failed.summary["mean_per_token_s"] > steady.summary["mean_per_token_s"]


def test_workloads_poisson_gamma_trace_and_client_rates(tmp_path):
    import random
    import statistics

    gaps = lambda times: [b - a for a, b in zip([0.0] + times, times)]
    poisson = gaps(arrivals(random.Random(0), 2.0, 4000))
    bursty = gaps(arrivals(random.Random(0), 2.0, 4000, burstiness=3.0))
    assert math.isclose(statistics.fmean(poisson), 0.5, rel_tol=0.05)
    assert math.isclose(statistics.fmean(bursty), 0.5, rel_tol=0.15)
    assert statistics.stdev(bursty) > 2 * statistics.stdev(poisson)
    scenario = tiny_scenario(3, [6.5e9], [0.01], ["a"], ["a", "b"])
    scenario = dataclasses.replace(scenario, clients=(dataclasses.replace(scenario.clients[0], rate=3.0),
                                                      dataclasses.replace(scenario.clients[1], rate=1.0)))
    requests = generate(scenario, seed=1, count=400, output=Lengths.parse("2-6"))
    share = sum(r.client == 0 for r in requests) / len(requests)
    assert math.isclose(share, 0.75, abs_tol=0.01)
    assert {r.output_tokens for r in requests} == {2, 3, 4, 5, 6}
    trace = tmp_path / "trace.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens,client\n0.5,4,3,1\n0.1,2,2\n")
    loaded = load_trace(trace, clients=2)
    assert [(r.arrival_s, r.client, r.output_tokens) for r in loaded] == [(0.1, 0, 2), (0.5, 1, 3)]
    trace.write_text("0.5,four,3\n")
    with pytest.raises(ConfigError, match="trace.csv:1"):
        load_trace(trace, clients=1)


def test_topologies_from_coordinates_and_gml():
    assert math.isclose(great_circle_m((0, 0), (0, 1)), 111_195, rel_tol=1e-3)
    rtt = rtt_from_coordinates({"paris": (48.86, 2.35), "nyc": (40.71, -74.01)})
    assert 0.080 < rtt[("paris", "nyc")] < 0.095  # 5,837 km · 2 · 1.5 / 2e8 m/s + 1 ms ≈ 88 ms
    gml = rtt_from_gml("scenarios/topologies/abilene.gml")
    direct = 2 * great_circle_m((40.71, -74.01), (38.91, -77.04)) / 2e8
    assert math.isclose(gml[("NewYork", "Washington")], direct, rel_tol=1e-9)
    assert gml[("NewYork", "Seattle")] > gml[("NewYork", "Chicago")]
    placed = place_on_topology(load_scenario("scenarios/clustered-9.yaml"), gml, seed=4)
    assert {s.location for s in placed.servers} <= {a for a, _ in gml}
    assert simulate(placed, "cgbprr", seed=0).summary["n_unfinished"] == 0


def test_simulate_cli_writes_the_promised_json(tmp_path):
    out, plot = tmp_path / "sim.json", tmp_path / "sim.png"
    run = subprocess.run([sys.executable, "-m", "blockswarm", "simulate", "scenarios/clustered-9.yaml",
                          "--policies", "petals,cgbprr", "--seeds", "2", "--json", str(out), "--plot", str(plot),
                          "--rate", "0.5", "--output-tokens", "128"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    for policy in ("petals", "cgbprr"):
        for key in ("mean_per_token_s", "mean_ttft_s", "p90_per_token_s", "mean_wait_s", "n_requests"):
            assert key in data[policy]
        assert data[policy]["n_requests"] == 200
    assert data["cgbprr"]["mean_per_token_s"] < data["petals"]["mean_per_token_s"]
    assert plot.stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "-m", "blockswarm", "simulate", "scenarios/clustered-9.yaml",
                          "--policies", "magic"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "PLACEMENT+ROUTING" in bad.stderr


def test_sweep_cli_plots_a_curve_per_policy(tmp_path):
    out, plot = tmp_path / "sweep.json", tmp_path / "sweep.png"
    run = subprocess.run([sys.executable, "-m", "blockswarm", "sweep", "scenarios/clustered-9.yaml",
                          "--parameter", "rate", "--values", "0.1,0.5", "--seeds", "2", "--requests", "40",
                          "--json", str(out), "--plot", str(plot)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    curves = json.loads(out.read_text())["curves"]
    assert set(curves) == {"petals", "cgbprr"} and all(len(c) == 2 for c in curves.values())
    assert plot.stat().st_size > 10_000


def test_sweep_cli_runs_the_scattered_sweeps_on_a_real_map(tmp_path):
    """The first study's scattered sweep of the number of servers on AboveNet at one rate; the map's
    quirk (nodes without coordinates) is said, not fatal."""
    out = tmp_path / "sweep.json"
    run = subprocess.run([sys.executable, "-m", "blockswarm", "sweep", "scenarios/clustered-9.yaml", "--parameter",
                          "servers", "--values", "6,9", "--rate", "0.5", "--topology",
                          "scenarios/topologies/Abvt.gml", "--policies", "cgbprr,chains", "--seeds", "1",
                          "--requests", "20", "--workers", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "without coordinates" in run.stderr
    curves = json.loads(out.read_text())["curves"]
    assert [p["value"] for p in curves["chains"]] == [6, 9] and all(p["mean_per_token_s"] > 0 for p in curves["cgbprr"])


def test_occupancy_is_time_weighted_and_bounded():
    from blockswarm.sim.metrics import occupancy_stats

    # 10 slots: 4 held on [0, 5), 10 held on [5, 6), 0 after; over [0, 10): mean (20 + 10) / 100
    mean, peak = occupancy_stats([(0.0, 4), (5.0, 10), (6.0, 0)], 10, 0.0, 10.0)
    assert math.isclose(mean, 0.3) and peak == 1.0
    scenario = with_workload(load_scenario("scenarios/clustered-9.yaml"), rate=0.5)
    summary = simulate(scenario, "cgbprr", seed=0).summary
    assert 0 < summary["cache_occupancy_mean"] <= summary["cache_occupancy_peak"] <= 1


def test_scenario_rtts_from_coordinates():
    import yaml

    from blockswarm.perf.scenario import parse_scenario

    data = yaml.safe_load(open("scenarios/clustered-9.yaml"))
    del data["network"]["rtt_ms"]
    data["network"]["coordinates"] = {"cluster0": [48.86, 2.35], "cluster1": [50.11, 8.68], "cluster2": [40.71, -74.01]}
    scenario = parse_scenario(data)
    assert 0.080 < scenario.network.rtt("cluster0", "cluster2") < 0.095  # Paris - New York
    assert scenario.network.rtt("cluster0", "cluster1") < 0.01  # Paris - Frankfurt
    data["network"]["coordinates"].pop("cluster2")
    with pytest.raises(ConfigError, match="no coordinates for cluster2"):
        parse_scenario(data)


def test_simulate_cli_replays_a_trace(tmp_path):
    trace, out = tmp_path / "trace.csv", tmp_path / "out.json"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n0,20,64\n2,40,200\n4,20,128\n")
    run = subprocess.run([sys.executable, "-m", "blockswarm", "simulate", "scenarios/clustered-9.yaml", "--seeds", "1",
                          "--trace", str(trace), "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    assert data["cgbprr"]["n_requests"] == 3 and data["petals"]["n_requests"] == 3
    assert data["cgbprr"]["cache_occupancy_over_time"]


def test_the_real_isp_maps_load_with_their_quirks_reported():
    """Bell Canada lists a link twice; AboveNet and GTS-CE have nodes without coordinates."""
    sizes = {}
    for name, quirk in [("Abvt", "without coordinates"), ("Bellcanada", "listed twice"),
                        ("GtsCe", "without coordinates")]:
        notes: list[str] = []
        rtt = rtt_from_gml(f"scenarios/topologies/{name}.gml", notes)
        sizes[name] = len({a for a, _ in rtt})
        assert len(notes) == 1 and quirk in notes[0]
        assert all(v > 0 for v in rtt.values()) and all(rtt[(a, b)] == rtt[(b, a)] for a, b in rtt)
    assert sizes == {"Abvt": 23, "Bellcanada": 48, "GtsCe": 149}
