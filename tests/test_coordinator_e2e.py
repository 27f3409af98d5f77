"""A coordinated swarm end to end: a coordinator and six real server processes on loopback, none
told its blocks, a tiny random Llama underneath. Placement as `blockswarm plan` places the same
swarm, routes equal to the planner's, concurrency, a killed server, a restarted coordinator, a
server that joins and one that leaves gracefully."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import zmq

from blockswarm.core.specs import Placement, Request, Span
from blockswarm.perf.scenario import parse_scenario
from blockswarm.planner.registry import decide
from blockswarm.planner.view import SwarmView
from blockswarm.runtime.client import DistributedModel
from blockswarm.runtime.coordinator.link import CoordinatorLink
from blockswarm.runtime.launcher import coordinator_command, member_command, start, stop_all, wait_ready

from conftest import run_concurrently
from test_runtime_e2e import reference_greedy

pytestmark = pytest.mark.slow
# budgets that give the tiny model's 6 blocks spans of 4, 4, 3, 3, 2 and 2 blocks for R=2
MEMORIES = ["1.2MiB", "1.2MiB", "0.85MiB", "0.85MiB", "0.6MiB", "0.6MiB"]
R = 2


@pytest.fixture(scope="module")
def swarm(tiny_model_dirs, tmp_path_factory):
    directory = tiny_model_dirs["llama"]
    state = tmp_path_factory.mktemp("coordinator") / "state.sqlite"
    args = ["--R", str(R), "--session-tokens", "256", "--state", str(state)]
    processes = []
    try:
        coordinator = start(coordinator_command(str(directory), args))
        processes.append(coordinator)
        address = wait_ready(coordinator, 30)
        servers = [start(member_command(str(directory), address, m, ["--threads", "1"])) for m in MEMORIES]
        processes.extend(servers)
        addresses = {wait_ready(p, 180): p for p in servers}
        state = SimpleNamespace(directory=directory, address=address, servers=addresses, processes=processes,
                                args=args, context=zmq.Context())
        wait_until(lambda: all(s["state"] == "serving" for s in status(state)["servers"]), 10,
                   "every server to report serving")
        yield state
    finally:
        stop_all(processes[::-1])


def status(swarm, **fields) -> dict:
    link = CoordinatorLink(swarm.context, swarm.address)
    try:
        return link.call("status", **fields)
    finally:
        link.close()


def wait_until(condition, timeout_s: float = 30.0, what: str = "the swarm to settle"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blockswarm", *args], capture_output=True, text=True, timeout=120)


def test_placed_as_plan_places_the_same_swarm_and_greedy_matches_transformers(swarm, tmp_path):
    out, scenario = tmp_path / "status.json", tmp_path / "live.yaml"
    run = cli("status", "--coordinator", swarm.address, "--json", str(out), "--scenario", str(scenario))
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    assert len(data["coverage"]) == 6 and min(data["coverage"]) >= 1
    assert all(s["state"] == "serving" and {"address", "start", "end"} <= s.keys() for s in data["servers"])
    planned = tmp_path / "plan.json"
    run = cli("plan", str(scenario), "--policy", "cgbprr", "--R", str(R), "--json", str(planned))
    assert run.returncode == 0, run.stderr
    plan = json.loads(planned.read_text())
    by_name = {plan["servers"][s["server"]]: (s["start"], s["end"]) for s in plan["placement"]}
    assert by_name == {s["address"]: (s["start"], s["end"]) for s in data["servers"]}
    assert sorted(e - s for s, e in by_name.values()) == [2, 2, 3, 3, 4, 4]

    prompt = [3, 14, 15, 92, 65, 35]
    with DistributedModel.from_coordinator(swarm.address, model=str(swarm.directory)) as model:
        result = model.generate(prompt, max_new_tokens=16)
    assert result.token_ids == reference_greedy(swarm.directory, prompt, 16)
    assert wait_until(lambda: not status(swarm)["routes"], 5, "the reservation to be released")


def test_route_equals_the_planners_decision_on_live_state(swarm):
    link = CoordinatorLink(swarm.context, swarm.address)
    try:
        link.call("hello", client="probe")
        far = sorted(swarm.servers)[0]
        link.call("rtts", client="probe", rtts={far: 0.05})  # a distant server: routes should avoid it
        held = [link.call("route", client=f"load{i}", prompt_tokens=8, max_new_tokens=8) for i in range(3)]
        snapshot = link.call("status", scenario=True)
        scenario = parse_scenario(snapshot["scenario"])
        names = [s.name for s in scenario.servers]
        spans = [Span(names.index(s["address"]), s["start"], s["end"], s["slots"])
                 for s in snapshot["servers"] if s["state"] == "serving"]
        placement = Placement(tuple(sorted(spans, key=lambda s: s.server)), 6)
        active: dict[int, list] = {}
        for route in snapshot["routes"]:
            for address, start, end in route["hops"]:
                active.setdefault(names.index(address), []).append((route["expected_end"], end - start))
        view = SwarmView(scenario, placement, time.time(), {k: tuple(v) for k, v in active.items()})
        client = [c.name for c in scenario.clients].index("probe")
        expected = decide("wsrr", view, Request(client, 8, 8)).route
        got = link.call("route", client="probe", prompt_tokens=8, max_new_tokens=8)
        assert [(h["address"], h["start"], h["end"]) for h in got["hops"]] == \
            [(names[h.server], h.start, h.end) for h in expected.hops]
        assert far not in [h["address"] for h in got["hops"]]
        for reply in [*held, got]:
            link.call("release", client="x", reservation=reply["reservation"])
    finally:
        link.close()
    assert not status(swarm)["routes"]


def test_twenty_concurrent_generations_from_four_clients_spread_over_replicas(swarm):
    models = [DistributedModel.from_coordinator(swarm.address, model=str(swarm.directory)) for _ in range(4)]
    prompts = [[(11 * i + j) % 128 for j in range(3 + i % 5)] for i in range(20)]
    results, errors = run_concurrently(
        [lambda i=i: models[i % 4].generate(prompts[i], max_new_tokens=10) for i in range(20)])
    for model in models:
        model.close()
    assert not errors, errors
    for i, prompt in enumerate(prompts):
        assert results[i].token_ids == reference_greedy(swarm.directory, prompt, 10), i
    chains = {tuple((h.address, h.start, h.end) for h in result.chain) for result in results}
    assert len(chains) >= 2, "every session took the same chain"
    assert wait_until(lambda: not status(swarm)["routes"], 5, "every reservation to be released")


def test_a_server_killed_mid_generation_is_replaced_with_identical_tokens(swarm):
    prompt = [5, 6, 7, 8]
    killed = []
    with DistributedModel.from_coordinator(swarm.address, model=str(swarm.directory)) as model:
        def kill_after_three(token, _text):
            if len(killed) == 0 and token is not None:
                mine = [r for r in status(swarm)["routes"] if r["client"] == model.coordinator.client]
                address = mine[0]["hops"][-1][0]
                swarm.servers[address].send_signal(signal.SIGKILL)
                swarm.servers[address].wait()
                killed.append(address)

        result = model.generate(prompt, max_new_tokens=12, on_token=kill_after_three)
    assert result.token_ids == reference_greedy(swarm.directory, prompt, 12)
    assert result.repairs and killed[0] in result.repairs[0]
    assert wait_until(lambda: [s for s in status(swarm)["servers"] if s["address"] == killed[0]
                               and s["state"] == "gone"], 10, "the coordinator to mark it gone")


def test_coordinator_restarted_mid_run_loses_nothing(swarm):
    before = {s["address"]: (s["start"], s["end"]) for s in status(swarm)["servers"] if s["state"] == "serving"}
    port = swarm.address.rsplit(":", 1)[1]
    prompt = [9, 10, 11]
    with DistributedModel.from_coordinator(swarm.address, model=str(swarm.directory)) as model:
        def restart_once(token, _text):
            if not restarted:
                old = swarm.processes[0]
                old.send_signal(signal.SIGKILL)
                old.wait()
                new = start(coordinator_command(str(swarm.directory), [*swarm.args, "--port", port]))
                swarm.processes[0] = new
                wait_ready(new, 30)
                restarted.append(new)

        restarted = []
        result = model.generate(prompt, max_new_tokens=10, on_token=restart_once)
        assert result.token_ids == reference_greedy(swarm.directory, prompt, 10)
        assert restarted and not result.repairs
    # the release reached the new coordinator, which knew the reservation: nothing leaks
    after = wait_until(lambda: status(swarm), 10)
    assert not after["routes"]
    serving = wait_until(lambda: {s["address"]: (s["start"], s["end"]) for s in status(swarm)["servers"]
                                  if s["state"] == "serving"} or None, 10)
    assert serving == before  # the same servers on the same spans: nobody re-placed
    with DistributedModel.from_coordinator(swarm.address, model=str(swarm.directory)) as model:
        assert model.generate(prompt, max_new_tokens=6).token_ids == reference_greedy(swarm.directory, prompt, 6)


def test_a_joining_server_is_used_and_a_leaving_one_drains(swarm):
    # announced faster than the others measured themselves (~1 ms per block here): their measured
    # speeds vary by a third from run to run, which could make two hops over them look cheaper
    newcomer = start(member_command(str(swarm.directory), swarm.address, "2.5MiB",
                                    ["--threads", "1", "--decode-ms", "0.25"]))
    swarm.processes.append(newcomer)
    address = wait_ready(newcomer, 120)
    try:
        entry = wait_until(lambda: [s for s in status(swarm)["servers"] if s["address"] == address
                                    and s["state"] == "serving"], 30, "the newcomer to serve")[0]
        assert (entry["start"], entry["end"]) == (0, 6)  # enough memory for the whole model: one hop
        assert entry["block_decode_s"] == 0.00025  # the speed it announced, not a measured one
        prompt = [1, 2, 3]
        with DistributedModel.from_coordinator(swarm.address, model=str(swarm.directory)) as model:
            signalled = []

            def leave_after_two(token, _text):
                if len(signalled) == 0:
                    signalled.append(True)
                    newcomer.send_signal(signal.SIGTERM)  # graceful: it drains, this session finishes there

            result = model.generate(prompt, max_new_tokens=12, on_token=leave_after_two)
        # (what the coordinator priced, should it route elsewhere: each server's measured speed)
        speeds = [(s["address"], s["start"], s["end"], s["block_decode_s"], s["state"]) for s in status(swarm)["servers"]]
        assert [(h.address, h.start, h.end) for h in result.chain] == [(address, 0, 6)], speeds
        assert not result.repairs and result.token_ids == reference_greedy(swarm.directory, prompt, 12)
        assert newcomer.wait(30) == 0
    finally:  # whatever happened above, the newcomer is gone before the next test counts the servers
        newcomer.send_signal(signal.SIGTERM)
        newcomer.wait(30)
        assert wait_until(lambda: [s for s in status(swarm)["servers"] if s["address"] == address
                                   and s["state"] == "gone"], 10, "the coordinator to see it leave")
    assert os.path.exists(swarm.args[-1])


def test_blocks_nobody_else_holds_get_an_idle_server_and_the_waiting_client_completes(swarm):
    """Last in the module (it ends the swarm): servers are stopped until one holds blocks nobody
    else holds and an idle one could take them over; then that one dies. The coordinator moves an
    idle server onto its blocks, and a client started meanwhile waits and completes. (A session in
    flight rides through such a repair too when the mover is not on its own route: it waits for the
    tail; when the only possible mover holds the session's own head, it fails after --wait.)
    Finally, once the swarm truly cannot cover the model, a client gets an error naming the blocks."""
    from itertools import combinations

    from blockswarm.core.errors import Infeasible
    from blockswarm.planner import live

    def serving():
        return [s for s in status(swarm)["servers"] if s["state"] == "serving"]

    def placement(servers):
        return Placement(tuple(Span(i, s["start"], s["end"], s["slots"]) for i, s in enumerate(servers)), 6)

    def kill(addresses):
        for address in addresses:
            swarm.servers[address].send_signal(signal.SIGKILL)
            swarm.servers[address].wait()
        wait_until(lambda: not {s["address"] for s in serving()} & set(addresses), 10, "the coordinator to see them gone")

    left = serving()
    # the fewest servers to stop so that the rest still cover the model and one of them holds blocks
    # nobody else holds that an idle one could take over; searched over every subset (the live
    # placement depends on the order the servers joined in, and stopping redundant servers one by
    # one in a fixed order can end where no loss is repairable)
    kept = next((subset for size in range(len(left), 0, -1) for subset in combinations(range(len(left)), size)
                 if not live.missing_blocks(placement([left[i] for i in subset]))
                 and live.repairable_losses(placement([left[i] for i in subset]))), None)
    assert kept is not None, f"no subset of the serving servers has a repairable loss: {left}"
    kill([s["address"] for i, s in enumerate(left) if i not in kept])
    left = serving()
    victim = left[live.repairable_losses(placement(left))[0]]["address"]
    before = {s["address"]: (s["start"], s["end"]) for s in left}
    kill([victim])
    prompt = [4, 8, 15, 16, 23, 42]
    with DistributedModel.from_coordinator(swarm.address, model=str(swarm.directory), wait_s=60) as model:
        result = model.generate(prompt, max_new_tokens=12)  # waits for the move and the load
    assert result.token_ids == reference_greedy(swarm.directory, prompt, 12)
    after = {s["address"]: (s["start"], s["end"]) for s in serving()}
    moved = [a for a in after if after[a] != before[a]]
    assert victim not in after and len(moved) == 1, (before, after)
    assert any(h.address == moved[0] for h in result.chain)
    kill(list(after))  # now nothing can cover the model
    wait_until(lambda: status(swarm)["missing"], 10, "the coordinator to see the swarm gone")
    with pytest.raises(Infeasible, match="have no serving server"):
        DistributedModel.from_coordinator(swarm.address, model=str(swarm.directory), wait_s=1)
