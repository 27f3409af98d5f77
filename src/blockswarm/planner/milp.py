"""The exact joint placement + routing MILP of §6, solved with HiGHS.

Per server j: integers a_j (first block) and e_j = a_j + m_j (end, exclusive), m_j ≥ 1.
Per request r and logical link (source→j, i→j, i→destination): a binary f. The blocks
computed at j after i are k = e_j − e_i (a server computes from where it enters to its end;
the source has e = 0), so k·f = u − v with u = e_j·f and v = e_i·f linearized by big-M (M = L).
This is the spec's α − β + γ − δ with a_j + m_j folded into e_j. Objective: Σ_r per-token cost
Σ_(i,j) (t_cj·f + τ_j·k·f) (the spec's l_max factor is a constant and is left out).
Memory: s_m·m_j + s_c·Σ_r k_rj ≤ M_j. No gaps: a_j ≤ e_i; progress: e_j ≥ e_i + 1; the first
hop starts at 0; the last hop ends at L.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from blockswarm.core.errors import Infeasible
from blockswarm.core.specs import Hop, Placement, Request, Route, Scenario, Span
from blockswarm.perf.model import decode_link_s, route_per_token_s, slots
from blockswarm.planner.mip import Model, Solution


@dataclass(frozen=True, slots=True)
class MilpResult:
    placement: Placement
    routes: tuple[Route, ...]  # one per request, in order
    objective: float  # Σ_r per-token time of r's route (seconds)
    solution: Solution

    @property
    def mean_per_token_s(self) -> float:
        return self.objective / len(self.routes)


def solve(scenario: Scenario, requests: list[Request], time_limit_s: float = 60.0, threads: int = 1) -> MilpResult:
    if not requests:
        raise Infeasible("the MILP needs at least one request")
    L = scenario.model.num_blocks
    s_m, s_c = scenario.model.block_bytes, scenario.session_cache_bytes
    servers = [j for j, spec in enumerate(scenario.servers) if spec.memory_bytes >= s_m]
    if not servers:
        raise Infeasible("no server can hold even one block")
    most = {j: min(L, int(scenario.servers[j].memory_bytes // s_m)) for j in servers}  # blocks j could ever hold
    model = Model()
    a = {j: model.var(lower=0, upper=L - 1, integer=True) for j in servers}
    e = {j: model.var(lower=1, upper=L, integer=True) for j in servers}
    for j in servers:
        model.row([(e[j], 1), (a[j], -1)], lower=1)  # m_j ≥ 1
    cache_terms = {j: [] for j in servers}
    links = []  # per request: {(i, j): (f, u, v)} with i = "s" or a server, j a server or "d"
    for request in requests:
        tau = {j: scenario.servers[j].decode_s for j in servers}
        link = {j: decode_link_s(scenario, request.client, j) for j in servers}
        f = {}
        for j in servers:
            flow, u = model.var(cost=link[j], upper=1, integer=True), model.var(cost=tau[j], upper=L)
            _product(model, u, e[j], flow, L)
            _at_most_held(model, u, None, flow, a[j], e[j], most[j])
            model.row([(a[j], 1), (flow, L)], upper=L)  # first hop starts at block 0
            f[("s", j)] = (flow, u, None)
            cache_terms[j].append((u, s_c))
            for i in servers:
                if i == j:
                    continue
                flow, u, v = (model.var(cost=link[j], upper=1, integer=True), model.var(cost=tau[j], upper=L),
                              model.var(cost=-tau[j], upper=L))
                _product(model, u, e[j], flow, L)
                _product(model, v, e[i], flow, L)
                _at_most_held(model, u, v, flow, a[j], e[j], most[j])
                model.row([(a[j], 1), (e[i], -1), (flow, L)], upper=L)  # no gap: a_j ≤ e_i
                model.row([(e[j], 1), (e[i], -1), (flow, -(L + 1))], lower=-L)  # progress: e_j ≥ e_i + 1
                f[(i, j)] = (flow, u, v)
                cache_terms[j] += [(u, s_c), (v, -s_c)]
            done = model.var(upper=1, integer=True)
            model.row([(e[j], 1), (done, -L)], lower=0)  # the last hop ends at L
            f[(j, "d")] = (done, None, None)
        # Valid equality that makes the relaxation strong: the blocks computed along any route
        # telescope to L (Σ k = e_last − 0). Without it HiGHS cannot close the gap even for one request.
        model.row([(f[key][1], 1) for key in f if f[key][1] is not None]
                  + [(f[key][2], -1) for key in f if f[key][2] is not None], lower=L, upper=L)
        model.row([(f[("s", j)][0], 1) for j in servers], lower=1, upper=1)
        model.row([(f[(j, "d")][0], 1) for j in servers], lower=1, upper=1)
        for j in servers:
            into = [(f[key][0], 1) for key in f if key[1] == j]
            out = [(f[key][0], -1) for key in f if key[0] == j]
            model.row(into + out, lower=0, upper=0)
        links.append(f)
    for j in servers:
        model.row([(e[j], s_m), (a[j], -s_m)] + cache_terms[j], upper=scenario.servers[j].memory_bytes)
    for i, j in zip(servers, servers[1:]):  # identical servers are interchangeable: order them
        if _same(scenario.servers[i], scenario.servers[j]):
            model.row([(a[i], 1), (a[j], -1)], upper=0)
    solution = model.solve(time_limit_s, threads=threads)
    if solution.values is None:
        raise Infeasible(f"the MILP found no feasible plan ({solution.status}): too little memory for "
                         f"{len(requests)} concurrent requests, or too short a time limit")
    x = solution.values
    ends = {j: round(x[e[j]]) for j in servers}
    starts = {j: round(x[a[j]]) for j in servers}
    spans = tuple(Span(j, starts[j], ends[j], slots(scenario, j, ends[j] - starts[j])) for j in servers)
    routes = tuple(_follow(f, x, ends) for f in links)
    objective = sum(route_per_token_s(scenario, r, q.client) for r, q in zip(routes, requests))
    return MilpResult(Placement(spans, L), routes, objective, solution)


def _same(one, other) -> bool:
    return dataclasses.replace(one, name="") == dataclasses.replace(other, name="")


def _at_most_held(model: Model, u: int, v: int | None, flow: int, a: int, e: int, most: int) -> None:
    """Valid cuts: a used hop computes at least one block and at most the blocks its server holds
    (1 ≤ k ≤ m_j ≤ most_j), so f ≤ k·f ≤ most_j·f and k·f ≤ e_j − a_j. Without them the big-M
    relaxation lets k·f go negative and HiGHS cannot close the gap."""
    minus_v = [(v, -1)] if v is not None else []
    model.row([(u, 1), *minus_v, (flow, -most)], upper=0)
    model.row([(u, 1), *minus_v, (flow, -1)], lower=0)  # and at least one block when used
    model.row([(u, 1), *minus_v, (e, -1), (a, 1)], upper=0)


def _product(model: Model, product: int, integer_var: int, binary: int, big: int) -> None:
    """product = integer_var · binary, for 0 ≤ integer_var ≤ big."""
    model.row([(product, 1), (binary, -big)], upper=0)
    model.row([(product, 1), (integer_var, -1)], upper=0)
    model.row([(product, 1), (integer_var, -1), (binary, -big)], lower=-big)


def _follow(f: dict, x, ends: dict[int, int]) -> Route:
    hops, node, position = [], "s", 0
    while node != "d":
        node_next = next(key[1] for key in f if key[0] == node and x[f[key][0]] > 0.5)
        if node_next != "d":
            hops.append(Hop(node_next, position, ends[node_next]))
            position = ends[node_next]
        node = node_next
    return Route(tuple(hops))
