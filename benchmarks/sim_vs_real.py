"""The simulator against the real runtime: every shipped testbed scenario (scenarios/testbed/) run
on the testbed with petals and cgbprr over a few seeds, each next to the simulator's prediction
for the same scenario, seed and requests (constants calibrated on seed + 1000, never on the run
predicted). Writes, per scenario and policy, the measured and predicted mean per-token time,
mean TTFT, p90 per-token time and mean waiting, their relative errors, and the largest errors.

    .venv/bin/python benchmarks/sim_vs_real.py --json sim_vs_real.json [--seeds 1,2] [--requests N]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path

from blockswarm.testbed.run import METRICS, TestbedSettings, relative_errors, run_policy
from meta import run_metadata

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("petals", "cgbprr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--requests", type=int, default=None, help="requests per measured run (default: the scenario's)")
    parser.add_argument("--scenarios", default=None, help="comma-separated scenario files (default: all shipped)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    files = args.scenarios.split(",") if args.scenarios else sorted(str(p) for p in (ROOT / "scenarios" / "testbed").glob("*.yaml"))
    out = {"scenarios": {}, "meta": run_metadata()}
    worst = {"mean_per_token_s": 0.0, "mean_ttft_s": 0.0}
    for path in files:
        settings = TestbedSettings.of(path)
        if args.requests:
            settings = TestbedSettings(settings.time_scale, args.requests, settings.calibration_requests,
                                       settings.coordinator_location)
        name = Path(path).stem
        out["scenarios"][name] = {}
        for policy in POLICIES:
            runs = []
            for seed in seeds:
                with tempfile.TemporaryDirectory(prefix="sim-vs-real-") as folder:
                    runs.append(run_policy(path, policy, seed, settings, Path(folder)))
            measured = {k: statistics.fmean(r["measured"][k] for r in runs) for k in METRICS}
            predicted = {k: statistics.fmean(r["predicted"][k] for r in runs) for k in METRICS}
            errors = relative_errors(predicted, measured)
            out["scenarios"][name][policy] = {"measured": measured, "predicted": predicted, "relative_error": errors,
                                              "seeds": seeds, "runs": [{k: r[k] for k in ("measured", "predicted",
                                                                                            "relative_error", "constants")}
                                                                       for r in runs]}
            for key in worst:
                if not math.isnan(errors[key]):
                    worst[key] = max(worst[key], abs(errors[key]))
            print(f"{name:16s} {policy:8s} " + "  ".join(
                f"{k} {measured[k]:.3f}/{predicted[k]:.3f} ({errors[k] * 100:+.1f} %)" for k in METRICS), flush=True)
        ordering = {kind: sorted(POLICIES, key=lambda p: out["scenarios"][name][p][kind]["mean_per_token_s"])
                    for kind in ("measured", "predicted")}
        out["scenarios"][name]["same_ordering"] = ordering["measured"] == ordering["predicted"]
    out["max_relative_error"] = worst
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(json.dumps(out["max_relative_error"]))


if __name__ == "__main__":
    main()
