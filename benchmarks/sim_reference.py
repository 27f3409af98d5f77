"""The reference scenarios in the simulator: PETALS vs CG-BPRR (CG-BP + WS-RR) on clustered-9 and
clustered-26 at 0.1 and 0.5 requests/s and 64 and 128 output tokens (mean over seeds).

    .venv/bin/python benchmarks/sim_reference.py --json sim_reference.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from blockswarm.perf.scenario import load_scenario
from blockswarm.sim.experiments import compare
from blockswarm.sim.runner import with_workload
from meta import run_metadata

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for name in ("clustered-9", "clustered-26"):
        base = load_scenario(ROOT / "scenarios" / f"{name}.yaml")
        for rate in (0.1, 0.5):
            for output in (64, 128):
                table = compare(with_workload(base, rate=rate, output_tokens=output), ["petals", "cgbprr"], args.seeds)
                p, c = table["petals"], table["cgbprr"]
                rows.append({"scenario": name, "rate": rate, "output_tokens": output,
                             "petals_per_token_s": p["mean_per_token_s"], "cgbprr_per_token_s": c["mean_per_token_s"],
                             "petals_ttft_s": p["mean_ttft_s"], "cgbprr_ttft_s": c["mean_ttft_s"],
                             "reduction": 1 - c["mean_per_token_s"] / p["mean_per_token_s"],
                             "ttft_share_of_saving": (p["mean_ttft_s"] - c["mean_ttft_s"])
                             / ((p["mean_per_token_s"] - c["mean_per_token_s"]) * output)})
    print(f"{'scenario':<14}{'rate':>6}{'l_out':>7}{'PETALS s/tok':>14}{'CG-BPRR s/tok':>15}{'reduction':>11}"
          f"{'PETALS TTFT':>13}{'CG-BPRR TTFT':>14}")
    for r in rows:
        print(f"{r['scenario']:<14}{r['rate']:>6}{r['output_tokens']:>7}{r['petals_per_token_s']:>14.3f}"
              f"{r['cgbprr_per_token_s']:>15.3f}{r['reduction']:>11.1%}{r['petals_ttft_s']:>13.2f}"
              f"{r['cgbprr_ttft_s']:>14.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"seeds": args.seeds, "rows": rows, "meta": run_metadata()}, indent=2))


if __name__ == "__main__":
    main()
