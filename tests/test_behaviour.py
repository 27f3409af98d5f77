"""The simulator's behaviour profiles (scenario `behaviour:`), each knob on a case small enough to
compute by hand. The published runs' (published-runs.md §A): allocation delay, back-off rounding,
the block cap, a pinned PETALS join order, and the published simulator's arrival stream. The
runtime's: hop-level steps with a server computing one step at a time, and the client's work."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from blockswarm.core.errors import ConfigError, Infeasible
from blockswarm.core.specs import Behaviour, Placement, Request, Span
from blockswarm.perf.scenario import load_scenario, parse_scenario
from blockswarm.planner import cgbprr, petals, wsrr
from blockswarm.sim.runner import simulate, with_workload
from blockswarm.sim.workload import generate
from blockswarm.sim.engine import Engine
from blockswarm.sim.events import Arrival, ServerFailure
from blockswarm.sim.world import World, backoff_instant

from planner_instances import scenarios, tiny_scenario


def behaving(scenario, **knobs):
    return dataclasses.replace(scenario, behaviour=Behaviour(**knobs))


def one_server():
    """One server holding all 3 blocks with cache for exactly one session (s_m = 1 GB, s_c = 0.1 GB
    per block-session: 3.35 GB leaves 3 block-sessions = one request over 3 blocks)."""
    return tiny_scenario(3, [3.35e9], [0.01], ["a"], ["b"])


def test_the_allocation_delay_holds_the_slots_and_delays_first_token_and_completion():
    scenario = one_server()
    request = Request(0, 4, 6, arrival_s=2.0)
    plain = simulate(scenario, "cgbprr", requests=[request], R=1).records[0]
    delayed_run = simulate(behaving(scenario, allocation_delay_s={"cgbp+wsrr": 60.0}), "cgbprr", requests=[request],
                           R=1)
    delayed = delayed_run.records[0]
    assert delayed.ttft_s == pytest.approx(plain.ttft_s + 60.0, abs=1e-9)
    assert delayed.completion == pytest.approx(plain.completion + 60.0, abs=1e-9)
    assert delayed_run.occupancy[0] == (2.0, 3)  # the request's 3 block-sessions are held from its arrival
    # another policy's delay does not apply, and R is chosen from the request time without the delay
    assert simulate(behaving(scenario, allocation_delay_s={"petals": 250.0}), "cgbprr", requests=[request],
                    R=1).records[0].completion == plain.completion
    loaded = with_workload(load_scenario("scenarios/clustered-9.yaml"), rate=1.0)
    assert wsrr.choose_R(behaving(loaded, allocation_delay_s={"cgbprr": 60.0})) == wsrr.choose_R(loaded)


def test_backoff_rounding_ends_a_wait_at_the_next_instant_of_1_3_7_15_seconds():
    assert [backoff_instant(w) for w in (0.0, 0.2, 1.0, 1.5, 3.0, 3.1, 8.0, 100.0, 130.0)] == [
        0.0, 1.0, 1.0, 3.0, 3.0, 7.0, 15.0, 123.0, 183.0]  # steps 1, 2, 4, … capped at 60 s
    scenario = one_server()
    first, second = Request(0, 4, 6, arrival_s=0.0, request_id=0), Request(0, 4, 6, arrival_s=0.1, request_id=1)
    plain = simulate(scenario, "cgbprr", requests=[first, second], R=1).records
    rounded = simulate(behaving(scenario, backoff_rounding=True), "cgbprr", requests=[first, second], R=1).records
    busy = plain[0].completion  # the only slot frees when the first request completes (~0.5 s)
    assert plain[1].start == busy and 0.1 < busy < 1.1
    assert rounded[1].start == pytest.approx(0.1 + 1.0)  # waited busy − 0.1 < 1 s: the client looks again at 1 s
    assert rounded[0].completion == plain[0].completion


def test_the_block_cap_limits_cg_bp_spans_per_hardware():
    scenario = tiny_scenario(6, [6.5e9, 6.5e9, 6.5e9], [0.001, 0.001, 0.001], ["a"] * 3)
    servers = tuple(dataclasses.replace(s, hardware="small" if j else "big") for j, s in enumerate(scenario.servers))
    scenario = dataclasses.replace(scenario, servers=servers)
    assert cgbprr.conservative_blocks(scenario, 1, 1) == 5  # ⌊6.5 / (1 + 0.1)⌋ = 5 without a cap
    capped = behaving(scenario, max_blocks={"small": 2})
    assert [cgbprr.conservative_blocks(capped, j, 1) for j in range(3)] == [5, 2, 2]
    assert all(s.length <= 2 for s in cgbprr.place(capped, 1).placement.spans if s.server)


def test_a_pinned_join_order_fixes_petals_placement_whatever_the_seed():
    scenario = load_scenario("scenarios/clustered-9.yaml")
    order = (7, 2, 5, 0, 4, 1, 6, 8, 3)
    pinned = behaving(scenario, petals_join_order=order)
    placements = {petals.place(pinned, seed).spans for seed in range(5)}
    assert len(placements) == 1
    assert len({petals.place(scenario, seed).spans for seed in range(5)}) > 1  # random otherwise
    first = next(s for s in placements.pop() if s.server == order[0])
    assert first.start == 0  # the first to join takes the lexicographically first window


def test_the_matlab_arrival_stream_is_numpys_randomstate_with_the_first_gap_zero():
    scenario = load_scenario("scenarios/clustered-9.yaml")
    workload = dataclasses.replace(scenario.workload, arrivals="matlab", matlab_seed=42, matlab_skip=0, rate=2.0,
                                   num_requests=3)
    times = [r.arrival_s for r in generate(dataclasses.replace(scenario, workload=workload), seed=0)]
    # rng(42,'twister'): rand gives 0.3745401188473625, 0.9507143064099162, 0.7319939418114051
    assert times == pytest.approx([0.0, -math.log(0.9507143064099162) / 2, -math.log(0.9507143064099162) / 2
                                   - math.log(0.7319939418114051) / 2], rel=1e-15)
    skipped = dataclasses.replace(workload, matlab_skip=1)
    later = [r.arrival_s for r in generate(dataclasses.replace(scenario, workload=skipped), seed=0)]
    assert later[1] == pytest.approx(-math.log(0.7319939418114051) / 2)


def test_behaviour_fields_are_checked_and_the_published_profile_fills_them():
    base = {"model": {"catalogue": "bloom-176b"}, "servers": [{"count": 2, "hardware": "a100-80gb", "location": "x"}],
            "clients": [{"location": "x"}], "network": {}}
    published = parse_scenario({**base, "behaviour": {"profile": "published"}}).behaviour
    assert published.allocation_delay_s == {"cgbprr": 60.0, "petals": 250.0} and published.backoff_rounding
    assert published.max_blocks == {"mig-1g.10gb": 4}
    own = parse_scenario({**base, "behaviour": {"profile": "published", "allocation_delay_s": {"petals": 350}}})
    assert own.behaviour.allocation_delay_s == {"petals": 350.0}
    for bad, field in [({"petals_join_order": [0, 0]}, "petals_join_order"), ({"profile": "paper"}, "profile"),
                       ({"backoff_rounding": "yes"}, "backoff_rounding"), ({"delay": 3}, "delay")]:
        with pytest.raises(ConfigError, match=f"behaviour.{field}"):
            parse_scenario({**base, "behaviour": bad})


# -- the runtime profile: every hop of every step, a server computing one step at a time ---------

def _two_at_once(scenario, **knobs):
    """Two sessions on one server, arriving together; their time per output token after the first."""
    scenario = with_workload(behaving(scenario, **knobs), output_tokens=60)
    requests = [Request(0, 4, 60, arrival_s=0.0, request_id=0), Request(0, 4, 60, arrival_s=0.0, request_id=1)]
    return [r.tpot_s for r in simulate(scenario, "petals", requests=requests).records]


def test_a_server_computing_one_step_at_a_time_makes_two_sessions_alternate():
    # one server with all 3 blocks at 20 ms each (d = 60 ms a step), the client beside it
    # (r = 5 ms RTT + 10 ms overhead a hop): alone a step takes d + r = 75 ms
    scenario = tiny_scenario(3, [20e9], [0.02], ["a"], ["a"])
    d, r = 0.06, 0.015
    assert _two_at_once(scenario) == pytest.approx([d + r] * 2, rel=1e-9)  # the performance model: no contention
    assert _two_at_once(scenario, hop_level=True, host_block_s=0.0) == pytest.approx([d + r] * 2, rel=1e-9)
    # the device itself computes one step at a time: the server never rests, a step every 2d per session
    assert _two_at_once(scenario, hop_level=True) == pytest.approx([2 * d] * 2, rel=0.01)
    # an emulated device overlaps the two, but its host's own 30 ms a block is serial: 2 × 90 ms
    assert _two_at_once(scenario, hop_level=True, host_block_s=0.03) == pytest.approx([0.18] * 2, rel=0.01)
    # a light host does not show: each session's step comes back every d + r, as alone
    assert _two_at_once(scenario, hop_level=True, host_block_s=0.001) == pytest.approx([d + r] * 2, rel=1e-9)
    # the client's own work per step adds to every step
    assert _two_at_once(scenario, hop_level=True, host_block_s=0.0, client_step_s=0.004) == pytest.approx(
        [d + r + 0.004] * 2, rel=1e-9)


@pytest.mark.parametrize("coordinator", [None, "a", "b"])
def test_the_runtime_set_up_opens_each_hop_in_round_trips_to_its_server(coordinator):
    """Set-up = asking (setup_s, and open_rtts round trips to the coordinator where there is one)
    + open_rtts round trips and open_hop_s for every hop, one after the other; the wait ends when
    the sessions are open."""
    scenario = tiny_scenario(4, [20e9] * 2, [0.02, 0.02], ["a", "b"], ["a"], rtt={("a", "b"): 0.08})
    scenario = dataclasses.replace(scenario, network=dataclasses.replace(scenario.network, setup_s=0.03))
    placement = Placement((Span(0, 0, 2, 100), Span(1, 2, 4, 100)), 4)
    world = World(scenario, placement, "shortest", hop_level=True, open_rtts=3, open_hop_s=0.002,
                  coordinator=coordinator)
    engine = Engine()
    engine.schedule(Arrival(1.0, Request(0, 4, 6, arrival_s=1.0)))
    engine.run(world)
    record = world.records[0]
    asking = {None: 0.0, "a": 3 * 0.005, "b": 3 * 0.08}[coordinator]  # the client is at a
    # s0 beside the client, s1 80 ms away
    assert record.wait_s == pytest.approx(0.03 + asking + 3 * (0.005 + 0.08) + 2 * 0.002, rel=1e-9)


def test_a_refused_petals_client_backs_off_after_its_question_came_back():
    """The runtime profile: a PETALS client the coordinator refuses (no slot on its route) asks
    again 1 s after the refusal reached it, so the question's time (setup_s and open_rtts round
    trips to the coordinator) comes before the back-off."""
    scenario = tiny_scenario(4, [20e9], [0.02], ["a"], ["a", "b"], rtt={("a", "b"): 0.08})
    scenario = dataclasses.replace(scenario, network=dataclasses.replace(scenario.network, setup_s=0.03))
    placement = Placement((Span(0, 0, 4, 4),), 4)  # one session at a time
    world = World(scenario, placement, "petals", hop_level=True, open_rtts=3, coordinator="b")
    engine = Engine()
    engine.schedule(Arrival(0.0, Request(0, 4, 1, arrival_s=0.0, request_id=0)))  # done well within 1 s
    engine.schedule(Arrival(0.1, Request(0, 4, 1, arrival_s=0.1, request_id=1)))  # refused: the first holds it
    engine.run(world)
    asking = 0.03 + 3 * 0.08  # the client is at a, the coordinator at b
    setup = asking + 3 * 0.005  # then the hop's open, beside the client
    assert world.records[0].wait_s == pytest.approx(setup, rel=1e-9)
    assert world.records[0].completion < 0.1 + asking + 1.0
    assert world.records[1].wait_s == pytest.approx(asking + 1.0 + setup, rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(scenarios(), st.sampled_from(["petals", "cgbprr", "cgbp+wsrr"]), st.integers(0, 3))
def test_the_hop_level_runtime_profile_without_serial_work_is_the_performance_model(scenario, policy, seed):
    """Every hop and step simulated one by one, with nothing serial, lands where the closed form of
    the performance model puts each request: the hop-level machinery adds no time of its own."""
    scenario = dataclasses.replace(scenario, network=dataclasses.replace(scenario.network, setup_s=0.02))
    try:
        plain = simulate(scenario, policy, seed).records
    except Infeasible:  # too little memory for the model: nothing to compare
        assume(False)
    hops = simulate(behaving(scenario, hop_level=True, host_block_s=0.0), policy, seed).records
    for a, b in zip(plain, hops):
        # (the runtime profile's waiting ends when the sessions are open: after the set-up)
        assert (a.start + 0.02, a.hops) == (pytest.approx(b.start, abs=1e-12), b.hops)
        assert b.first_token == pytest.approx(a.first_token, rel=1e-9, abs=1e-9)
        assert b.completion == pytest.approx(a.completion, rel=1e-9, abs=1e-9)


def test_the_runtime_profile_fields_are_checked():
    base = {"model": {"catalogue": "bloom-176b"}, "servers": [{"count": 2, "hardware": "a100-80gb", "location": "x"}],
            "clients": [{"location": "x"}], "network": {}}
    runtime = parse_scenario({**base, "behaviour": {"profile": "runtime", "host_block_s": 0.002}}).behaviour
    assert runtime.hop_level and runtime.host_block_s == 0.002 and runtime.client_step_s == 0.0
    assert not parse_scenario(base).behaviour.hop_level  # the default stays the performance model
    assert parse_scenario({**base, "behaviour": {"coordinator": "x"}}).behaviour.coordinator == "x"
    for bad, field in [({"hop_level": 1}, "hop_level"), ({"host_block_s": -1}, "host_block_s"),
                       ({"client_step_s": "fast"}, "client_step_s"), ({"open_hop_s": -0.1}, "open_hop_s"),
                       ({"coordinator": "mars"}, "coordinator")]:
        with pytest.raises(ConfigError, match=f"behaviour.{field}"):
            parse_scenario({**base, "behaviour": bad})


def _replica_world(fail_at: float | None, hop_level: bool = True):
    """Blocks 0:2 on s0, 2:4 on s1 (40 ms a step) and on its slower replica s2 (60 ms); one
    request of 60 output tokens routed s0 → s1; s1 fails at `fail_at`."""
    scenario = with_workload(tiny_scenario(4, [20e9] * 3, [0.02, 0.02, 0.03], ["a"] * 3, ["a"]), output_tokens=60)
    placement = Placement((Span(0, 0, 2, 100), Span(1, 2, 4, 100), Span(2, 2, 4, 100)), 4)
    world = World(scenario, placement, "shortest", hop_level=hop_level)
    engine = Engine()
    engine.schedule(Arrival(0.0, Request(0, 4, 60)))
    if fail_at is not None:
        engine.schedule(ServerFailure(fail_at, 1))
    engine.run(world)
    return world.records[0], world


def test_a_failed_hop_is_replayed_into_a_replica_and_the_head_is_kept():
    """The runtime's repair, hop level: the step in flight at the failed server is taken up by a
    new tail (the replica), fed the 39 steps sent so far, while the head (s0) keeps its session."""
    plain, _ = _replica_world(None)
    per_token_a, per_token_b, leg = 0.11, 0.13, 0.0075  # s0+s1 and s0+s2 with 2 × (5 ms RTT + 10 ms overhead)
    assert plain.tpot_s == pytest.approx(per_token_a, rel=1e-9)
    k = 40  # s1 fails while step 40 is on it: it arrived there 62.5 ms into the step, leaves at 102.5 ms
    fail_at = plain.first_token + (k - 2) * per_token_a + 0.08
    record, world = _replica_world(fail_at)
    assert (record.restarts, record.replays, record.completion is not None) == (0, 1, True)
    assert world.used == {0: 0, 1: 0, 2: 0} and not world.in_flight  # every slot given back, s1's too
    replay = 2 * leg + (2 * (1e-5 * 4 + 1e-3) + 2 * 0.03 * (k - 2)) + 2 * leg  # open; the 39 steps' work; back
    step_k_done = fail_at + replay + leg + 0.06 + leg
    assert record.completion == pytest.approx(step_k_done + (60 - k) * per_token_b, rel=1e-9)
    assert record.first_token == plain.first_token
    # the same failure costs a request restarted from scratch (the default profile) far more
    restarted, _ = _replica_world(fail_at, hop_level=False)
    assert restarted.restarts == 1 and restarted.completion > record.completion + 2.0


def test_a_session_finds_a_failed_server_when_its_step_gets_there():
    """s1 fails while the step is still on s0: nothing is lost yet; the step finds s1 gone when it
    reaches it and repairs then (the same replay, later)."""
    plain, _ = _replica_world(None)
    fail_at = plain.first_token + 38 * 0.11 + 0.03  # step 40 is on s0 (7.5-47.5 ms into it)
    record, _ = _replica_world(fail_at)
    assert (record.restarts, record.replays) == (0, 1)
    found = plain.first_token + 38 * 0.11 + 0.0625  # when step 40 reaches s1's blocks
    replay = 0.015 + (2 * (1e-5 * 4 + 1e-3) + 2 * 0.03 * 38) + 0.015
    assert record.completion == pytest.approx(found + replay + 0.0075 + 0.06 + 0.0075 + 20 * 0.13, rel=1e-9)
