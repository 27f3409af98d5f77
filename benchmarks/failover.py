"""Failover: what a server failing mid-generation costs the client, and whether the output stays the same.

SmolLM2 over three local servers, blocks 0:15, 15:30 and 15:30 (a spare), every process on one
torch thread. Each scenario gets a fresh swarm, runs a greedy generation undisturbed, then runs
it again and disturbs the 15:30 server on the route once `--fail-after` tokens have come out:

    kill     SIGKILL: the connection drops, the client notices at once.
    freeze   SIGSTOP (SIGCONT at the end, so that it can be stopped): nothing drops; the client
             notices after three missed heartbeats (~6 s).
    restart  SIGKILL, then a new `blockswarm serve` of the same span on the same control port
             (with a new random data port), READY before generation goes on: the session is
             lost there and must be reopened or moved.

Reported per scenario: whether the text is identical to the undisturbed one; the stall, i.e. the
latency of the one step after the failure (token index `--fail-after`, the step that noticed the
failure, rerouted or reopened, and replayed); the median of the run's other tokens; and what the
client reports it did (`repairs`: blocks moved to another server; `reopens`: the session reopened
on the same server). A scenario that fails is reported as a row with its error, not a crash.

    .venv/bin/python benchmarks/failover.py --json failover.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess

import torch

from blockswarm.model.checkpoint import SMOLLM2, ensure_smollm2
from blockswarm.runtime.client import DistributedModel, GenerationResult
from blockswarm.runtime.launcher import serve_command, server_processes, stop_all, wait_ready
from meta import run_metadata

PROMPT = "The history of Paris begins"
SPANS = [(0, 15), (15, 30), (15, 30)]
SERVER_ARGS = ["--threads", "1"]
SCENARIOS = ("kill", "freeze", "restart")
READY_TIMEOUT_S = 180.0


class Fault:
    """One disturbance of one server, injected from generate's on_token callback, and undone after."""

    def __init__(self, kind: str, address: str, span: tuple[int, int], process: subprocess.Popen):
        self.kind, self.address, self.span, self.process = kind, address, span, process
        self.replacement: subprocess.Popen | None = None

    def after(self, tokens: int):
        """An on_token callback that injects the fault once `tokens` tokens have been produced.

        on_token runs after each token (index i = produced - 1); the step that follows produces token
        index `tokens`, whose latency is token_latencies_s[tokens - 1]: that is the stall."""
        produced = itertools.count(1)
        return lambda *_: next(produced) == tokens and self.inject()

    def inject(self) -> None:
        if self.kind == "freeze":
            self.process.send_signal(signal.SIGSTOP)
            return
        self.process.kill()
        self.process.wait()
        if self.kind == "restart":
            self.replacement = self._restart()

    def _restart(self) -> subprocess.Popen:
        """The same span on the same control port; the data port is a new random one."""
        port = self.address.rsplit(":", 1)[1]
        command = serve_command(SMOLLM2, *self.span, [*SERVER_ARGS, "--port", port])  # the last --port wins
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            wait_ready(process, READY_TIMEOUT_S)
        except BaseException:
            stop_all([process])
            raise
        return process

    def undo(self) -> None:
        if self.kind == "freeze" and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
        if self.replacement is not None:
            stop_all([self.replacement])


def generate(model: DistributedModel, new_tokens: int, on_token=None) -> GenerationResult:
    return model.generate(PROMPT, max_new_tokens=new_tokens, chat_template=False, stop_at_eos=False,
                          on_token=on_token)


def run_scenario(kind: str, new_tokens: int, fail_after: int) -> dict:
    with server_processes(SMOLLM2, SPANS, SERVER_ARGS) as servers, \
            DistributedModel.from_servers(list(servers), model=SMOLLM2) as model:
        undisturbed = generate(model, new_tokens)
        victim = model.chain[1]
        fault = Fault(kind, victim.address, (victim.start, victim.end), servers[victim.address])
        try:
            disturbed = generate(model, new_tokens, on_token=fault.after(fail_after))
        finally:
            fault.undo()
    latencies = disturbed.token_latencies_s
    stall = latencies[fail_after - 1]
    others = latencies[:fail_after - 1] + latencies[fail_after:]
    return {
        "scenario": kind,
        "identical_output": disturbed.token_ids == undisturbed.token_ids,
        "stall_ms": 1e3 * stall,
        "median_token_ms": 1e3 * statistics.median(others),
        "undisturbed_median_token_ms": 1e3 * undisturbed.median_token_s,
        "repairs": disturbed.repairs,
        "reopens": disturbed.reopens,
        "server": victim.address,
    }


def run_safely(kind: str, new_tokens: int, fail_after: int) -> dict:
    """A scenario that fails (e.g. a client that cannot yet follow a restarted server) is a row with its error."""
    try:
        return run_scenario(kind, new_tokens, fail_after)
    except Exception as exc:
        return {"scenario": kind, "error": f"{type(exc).__name__}: {exc}"}


def print_rows(rows: list[dict], fail_after: int) -> None:
    print(f"failure injected after {fail_after} tokens; stall = latency of the next token's step")
    print(f"{'scenario':<10}{'identical':>10}{'stall ms':>10}{'median ms':>11}{'repairs':>9}{'reopens':>9}")
    for row in rows:
        if "error" in row:
            print(f"{row['scenario']:<10}  FAILED: {row['error']}")
            continue
        print(f"{row['scenario']:<10}{str(row['identical_output']):>10}{row['stall_ms']:>10.1f}"
              f"{row['median_token_ms']:>11.1f}{len(row['repairs']):>9}{len(row['reopens']):>9}")
    for row in rows:
        for what in row.get("repairs", []) + row.get("reopens", []):
            print(f"  {row['scenario']}: {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--fail-after", type=int, default=16, help="disturb the server after this many tokens")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, of " + ", ".join(SCENARIOS))
    args = parser.parse_args()
    kinds = [k.strip() for k in args.scenarios.split(",") if k.strip()]
    if not kinds or any(k not in SCENARIOS for k in kinds):
        parser.error(f"--scenarios must be some of {', '.join(SCENARIOS)}, got {args.scenarios!r}")
    if not 1 <= args.fail_after < args.new_tokens:
        parser.error("--fail-after must be at least 1 and below --new-tokens (a later token must notice)")
    torch.set_num_threads(1)
    ensure_smollm2()
    rows = [run_safely(kind, args.new_tokens, args.fail_after) for kind in kinds]
    print_rows(rows, args.fail_after)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"scenarios": rows, "new_tokens": args.new_tokens, "fail_after": args.fail_after,
                       "spans": SPANS, "prompt": PROMPT, "meta": run_metadata()}, handle, indent=2)


if __name__ == "__main__":
    main()
