"""A long prompt next to a running generation: how long the running session's tokens wait.

One SmolLM2 server holds all 30 blocks. Session A generates token by token; once it runs, session
B sends a long prompt (`--prompt-tokens`, 2048 by default) in one step. The server computes long
prompts in slices of `--prefill-budget` tokens and runs other sessions' steps between slices;
with a budget at least as long as the prompt it computes the prompt in one go, as before slicing
existed. Reported per budget: A's median token time undisturbed, its slowest token while B's
prompt was computed, and how long B's prompt took.

    .venv/bin/python benchmarks/prefill_interleave.py --json prefill_interleave.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch
import zmq

from blockswarm.model.checkpoint import SMOLLM2, ensure_smollm2
from blockswarm.runtime.client import DistributedModel
from blockswarm.runtime.connection import Connection
from blockswarm.runtime.launcher import local_swarm
from meta import run_metadata


def measure(budget: int, prompt_tokens: int, new_tokens: int) -> dict:
    with local_swarm(SMOLLM2, [(0, 30)], ["--threads", "1", "--prefill-budget", str(budget)]) as (address,):
        model = DistributedModel.from_servers([address], model=SMOLLM2)
        model.generate("Warm up.", max_new_tokens=2, stop_at_eos=False)
        stamps, started = [], threading.Event()

        def on_token(_token, _text):
            stamps.append(time.perf_counter())
            if len(stamps) == 8:
                started.set()

        generation = threading.Thread(target=lambda: model.generate(
            "Tell me about the history of Paris.", max_new_tokens=new_tokens, stop_at_eos=False, on_token=on_token))
        generation.start()
        started.wait(120)
        long = Connection(zmq.Context.instance(), address, timeout_s=600)
        hidden = model.head.embed_tokens(torch.tensor([[(17 * i + 101) % 49000 + 10 for i in range(prompt_tokens)]]), 0)
        long.open(0, prompt_tokens, prompt_tokens * model.head.hidden_size * 4)
        began = time.perf_counter()
        long.step(hidden)
        ended = time.perf_counter()
        long.close()
        generation.join(600)
        model.close()
    gaps = [(b, b - a) for a, b in zip(stamps, stamps[1:])]
    before = [gap for at, gap in gaps if at < began]
    during = [gap for at, gap in gaps if began < at <= ended + max(g for _, g in gaps)]
    return {"budget": budget, "undisturbed_token_ms": 1e3 * statistics.median(before),
            "slowest_token_during_prompt_ms": 1e3 * max(during, default=float("nan")),
            "tokens_during_prompt": len(during), "prompt_ms": 1e3 * (ended - began)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=400, help="session A's length (it must outlast B's prompt)")
    parser.add_argument("--budgets", default="128,512,100000", help="slice budgets to compare (tokens)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ensure_smollm2()
    rows = [measure(int(b), args.prompt_tokens, args.new_tokens) for b in args.budgets.split(",")]
    print(f"a {args.prompt_tokens}-token prompt arrives while another session decodes (SmolLM2, one server)")
    print(f"{'slice budget':>14}{'A undisturbed ms':>18}{'A slowest during ms':>21}{'B prompt ms':>13}")
    for row in rows:
        label = "whole prompt" if row["budget"] >= args.prompt_tokens else str(row["budget"])
        print(f"{label:>14}{row['undisturbed_token_ms']:>18.1f}{row['slowest_token_during_prompt_ms']:>21.1f}"
              f"{row['prompt_ms']:>13.0f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"prompt_tokens": args.prompt_tokens, "rows": rows, "meta": run_metadata()}, handle, indent=2)


if __name__ == "__main__":
    main()
