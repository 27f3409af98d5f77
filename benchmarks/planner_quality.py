"""Planner quality and speed.

1. Gap to the optimum: on random instances with 4-12 servers, the summed per-token time of
   `petals` and `cgbprr` (placement + routing for the same concurrent requests) against the MILP
   optimum, as a fraction: (heuristic − optimum) / optimum. A heuristic whose plan breaks the
   memory rule for those requests (PETALS sizes its cache its own way) is counted apart.
2. Plan time against swarm size: CG-BP placement + a route for every client, for 10 … 10,000
   servers on BLOOM-176B (L = 70), mixed A100 / MIG servers over 10 sites.
3. The MILP on clustered-9 with 10 concurrent requests: time to proven optimality.

    .venv/bin/python benchmarks/planner_quality.py --json planner_quality.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from blockswarm.core.errors import Infeasible
from blockswarm.core.specs import Request
from blockswarm.perf.model import default_request
from blockswarm.perf.scenario import load_scenario
from blockswarm.planner import cgbprr, milp, petals
from blockswarm.planner.evaluate import total_per_token_s
from blockswarm.planner.view import SwarmView
from meta import run_metadata
from swarms import mixed_swarm

ROOT = Path(__file__).resolve().parents[1]


def gap_study(instances: int, seed: int, time_limit_s: float) -> dict:
    rng = random.Random(seed)
    gaps = {"petals": [], "cgbprr": []}
    memory_broken = {"petals": 0, "cgbprr": 0}
    solve_times, unproven, done = [], 0, 0
    while done < instances:
        scenario = mixed_swarm(rng, rng.randint(4, 12), rng.randint(8, 16), sites=3, clients=rng.randint(1, 2),
                               memory_jitter=0.2)
        count = rng.randint(1, 4)
        requests = [Request(client=i % len(scenario.clients), prompt_tokens=20, output_tokens=128)
                    for i in range(count)]
        try:
            result = milp.solve(scenario, requests, time_limit_s)
        except Infeasible:
            continue
        if not result.solution.optimal:
            unproven += 1
            continue
        done += 1
        solve_times.append(result.solution.seconds)
        optimum = result.objective
        for name, place, router in (("petals", lambda s: petals.place(s), petals.route),
                                    ("cgbprr", lambda s: cgbprr.place(s, count).placement, cgbprr.route)):
            try:
                value = total_per_token_s(scenario, place(scenario), router, requests)
            except Infeasible:
                value = None
            if value is None:
                memory_broken[name] += 1
            else:
                gaps[name].append((value - optimum) / optimum)
        print(f"\r  instance {done}/{instances}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return {
        "gap_to_optimum": {name: {"mean": statistics.mean(v), "worst": max(v), "instances": len(v),
                                  "infeasible_or_memory_broken": memory_broken[name]}
                           for name, v in gaps.items()},
        "milp_seconds": {"median": statistics.median(solve_times), "max": max(solve_times)},
        "milp_unproven_skipped": unproven,
    }


def speed_study(sizes: list[int], seed: int) -> dict:
    rng = random.Random(seed)
    seconds = {}
    for n in sizes:
        scenario = mixed_swarm(rng, n, 70, sites=10, clients=3)
        begin = time.perf_counter()
        result = cgbprr.place(scenario, R=max(1, n // 20))
        view = SwarmView(scenario, result.placement)
        for client in range(len(scenario.clients)):
            cgbprr.route(view, default_request(scenario, client))
        seconds[str(n)] = time.perf_counter() - begin
        print(f"  {n:>6} servers: {seconds[str(n)]:.3f} s", file=sys.stderr)
    return seconds


def clustered_milp(time_limit_s: float) -> dict:
    scenario = load_scenario(ROOT / "scenarios" / "clustered-9.yaml")
    result = milp.solve(scenario, [default_request(scenario)] * 10, time_limit_s)
    return {"servers": 9, "requests": 10, "status": result.solution.status, "optimal": result.solution.optimal,
            "seconds": result.solution.seconds, "mean_per_token_s": result.mean_per_token_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument("--sizes", default="10,100,1000,10000")
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print("gap to the MILP optimum ...", file=sys.stderr)
    gaps = gap_study(args.instances, args.seed, args.time_limit)
    print("plan time (CG-BP + routing) ...", file=sys.stderr)
    speed = speed_study([int(x) for x in args.sizes.split(",")], args.seed)
    print("MILP on clustered-9, 10 requests ...", file=sys.stderr)
    clustered = clustered_milp(args.time_limit)

    print(f"\n{'policy':<10}{'mean gap':>10}{'worst gap':>11}{'instances':>11}{'memory broken':>15}")
    for name, row in gaps["gap_to_optimum"].items():
        print(f"{name:<10}{row['mean']:>10.2%}{row['worst']:>11.2%}{row['instances']:>11}"
              f"{row['infeasible_or_memory_broken']:>15}")
    print(f"\n{'servers':>8}{'CG-BP + routing s':>20}")
    for n, s in speed.items():
        print(f"{n:>8}{s:>20.3f}")
    print(f"\nMILP clustered-9, 10 requests: {clustered['status']} in {clustered['seconds']:.1f} s "
          f"(target: optimal within 60 s); per-token {clustered['mean_per_token_s']:.4f} s")
    result = {**gaps, "plan_seconds_by_servers": speed, "milp_clustered_9": clustered,
              "instances": args.instances, "seed": args.seed, "meta": run_metadata()}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
