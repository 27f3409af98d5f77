"""Policies by name — the one way every caller (`plan`, the simulator, the coordinator) picks one —
and `plan`: one offline decision (placement + a route per client) with its predictions.

Placements and routers are registered separately so that callers can pair them
(`PLACEMENT+ROUTING`); shorthands name the published pairs, with one meaning everywhere:
`petals` = PETALS placement and routing, `cgbprr` = CG-BP placement with WS-RR routing (`wsrr`
is kept as another name for it), `chains` = GBP-CR placement (c tuned) + GCA chains + JFFC
dispatch from one central FIFO queue, `jffc-whole` = JFFC over servers that each hold the whole
model, `loadfit` = blockswarm's own (planner/loadfit.py: the placement of either family that
should give the lowest mean response time at the workload's rate, with WS-RR's choice admitted
through a central queue, `wsrr-queue`). `plan` also knows the exact policies `milp` and `rr-ilp`.

Routers differ in how a request waits, and callers follow the sets below: WAITING_ROUTERS answer
with a route whose cache may free up later (the caller reserves at once and starts then);
QUEUE_ROUTERS answer None when the request must wait in the caller's one central FIFO queue (a
completion hands its slot to the head); the others answer a route, and the caller queues the
request until that route has room.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from blockswarm.core.errors import ConfigError
from blockswarm.core.specs import Placement, Request, Route, Scenario
from blockswarm.perf.model import default_request, route_time
from blockswarm.planner import cgbprr, chains, loadfit, petals, wsrr
from blockswarm.planner.view import SwarmView


def _place_petals(scenario: Scenario, R: int, seed: int | None = None) -> Placement:
    return petals.place(scenario, seed)


def _place_cgbp(scenario: Scenario, R: int, seed: int | None = None) -> Placement:
    return cgbprr.place(scenario, R).placement


def _route_wsrr(view: SwarmView, request: Request, start: int = 0) -> Route:
    return wsrr.route(view, request, start).route


def _place_gbpcr(scenario: Scenario, R: int | None = None, seed: int | None = None) -> Placement:
    return chains.gbp_cr(scenario, chains.tune_c(scenario))


def _place_loadfit(scenario: Scenario, R: int | None = None, seed: int | None = None) -> Placement:
    return loadfit.place(scenario)


def _place_whole(scenario: Scenario, R: int | None = None, seed: int | None = None) -> Placement:
    return chains.whole_model(scenario)


# placement(scenario, R, seed) -> Placement; R is what CG-BP sizes for (the others ignore it), the
# seed is PETALS' join order (the others ignore it)
PLACEMENTS: dict[str, Callable[..., Placement]] = {"petals": _place_petals, "cgbp": _place_cgbp,
                                                   "gbpcr": _place_gbpcr, "whole": _place_whole,
                                                   "loadfit": _place_loadfit}
ROUTERS: dict[str, Callable[..., Route | None]] = {  # (view, request, start=0) -> Route (None: queue)
    "petals": petals.route, "shortest": cgbprr.route, "wsrr": _route_wsrr, "jffc": chains.jffc,
    "wsrr-queue": wsrr.route_or_queue,
}
WAITING_ROUTERS = frozenset({"wsrr"})
QUEUE_ROUTERS = frozenset({"jffc", "wsrr-queue"})
SHORTHANDS = {"petals": "petals+petals", "cgbprr": "cgbp+wsrr", "wsrr": "cgbp+wsrr", "chains": "gbpcr+jffc",
              "jffc-whole": "whole+jffc", "loadfit": "loadfit+wsrr-queue"}
EXACT = ("milp", "rr-ilp")
POLICIES = ("petals", "cgbprr", "wsrr", "chains", "jffc-whole", "loadfit", *EXACT)  # plan's named policies; any PLACEMENT+ROUTING pair too


def parse_policy(name: str) -> tuple[str, str]:
    """`PLACEMENT+ROUTING` or a shorthand -> (placement, routing); a clear error for anything else."""
    full = SHORTHANDS.get(name, name)
    placement, sep, routing = full.partition("+")
    if not sep or placement not in PLACEMENTS or routing not in ROUTERS:
        raise ConfigError(f"unknown policy {name!r}: give PLACEMENT+ROUTING with PLACEMENT in {sorted(PLACEMENTS)} "
                          f"and ROUTING in {sorted(ROUTERS)}, or a shorthand: {', '.join(SHORTHANDS)}")
    return placement, routing


def decide(routing: str, view: SwarmView, request: Request, start: int = 0) -> wsrr.RoutingDecision | None:
    """A route (from block boundary `start`: a tail, when a hop failed) and when it may start (now,
    unless the router waits for cache: see WAITING_ROUTERS); None when the request must wait in
    the central queue (QUEUE_ROUTERS)."""
    if routing == "wsrr":
        return wsrr.route(view, request, start)
    route = ROUTERS[routing](view, request, start)
    return None if route is None else wsrr.RoutingDecision(route, view.now)


@dataclass
class PlanResult:
    policy: str
    scenario: Scenario
    placement: Placement
    routes: dict[int, Route]  # client index -> route
    R: int
    bound_per_token_s: float | None = None
    solver: dict | None = None
    notes: list[str] = field(default_factory=list)

    def predictions(self) -> dict[int, tuple[float, float]]:
        """client -> (per-token time, TTFT) of its route for the workload's lengths, no contention."""
        out = {}
        for client, route in self.routes.items():
            time = route_time(self.scenario, route, default_request(self.scenario, client))
            out[client] = (time.per_token_s, time.ttft_s)
        return out

    def to_json(self) -> dict:
        predictions = self.predictions()
        clients = self.scenario.clients
        return {
            "policy": self.policy,
            "scenario": self.scenario.name,
            "servers": [s.name for s in self.scenario.servers],
            "placement": self.placement.to_json(),
            "routes": {clients[c].name: route.to_json() for c, route in self.routes.items()},
            "predicted_per_token_s": sum(p[0] for p in predictions.values()) / len(predictions),
            "predicted_ttft_s": sum(p[1] for p in predictions.values()) / len(predictions),
            "per_client": {clients[c].name: {"per_token_s": p[0], "ttft_s": p[1]} for c, p in predictions.items()},
            "bound_per_token_s": self.bound_per_token_s,
            "R": self.R,
            "solver": self.solver,
            "notes": self.notes,
        }


def petals_concurrency(placement: Placement) -> int:
    """How many sessions PETALS' fixed caches hold on the most crowded block."""
    per_block = [0] * placement.num_blocks
    for span in placement.spans:
        for block in range(span.start, span.end):
            per_block[block] += span.slots // span.length
    return min(per_block)


def plan(scenario: Scenario, policy: str, R: int | None = None, milp_requests: int = 10,
         time_limit_s: float = 60.0) -> PlanResult:
    clients = range(len(scenario.clients))
    if policy not in EXACT:
        try:
            placement_name, routing = parse_policy(policy)
        except ConfigError:
            raise ConfigError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)} or a "
                              f"PLACEMENT+ROUTING pair ({'/'.join(PLACEMENTS)} + {'/'.join(ROUTERS)})") from None
        router = ROUTERS[routing]
        if placement_name == "petals":
            placement = petals.place(scenario)
            view = SwarmView(scenario, placement)
            routes = {c: router(view, default_request(scenario, c)) for c in clients}
            return PlanResult(policy, scenario, placement, routes, petals_concurrency(placement),
                              notes=["PETALS sizes its cache without regard to R; R is what its caches hold"])
        if placement_name != "cgbp":  # the chain-sized placements: R is what their GCA chains carry
            notes = []
            if placement_name == "loadfit":
                choice = loadfit.choose(scenario)
                placement = choice.placement
                notes.append(f"loadfit chose {choice.family} sized {choice.size} (estimated mean response "
                             f"{choice.estimate_s:.2f} s at {scenario.workload.rate:g} requests/s)")
            else:
                placement = PLACEMENTS[placement_name](scenario)
            view = SwarmView(scenario, placement)
            routes = {c: router(view, default_request(scenario, c)) or cgbprr.route(view, default_request(scenario, c))
                      for c in clients}
            found = chains.gca(scenario, placement)
            notes.append(f"{len(found)} chains (GCA) carry {sum(c.capacity for c in found)} requests at once; R is "
                         "that total")
            return PlanResult(policy, scenario, placement, routes, sum(chain.capacity for chain in found),
                              notes=notes)
        R = R or wsrr.choose_R(scenario)
        result = cgbprr.place(scenario, R)
        view = SwarmView(scenario, result.placement)
        routes = {c: router(view, default_request(scenario, c)) for c in clients}
        return PlanResult(policy, scenario, result.placement, routes, R, result.bound_per_token_s)
    R = R or wsrr.choose_R(scenario)
    # The exact policies import HiGHS only when asked for: the simulator and the heuristics never need it.
    if policy == "rr-ilp":
        from blockswarm.planner import rr_ilp

        result = cgbprr.place(scenario, R)
        counts = {c: R // len(scenario.clients) + (c < R % len(scenario.clients)) for c in clients}
        counts = {c: n for c, n in counts.items() if n}
        routing = rr_ilp.solve(scenario, result.placement, counts, time_limit_s)
        routes = {c: paths[0][0] for c, paths in routing.routes.items()}
        solver = _solver_json(routing.solution, requests=R)
        return PlanResult(policy, scenario, result.placement, routes, R, result.bound_per_token_s, solver,
                          [f"routes {R} concurrent requests on the CG-BP placement; the route shown per client "
                           "is its most used one"])
    from blockswarm.planner import milp

    requests = [default_request(scenario, i % len(scenario.clients)) for i in range(min(R, milp_requests))]
    result = milp.solve(scenario, requests, time_limit_s)
    routes = {}
    for request, route in zip(requests, result.routes):
        routes.setdefault(request.client, route)
    note = (f"the MILP is solved for {len(requests)} concurrent requests (R={R} asked; "
            f"--milp-requests {milp_requests} caps it so that it solves in time)")
    return PlanResult(policy, scenario, result.placement, routes, len(requests),
                      solver=_solver_json(result.solution, requests=len(requests)), notes=[note])


def _solver_json(solution, requests: int) -> dict:
    return {"status": solution.status, "optimal": solution.optimal, "objective": solution.objective,
            "bound": solution.bound, "gap": solution.gap, "seconds": solution.seconds, "requests": requests}
