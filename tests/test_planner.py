"""The planner: the MILP against brute force, heuristics against the MILP, and properties of every policy."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from blockswarm.core.errors import Infeasible
from blockswarm.core.specs import Request
from blockswarm.perf.model import default_request, route_per_token_s, slots
from blockswarm.planner import cgbprr, milp, petals, wsrr
from blockswarm.planner.evaluate import total_per_token_s
from blockswarm.planner.view import SwarmView

from planner_instances import BLOCK_BYTES, all_routes, brute_force_optimum, scenarios, tiny_scenario

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def placements_count(scenario) -> int:
    L, total = scenario.model.num_blocks, 1
    for spec in scenario.servers:
        cap = min(L, int(spec.memory_bytes // BLOCK_BYTES))
        total *= sum(L - m + 1 for m in range(1, cap + 1))
    return total


def requests_for(scenario, count):
    return [Request(client=i % len(scenario.clients), prompt_tokens=4, output_tokens=6) for i in range(count)]


@SETTINGS
@given(scenario=scenarios(), count=st.integers(1, 3))
def test_milp_agrees_with_brute_force_and_heuristics_are_not_better(scenario, count):
    assume(placements_count(scenario) <= 1500)
    requests = requests_for(scenario, count)
    best = brute_force_optimum(scenario, requests)
    if best is None:
        with pytest.raises(Infeasible):
            milp.solve(scenario, requests, time_limit_s=30)
        return
    result = milp.solve(scenario, requests, time_limit_s=30)
    assert result.solution.optimal
    assert math.isclose(result.objective, best, rel_tol=1e-6)
    assert all(r.covers(scenario.model.num_blocks) for r in result.routes)
    heuristics = []
    try:
        heuristics.append(total_per_token_s(scenario, cgbprr.place(scenario, count).placement, cgbprr.route, requests))
    except Infeasible:
        pass
    try:
        heuristics.append(total_per_token_s(scenario, petals.place(scenario), petals.route, requests))
    except Infeasible:
        pass
    for value in heuristics:
        if value is not None:
            assert value >= best - 1e-9


@SETTINGS
@given(scenario=scenarios(max_servers=12, max_blocks=20), R=st.integers(1, 6))
def test_cgbprr_routes_cover_memory_holds_and_bound_holds(scenario, R):
    try:
        result = cgbprr.place(scenario, R)
    except Infeasible:
        assume(False)
    view = SwarmView(scenario, result.placement)
    for span in result.placement.spans:
        memory = scenario.model.block_bytes * span.length + scenario.session_cache_bytes * span.slots
        assert memory <= scenario.servers[span.server].memory_bytes
        assert span.slots // span.length >= R  # every hop has cache for R sessions
    costs = []
    for client in range(len(scenario.clients)):
        route = cgbprr.route(view, default_request(scenario, client))
        assert route.covers(scenario.model.num_blocks)
        costs.append(route_per_token_s(scenario, route, client))
    assert sum(costs) / len(costs) <= result.bound_per_token_s + 1e-9


@SETTINGS
@given(scenario=scenarios(max_servers=12, max_blocks=20))
def test_petals_routes_cover_and_memory_holds(scenario):
    try:
        placement = petals.place(scenario)
    except Infeasible:
        assume(False)
    view = SwarmView(scenario, placement)
    for span in placement.spans:
        assert span.length == petals.block_count(scenario, span.server)
    for client in range(len(scenario.clients)):
        assert petals.route(view, default_request(scenario, client)).covers(scenario.model.num_blocks)


@SETTINGS
@given(scenario=scenarios(max_servers=10, max_blocks=12), R=st.integers(1, 4),
       gaps=st.lists(st.floats(0.0, 3.0), min_size=5, max_size=30))
def test_wsrr_never_reserves_more_slots_than_a_server_has(scenario, R, gaps):
    try:
        placement = cgbprr.place(scenario, R).placement
    except Infeasible:
        assume(False)
    active: dict[int, list[tuple[float, float, int]]] = {}  # server -> (start, end, slots)
    now = 0.0
    for index, gap in enumerate(gaps):
        now += gap
        request = Request(client=index % len(scenario.clients), prompt_tokens=4, output_tokens=6, arrival_s=now)
        view = SwarmView(scenario, placement, now,
                         {j: tuple((end, held) for _, end, held in sessions if end > now)
                          for j, sessions in active.items()})
        decision = wsrr.route(view, request)
        assert decision.route.covers(scenario.model.num_blocks)
        start = decision.start_s
        from blockswarm.perf.model import route_time
        end = start + route_time(scenario, decision.route, request).completion_s
        for hop in decision.route.hops:
            active.setdefault(hop.server, []).append((start, end, hop.blocks))
    for server, sessions in active.items():
        capacity = placement.span_of(server).slots
        for start, _, _ in sessions:  # occupancy at every moment a session begins
            held = sum(n for s, e, n in sessions if s <= start < e)
            assert held <= capacity


def test_infeasible_swarms_get_clear_errors():
    scenario = tiny_scenario(8, [1.5e9, 1.5e9], [0.01, 0.01], ["a", "a"])  # 2 blocks' memory for 8 blocks
    with pytest.raises(Infeasible, match="cannot hold R=1"):
        cgbprr.place(scenario, 1)
    with pytest.raises(Infeasible, match="uncovered"):
        petals.place(scenario)
    with pytest.raises(Infeasible, match="no feasible plan"):
        milp.solve(scenario, [default_request(scenario)], time_limit_s=10)
    with pytest.raises(Infeasible, match="add servers or memory"):
        wsrr.choose_R(scenario)


def test_milp_on_clustered_9_matches_the_hand_computed_optimum():
    """Two A100s in one chain: 2·(100 ms RTT + 100 ms overhead) + 70 blocks · 3.2197 ms."""
    from blockswarm.perf.scenario import load_scenario

    scenario = load_scenario("scenarios/clustered-9.yaml")
    result = milp.solve(scenario, [default_request(scenario)] * 2, time_limit_s=60)
    assert result.solution.optimal
    assert math.isclose(result.mean_per_token_s, 2 * 0.2 + 70 * 3.2197e-3, rel_tol=1e-9)


def test_route_enumeration_sees_every_chain():
    scenario = tiny_scenario(4, [6.5e9] * 3, [0.01] * 3, ["a"] * 3)
    from blockswarm.core.specs import Placement, Span

    placement = Placement((Span(0, 0, 2, 4), Span(1, 1, 4, 4), Span(2, 2, 4, 4)), 4)
    chains = {tuple((h.server, h.start, h.end) for h in r.hops) for r in all_routes(placement)}
    assert chains == {((0, 0, 2), (1, 2, 4)), ((0, 0, 2), (2, 2, 4))}
    assert slots(scenario, 0, 2) == 45


@SETTINGS
@given(spans=st.lists(st.tuples(st.integers(0, 7), st.integers(1, 8)), min_size=1, max_size=6), start=st.integers(0, 7))
def test_a_route_from_a_later_boundary_is_the_cheapest_covering_tail(spans, start):
    """The tail that replaces a failed hop: contiguous from `start` to L, and no dearer than any
    tail that the full routes from 0 contain (brute force over every chain)."""
    from blockswarm.core.specs import Placement, Span
    from blockswarm.planner.routing import shortest_route

    L = 8
    placement = Placement(tuple(Span(i, a, min(L, a + m), 1) for i, (a, m) in enumerate(spans)), L)
    cost = lambda server, a, b: 1.0 + 0.1 * server * (b - a)  # noqa: E731
    tails = []
    for route in all_routes(placement):
        hops = [h for h in route.hops if h.end > start]
        if hops and any(h.start == start for h in hops):
            tails.append(sum(cost(h.server, h.start, h.end) for h in hops))
    try:
        total, route = shortest_route(placement, cost, start=start)
    except Infeasible:
        assert not tails
        return
    assert route.hops[0].start == start and route.hops[-1].end == L
    assert all(a.end == b.start for a, b in zip(route.hops, route.hops[1:]))
    assert math.isclose(total, sum(cost(h.server, h.start, h.end) for h in route.hops))
    assert all(total <= t + 1e-12 for t in tails)


def reference_wsrr(view, request):
    """WS-RR without its shortcut: every hop priced with its wait, always the full Dijkstra."""
    from blockswarm.perf.model import hop_service_s
    from blockswarm.planner.routing import shortest_route

    free_at = {}

    def cost(server, start, end):
        ready = view.slots_free_at(server, end - start)
        if ready is None:
            return None
        free_at[(server, end - start)] = ready
        return (ready - view.now) + hop_service_s(view.scenario, request, server, end - start)

    route = shortest_route(view.placement, cost, view.index, 0)[1]
    return route, max(free_at[(h.server, h.blocks)] for h in route.hops)


STREAM = dict(R=st.integers(1, 3), gaps=st.lists(st.floats(0.0, 0.5), min_size=5, max_size=40),
              lengths=st.lists(st.integers(1, 9), min_size=1, max_size=3))


@SETTINGS
@given(scenario=scenarios(max_servers=10, max_blocks=12), **STREAM)
def test_wsrr_decides_exactly_as_the_full_search_under_congestion(scenario, R, gaps, lengths):
    """WS-RR (its shortcut: the memoized load-free route whenever all its hops have room; else every
    hop priced at once in numpy over the boundary DAG) gives the same route and the same start, bit
    for bit, as the full waiting-aware Dijkstra, on a stream of requests arriving faster than they
    finish, with one memo across them as the simulator and the coordinator keep it."""
    referee_stream(scenario, R, gaps, lengths)


@SETTINGS
@given(kinds=st.lists(st.tuples(st.sampled_from([1.5e9, 2.3e9, 3.5e9, 6.5e9]), st.sampled_from([0.001, 0.01])),
                      min_size=1, max_size=3), copies=st.integers(2, 4), L=st.integers(3, 10), **STREAM)
def test_wsrr_breaks_ties_as_dijkstra_among_identical_servers(kinds, copies, L, R, gaps, lengths):
    """Identical servers (same memory, speed and site) make equal-cost routes common; the numpy
    search must still pick Dijkstra's (first settled source, then span order)."""
    servers = [kind for kind in kinds for _ in range(copies)]
    scenario = tiny_scenario(L, [m for m, _ in servers], [t for _, t in servers], ["a"] * len(servers))
    referee_stream(scenario, R, gaps, lengths)


def referee_stream(scenario, R, gaps, lengths):
    from blockswarm.perf.model import route_time
    from blockswarm.planner.routing import block_index

    try:
        placement = cgbprr.place(scenario, R).placement
    except Infeasible:
        assume(False)
    active: dict[int, list[tuple[float, int]]] = {}
    memo, index, now = {}, block_index(placement), 0.0
    for i, gap in enumerate(gaps):
        now += gap
        request = Request(client=i % len(scenario.clients), prompt_tokens=lengths[i % len(lengths)],
                          output_tokens=lengths[(i + 1) % len(lengths)] + 1, arrival_s=now)
        live = {j: tuple(s for s in sessions if s[0] > now) for j, sessions in active.items()}
        view = SwarmView(scenario, placement, now, live, index, None, memo)
        decision = wsrr.route(view, request)
        assert (decision.route, decision.start_s) == reference_wsrr(view, request)
        end = decision.start_s + route_time(scenario, decision.route, request).completion_s
        for hop in decision.route.hops:
            active.setdefault(hop.server, []).append((end, hop.blocks))


@SETTINGS
@given(scenario=scenarios(max_servers=6), prompt=st.integers(1, 500), output=st.integers(1, 500))
def test_vectorized_hop_prices_equal_the_scalar_model_bit_for_bit(scenario, prompt, output):
    import numpy as np

    from blockswarm.perf.model import ServerTable, hop_service_array, hop_service_s

    servers = np.array([j for j in range(len(scenario.servers)) for _ in range(scenario.model.num_blocks)])
    blocks = np.array([k for _ in scenario.servers for k in range(1, scenario.model.num_blocks + 1)])
    for client in range(len(scenario.clients)):
        request = Request(client, prompt, output)
        vector = hop_service_array(scenario, ServerTable.of(scenario), request, servers, blocks)
        assert vector.tolist() == [hop_service_s(scenario, request, int(j), int(k)) for j, k in zip(servers, blocks)]


@SETTINGS
@given(ops=st.lists(st.tuples(st.integers(0, 2), st.floats(0.0, 50.0), st.integers(1, 6)), max_size=40),
       slot_counts=st.lists(st.integers(0, 9), min_size=3, max_size=3), now=st.floats(0.0, 60.0))
def test_free_times_kept_incrementally_answer_as_slots_free_at(ops, slot_counts, now):
    """Sessions come and go on three servers (one that would overfill a server ends its oldest
    session instead); the table kept by marking the servers changed equals `slots_free_at` for
    every server and k."""
    from blockswarm.core.specs import Placement, Span
    from blockswarm.planner.freetimes import FreeTimes
    from blockswarm.planner.view import ActiveBySession

    scenario = tiny_scenario(6, [6.5e9] * 3, [0.01] * 3, ["a"] * 3)
    placement = Placement(tuple(Span(j, j, 6, slot_counts[j]) for j in range(3)), 6)
    active: dict[int, dict[int, tuple[float, int]]] = {j: {} for j in range(3)}
    used = {j: 0 for j in range(3)}
    view_active = ActiveBySession(active)
    times = FreeTimes(placement, 3, view_active, used)
    for i, (server, end, held) in enumerate(ops):
        if used[server] + held > slot_counts[server]:
            if active[server]:  # full: the oldest session ends instead
                oldest = next(iter(active[server]))
                used[server] -= active[server].pop(oldest)[1]
                times.mark(server)
            continue
        active[server][i] = (end, held)
        used[server] += held
        times.mark(server)
        times.table()  # read between changes, as a router does
    view = SwarmView(scenario, placement, now, view_active, None, used)
    table = times.table()
    for j in range(3):
        for k in range(1, 7 - j):
            expected = view.slots_free_at(j, k)
            got = max(now, table[j, k])
            assert (expected is None and got == math.inf) or got == expected


TIE = [None] * 64  # two routes of cost 3; Dijkstra settles boundary 2 (cost 1) before boundary 1 (cost 2)
TIE[0], TIE[8], TIE[9], TIE[17], TIE[18] = 2, 1, 9, 1, 2


@SETTINGS
@given(spans=st.lists(st.tuples(st.integers(0, 7), st.integers(1, 8)), min_size=1, max_size=8),
       prices=st.lists(st.one_of(st.integers(1, 3), st.none()), min_size=64, max_size=64), start=st.integers(0, 3))
@example(spans=[(0, 1), (0, 2), (1, 7)], prices=TIE, start=0)
def test_the_numpy_search_picks_dijkstras_route_even_among_ties(spans, prices, start):
    """Small integer hop costs make equal-cost routes the rule; `cheapest` over the boundary graph
    must return the very route (and cost) that `shortest_route` does, or fail where it fails."""
    import numpy as np

    from blockswarm.core.specs import Placement, Span
    from blockswarm.planner.routing import boundary_graph, cheapest, shortest_route

    L = 8
    placement = Placement(tuple(Span(i, a, min(L, a + m), 1) for i, (a, m) in enumerate(spans)), L)
    price = lambda server, a, b: prices[(server * 8 + a) % 64]  # noqa: E731
    graph = boundary_graph(placement, start)
    cost = np.array([math.inf if price(j, a, a + k) is None else float(price(j, a, a + k))
                     for j, a, k in zip(graph.server.tolist(), graph.entry.tolist(), graph.blocks.tolist())])
    found = cheapest(graph, cost)
    try:
        total, expected = shortest_route(placement, lambda j, a, b: None if price(j, a, b) is None
                                         else float(price(j, a, b)), start=start)
    except Infeasible:
        assert found is None
        return
    assert found is not None and found[0] == expected
    assert sum(cost[e] for e in found[1]) == total
