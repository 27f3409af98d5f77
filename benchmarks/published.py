"""Both published studies re-run with the inputs their authors really used (scenarios/published/,
shared/spec/published-runs.md).

- The first study's clustered runs: 9 servers, the client in each of the three clusters,
  l_out = 64 and 128, PETALS vs CG-BPRR, mean per-token time; one run on the published arrival
  stream (seed 0), PETALS with the pinned join order; then the spread of PETALS over join orders
  (seeds 0..N-1, the order drawn per seed). The 26-server variant with the client in cluster 0.
- The follow-up's experiment: Llama-2-7B on 9 MIG slices, the Azure coding trace, PETALS,
  CG-BPRR, jffc-whole and chains (GBP-CR + GCA + JFFC): mean, median, p95 and p99 response time,
  mean waiting and mean service time.

    .venv/bin/python benchmarks/published.py --json published.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from blockswarm.perf.scenario import load_scenario
from blockswarm.sim.fanout import LocalFanout, Run
from blockswarm.sim.runner import with_workload
from meta import run_metadata

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "scenarios" / "published"
CLUSTERED = [("clustered-9", f"clustered-9-client{c}.yaml", f"client{c}") for c in range(3)] + [
    ("clustered-26", "clustered-26-client0.yaml", "client0")]
FOLLOW_UP = "chains-azure-code.yaml"
FOLLOW_UP_POLICIES = ("petals", "cgbprr", "jffc-whole", "chains")


def unpinned(scenario):
    """The same scenario with PETALS' join order drawn per seed (for the spread over orders)."""
    return dataclasses.replace(scenario, behaviour=dataclasses.replace(scenario.behaviour, petals_join_order=None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--orders", type=int, default=20, help="PETALS join orders drawn for the spread")
    parser.add_argument("--workers", type=int, default=0, help="local processes (0: one per core)")
    args = parser.parse_args()
    runs, keys = [], []
    for name, file, client in CLUSTERED:
        base = load_scenario(PUBLISHED / file)
        for output in (64, 128):
            scenario = with_workload(base, output_tokens=output)
            for policy in ("petals", "cgbprr"):
                runs.append(Run(scenario, policy, 0))
                keys.append((name, client, output, policy, "published"))
            for seed in range(args.orders):
                # the seed draws PETALS' join order; the arrival stream stays the published one
                # (its RandomState is matlab_seed + seed, so matlab_seed is moved back by the seed)
                stream = dataclasses.replace(scenario.workload, matlab_seed=scenario.workload.matlab_seed - seed)
                runs.append(Run(unpinned(dataclasses.replace(scenario, workload=stream)), "petals", seed))
                keys.append((name, client, output, "petals", "order"))
    follow_up = load_scenario(PUBLISHED / FOLLOW_UP)
    for policy in FOLLOW_UP_POLICIES:
        runs.append(Run(follow_up, policy, 0))
        keys.append(("chains-azure-code", "orchestrator", None, policy, "published"))
    results = LocalFanout(args.workers).map(runs)

    out, spread = [], {}
    for key, result in zip(keys, results):
        name, client, output, policy, kind = key
        s = result.summary
        if kind == "order":
            spread.setdefault((name, client, output), []).append(s["mean_per_token_s"])
            continue
        row = {"scenario": name, "client": client, "policy": policy}
        if output is not None:
            row.update(output_tokens=output, mean_per_token_s=s["mean_per_token_s"], mean_ttft_s=s["mean_ttft_s"],
                       mean_wait_s=s["mean_wait_s"])
        else:
            row.update({k: s[k] for k in ("mean_response_s", "p50_response_s", "p95_response_s", "p99_response_s",
                                          "mean_wait_s", "mean_service_s", "mean_per_token_s")})
        out.append(row)
    for row in out:
        orders = spread.get((row["scenario"], row["client"], row.get("output_tokens")))
        if row["policy"] == "petals" and orders:
            row["petals_over_join_orders"] = {"n": len(orders), "mean": statistics.fmean(orders),
                                              "min": min(orders), "max": max(orders)}

    print(f"{'scenario':<14}{'client':>9}{'l_out':>6}{'PETALS s/tok':>14}{'(orders min-max)':>18}"
          f"{'CG-BPRR s/tok':>15}{'reduction':>11}")
    by = {(r["scenario"], r["client"], r.get("output_tokens"), r["policy"]): r for r in out}
    for name, _, client in CLUSTERED:
        for output in (64, 128):
            p, c = by[(name, client, output, "petals")], by[(name, client, output, "cgbprr")]
            o = p["petals_over_join_orders"]
            print(f"{name:<14}{client:>9}{output:>6}{p['mean_per_token_s']:>14.3f}"
                  f"{o['min']:>9.2f}-{o['max']:<8.2f}{c['mean_per_token_s']:>15.3f}"
                  f"{1 - c['mean_per_token_s'] / p['mean_per_token_s']:>11.1%}")
    print(f"\n{FOLLOW_UP} (Azure coding trace, {follow_up.workload.num_requests} requests, "
          f"{follow_up.workload.rate:.2f} requests/s):")
    print(f"{'policy':<12}{'mean s':>9}{'median':>9}{'p95':>9}{'p99':>9}{'wait':>9}{'service':>9}")
    for policy in FOLLOW_UP_POLICIES:
        r = by[("chains-azure-code", "orchestrator", None, policy)]
        print(f"{policy:<12}{r['mean_response_s']:>9.2f}{r['p50_response_s']:>9.2f}{r['p95_response_s']:>9.2f}"
              f"{r['p99_response_s']:>9.2f}{r['mean_wait_s']:>9.2f}{r['mean_service_s']:>9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": out, "meta": run_metadata()}, indent=2))


if __name__ == "__main__":
    main()
