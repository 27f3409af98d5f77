"""The follow-up's baselines: GBP-CR placement, GCA chains, JFFC from one central FIFO queue, and
`jffc-whole`; hand-computed cases, a brute-force referee for GCA, and JFFC's queue invariants."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from blockswarm.core.errors import Infeasible
from blockswarm.core.specs import Placement, Span
from blockswarm.perf.model import slots
from blockswarm.planner import chains
from blockswarm.planner.registry import plan
from blockswarm.sim.engine import Engine
from blockswarm.sim.events import Arrival
from blockswarm.sim.runner import simulate, with_workload
from blockswarm.sim.workload import generate
from blockswarm.sim.world import World

from planner_instances import all_routes, tiny_scenario

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def two_fast_two_slow(rate: float):
    """s_m = 1 GB and s_c = 0.1 GB per block-session: with c = 5 a 6.5 GB server holds
    ⌊6.5/1.5⌋ = 4 blocks (all of L = 4) and a 2.3 GB one ⌊2.3/1.5⌋ = 1."""
    scenario = tiny_scenario(4, [6.5e9, 6.5e9, 2.3e9, 2.3e9], [0.001, 0.001, 0.01, 0.01], ["a"] * 4)
    return with_workload(scenario, rate=rate)


def test_gbp_cr_fills_disjoint_chains_fastest_first_until_the_load_is_covered():
    scenario = two_fast_two_slow(1.0)
    one = chains.gbp_cr(scenario, 5)
    # one fast server is a whole chain; its time T ≈ 0.39 s gives c/T ≈ 12.9 requests/s ≥ 1/0.9
    assert one.spans == (Span(0, 0, 4, slots(scenario, 0, 4)),)
    T = chains.chain_time(scenario, chains.gca(scenario, one)[0].route)
    assert 5 / T > 1 / 0.9
    # a load the first chain cannot carry (5/T < λ/ρ̄ ≤ 10/T) brings the second fast server, not a slow one
    two = chains.gbp_cr(scenario, 5, rate=0.9 * 7.5 / T)
    assert [(s.server, s.start, s.end) for s in two.spans] == [(0, 0, 4), (1, 0, 4)]
    # more than both can carry: the slow servers start a third chain, in order, and run out
    three = chains.gbp_cr(scenario, 5, rate=0.9 * 11 / T)
    assert [(s.server, s.start, s.end) for s in three.spans] == [(0, 0, 4), (1, 0, 4), (2, 0, 1), (3, 1, 2)]
    assert slots(scenario, 0, 4) == 25 and slots(scenario, 2, 1) == 13
    with pytest.raises(Infeasible, match="lower c"):
        chains.gbp_cr(scenario, 60)


def test_gca_gives_each_chain_the_slots_its_tightest_hop_has():
    scenario = two_fast_two_slow(1.0)
    placement = Placement((Span(0, 0, 4, 25), Span(1, 0, 2, 9), Span(2, 2, 4, 13)), 4)
    found = chains.gca(scenario, placement)
    # server 0 alone: ⌊25/4⌋ = 6; then servers 1→2: min(⌊9/2⌋, ⌊13/2⌋) = 4, then nothing has room
    assert [([(h.server, h.start, h.end) for h in c.route.hops], c.capacity) for c in found] == [
        ([(0, 0, 4)], 6), ([(1, 0, 2), (2, 2, 4)], 4)]
    assert found[0].service_s < found[1].service_s


@SETTINGS
@given(spans=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 6), st.integers(1, 30)), min_size=1, max_size=6),
       taus=st.lists(st.floats(0.001, 0.05), min_size=6, max_size=6, unique=True))
def test_gca_equals_a_brute_force_greedy_over_every_route(spans, taus):
    """The referee enumerates every route each round (no Dijkstra), takes the fastest with room,
    and gives it min ⌊residual/k⌋; the chains and capacities must be the same, and no server's
    slots are ever over-given."""
    L = 6
    scenario = tiny_scenario(L, [6.5e9] * 6, taus, ["a"] * 6)
    placement = Placement(tuple(Span(i, a, min(L, a + m), n) for i, (a, m, n) in enumerate(spans)), L)
    residual = {s.server: s.slots for s in placement.spans}
    expected = []
    while True:
        open_routes = [r for r in all_routes(placement) if all(residual[h.server] >= h.blocks for h in r.hops)]
        if not open_routes:
            break
        route = min(open_routes, key=lambda r: chains.chain_time(scenario, r))
        capacity = min(residual[h.server] // h.blocks for h in route.hops)
        for h in route.hops:
            residual[h.server] -= capacity * h.blocks
        expected.append((route, capacity))
    found = chains.gca(scenario, placement)
    assert [(c.route, c.capacity) for c in found] == sorted(expected, key=lambda e: chains.chain_time(scenario, e[0]))
    for span in placement.spans:
        assert sum(c.capacity * h.blocks for c in found for h in c.route.hops if h.server == span.server) <= span.slots


@SETTINGS
@given(memories=st.lists(st.sampled_from([2.3e9, 3.5e9, 6.5e9]), min_size=2, max_size=6),
       rate=st.floats(0.5, 40.0), seed=st.integers(0, 3))
def test_jffc_never_leaves_a_request_waiting_while_a_chain_has_a_free_slot(memories, rate, seed):
    """Stepping the simulator event by event: whenever the central queue holds a request, every
    chain runs at its capacity; requests leave the queue in arrival order; everyone completes,
    every route covers [0, L) and no server holds more slots than it has."""
    scenario = tiny_scenario(5, memories, [0.001 * (j + 1) for j in range(len(memories))], ["a"] * len(memories))
    scenario = with_workload(scenario, rate=rate, requests=40)
    try:
        placement = chains.gbp_cr(scenario, chains.tune_c(scenario))
    except Infeasible:
        assume(False)
    world = World(scenario, placement, "jffc")
    found = chains.gca(scenario, placement)
    engine = Engine()
    for request in generate(scenario, seed):
        engine.schedule(Arrival(request.arrival_s, request))
    while engine.step(world):
        if world.waiting:
            assert all(world.in_flight.get(c.route, 0) == c.capacity for c in found)
        assert all(world.used.get(s.server, 0) <= s.slots for s in placement.spans)
    records = sorted(world.records.values(), key=lambda r: r.arrival)
    assert all(r.completion is not None for r in records)
    waited = [r for r in records if r.start > r.arrival]
    assert [r.request_id for r in waited] == [r.request_id for r in sorted(waited, key=lambda r: (r.start, r.arrival))]
    assert all(s.route.covers(5) for s in world.sessions.values())


def test_jffc_whole_runs_where_a_server_holds_the_model_and_says_why_not_elsewhere():
    scenario = tiny_scenario(4, [6.5e9, 6.5e9, 2.3e9], [0.001, 0.002, 0.01], ["a"] * 3)
    result = simulate(with_workload(scenario, rate=5.0, requests=50), "jffc-whole", seed=0)
    assert result.summary["n_unfinished"] == 0
    assert {r.hops for r in result.records} == {1}  # one server holds the whole model for each request
    whole = chains.whole_model(scenario)
    assert [(s.server, s.start, s.end) for s in whole.spans] == [(0, 0, 4), (1, 0, 4)]
    small = tiny_scenario(4, [2.3e9, 2.3e9, 2.3e9, 2.3e9], [0.01] * 4, ["a"] * 4)
    with pytest.raises(Infeasible, match="no server can hold the whole model"):
        simulate(small, "jffc-whole", seed=0)


def test_plan_names_the_chains_and_their_capacity():
    scenario = two_fast_two_slow(5.0)
    result = plan(scenario, "chains")
    found = chains.gca(scenario, result.placement)
    assert result.R == sum(c.capacity for c in found) and result.routes[0] == found[0].route
    assert "chains" in result.notes[-1]


def test_the_estimate_used_to_tune_c_is_the_service_time_alone_at_no_load_and_infinite_past_capacity():
    route = chains.gca(two_fast_two_slow(1.0), Placement((Span(0, 0, 4, 25),), 4))[0].route
    chain = chains.Chain(route, 2, 10.0)
    assert chains.response_estimate_s((chain,), 0.0) == 10.0
    assert chains.response_estimate_s((chain,), 0.2) == float("inf")  # 2 slots / 10 s carry 0.2/s at most
    # M/M/2 at offered load 1: P(wait) = 1/3, mean wait = P(wait)·T/(n − a) = 10/3 s
    assert abs(chains.response_estimate_s((chain,), 0.1) - (10.0 + 10.0 / 3)) < 1e-9


def test_wsrr_queue_waits_for_a_faster_route_only_while_nobody_queues_behind():
    """A fast server busy until 0.1 s and a slow one free: waiting 0.1 s for the fast one is quicker
    (0.1 + ~0.37 s against ~0.56 s), so a request alone waits; with a request queued behind it,
    it takes the slow free route; with the fast one free, it takes the fast one."""
    from blockswarm.core.specs import Request
    from blockswarm.planner import wsrr
    from blockswarm.planner.view import SwarmView

    scenario = tiny_scenario(2, [2.3e9, 6.5e9], [0.001, 0.02], ["a", "a"], ["b"])
    placement = Placement((Span(0, 0, 2, 3), Span(1, 0, 2, 45)), 2)
    request = Request(0, 4, 6)
    busy = dict(active={0: ((0.1, 2),)}, used={0: 2})
    alone = SwarmView(scenario, placement, 0.0, **busy)
    assert wsrr.route(alone, request).start_s == 0.1 and wsrr.route_or_queue(alone, request) is None
    behind = SwarmView(scenario, placement, 0.0, **busy, queued=1)
    assert [h.server for h in wsrr.route_or_queue(behind, request).hops] == [1]
    free = SwarmView(scenario, placement, 0.0, queued=1)
    assert [h.server for h in wsrr.route_or_queue(free, request).hops] == [0]
