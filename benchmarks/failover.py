"""Failover: what a server killed mid-generation costs the client, and whether the output stays the same.

SmolLM2 over three local servers, blocks 0:15, 15:30 and 15:30 (a spare). A greedy generation
runs undisturbed, then again with the 15:30 server on its route killed (SIGKILL) after
`--kill-at` tokens. Reported: whether the two texts are identical, the steps replayed, and the
stall: the latency of the token during which the failure was noticed, rerouted and replayed,
against the median token.

    .venv/bin/python benchmarks/failover.py --json failover.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from blockswarm.model.checkpoint import SMOLLM2, ensure_smollm2
from blockswarm.runtime.client import DistributedModel
from blockswarm.runtime.launcher import server_processes

PROMPT = "The history of Paris begins"


def run(new_tokens: int, kill_at: int) -> dict:
    with server_processes(SMOLLM2, [(0, 15), (15, 30), (15, 30)], ["--threads", "1"]) as servers:
        model = DistributedModel.from_servers(list(servers), model=SMOLLM2)
        undisturbed = model.generate(PROMPT, max_new_tokens=new_tokens, chat_template=False, stop_at_eos=False)
        victim = model.chain[1].address
        count = iter(range(new_tokens + 1))
        disturbed = model.generate(PROMPT, max_new_tokens=new_tokens, chat_template=False, stop_at_eos=False,
                                   on_token=lambda *_: next(count) == kill_at - 1 and servers[victim].kill())
    latencies = disturbed.token_latencies_s
    stall = max(latencies)
    return {
        "identical_output": disturbed.token_ids == undisturbed.token_ids,
        "repairs": disturbed.repairs,
        "stall_ms": 1e3 * stall,
        "median_token_ms": 1e3 * statistics.median(latencies),
        "extra_ms": 1e3 * (stall - statistics.median(latencies)),
        "new_tokens": new_tokens,
        "killed": victim,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--kill-at", type=int, default=16, help="kill after this many tokens")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ensure_smollm2()
    result = run(args.new_tokens, args.kill_at)
    print(f"{'identical output':<22}{result['identical_output']}")
    print(f"{'killed':<22}{result['killed']} after {args.kill_at} tokens")
    print(f"{'median token':<22}{result['median_token_ms']:.1f} ms")
    print(f"{'stalled token':<22}{result['stall_ms']:.1f} ms (+{result['extra_ms']:.1f} ms: notice, reroute, replay)")
    for repair in result["repairs"]:
        print(f"{'recovered':<22}{repair}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
