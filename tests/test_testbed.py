"""The testbed: emulated hosts with the scenario's RTTs on real sockets, emulated devices, a short
workload through a real coordinator and servers, and nothing left behind."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from blockswarm.perf.scenario import load_scenario
from blockswarm.testbed import hosts as hostmap
from blockswarm.testbed.procs import our_listeners, start_ticks
from blockswarm.testbed.calibration import RuntimeConstants
from blockswarm.testbed.run import drive, summary, swarm
from blockswarm.testbed.run import TestbedSettings as Settings
from blockswarm.sim.workload import generate

SCENARIO = textwrap.dedent("""\
    name: three-hosts
    model: {name: tiny, num_blocks: 8, d_model: 1024, params_per_block: 12000000, kv_bytes: 2}
    servers:
      - {name: east, location: east, memory_gb: 1.0, decode_ms: 6, prefill_ms_per_token: 0.2, prefill_base_ms: 10}
      - {name: west, location: west, memory_gb: 1.0, decode_ms: 6, prefill_ms_per_token: 0.2, prefill_base_ms: 10}
    clients:
      - {name: home, location: home}
    network:
      rtt_ms: {"home east": 20, "home west": 60, "east west": 40, "home home": 2, "east east": 2, "west west": 2}
    workload: {rate: 2, requests: 6, prompt_tokens: 8, output_tokens: 12, seed: 0}
    testbed: {time_scale: 1}
    """)


@pytest.fixture
def scenario_file(tmp_path):
    path = tmp_path / "three-hosts.yaml"
    path.write_text(SCENARIO)
    return str(path)


def _rtt_through_links(source: str, address: str) -> float:
    """The runtime's own RTT measurement (as a coordinated client reports it), from `source`."""
    from blockswarm.runtime.connection import client_context
    from blockswarm.runtime.coordinated import _round_trip

    context = client_context(source)
    try:
        return min(_round_trip(context, address, None) for _ in range(10))
    finally:
        context.destroy(linger=0)


@pytest.mark.slow
def test_an_emulated_network_has_the_scenarios_rtts_runs_a_workload_and_leaves_nothing(scenario_file, tmp_path):
    scenario = load_scenario(scenario_file)
    settings = Settings.of(scenario_file)
    hosts = {h.name: h for h in hostmap.hosts_of(scenario)}
    with swarm(scenario, scenario_file, "cgbprr", 0, settings, tmp_path, RuntimeConstants(), say=lambda _: None) \
            as (coordinator, by_name):
        from blockswarm.runtime.coordinator.link import CoordinatorLink
        from blockswarm.runtime.connection import client_context

        context = client_context(hosts["home"].public)
        status = CoordinatorLink(context, coordinator).call("status")
        context.destroy(linger=0)
        servers = {s["address"].rsplit(":", 1)[0]: s["address"] for s in status["servers"]}
        assert set(servers) == {hosts["east"].public, hosts["west"].public}
        # every pair of hosts: the client to each server, and one server to the other
        pairs = [("home", "east"), ("home", "west"), ("east", "west"), ("west", "east")]
        for a, b in pairs:
            expected = scenario.network.rtt(hosts[a].location, hosts[b].location)
            address = servers[hosts[b].public]
            measured = _rtt_through_links(hosts[a].public, address)
            overhead = _emulator_overhead(hosts[a].public, hosts[b].internal, int(address.rsplit(":", 1)[1]),
                                          expected / 2)
            assert 0 <= overhead < 0.003, (a, b, overhead)  # (0.1-1.3 ms measured here, README)
            assert -0.001 <= measured - expected <= 0.001 + overhead, (a, b, measured, expected, overhead)
        requests = generate(scenario, 0)
        from blockswarm.testbed.devices import tiny_model

        measured = drive(scenario, requests, coordinator, by_name, settings.time_scale,
                         tiny_model(scenario.model.num_blocks))
        assert all(r.completion is not None for r in measured.records)
        numbers = summary(measured.records)
        assert numbers["n_completed"] == len(requests)
        # a token costs at least the device's time and the RTT of its route's hops
        assert numbers["mean_per_token_s"] > 0.006 * 8 / 2 + 0.02
        from blockswarm.testbed import procs

        pids = [int(line.split()[0]) for state in procs.state_dir().glob("testbed-*.pids")
                for line in state.read_text().splitlines()[1:]]
        assert pids, "the testbed records its processes"
    for pid in pids:
        assert start_ticks(pid) is None or _is_zombie(pid), f"process {pid} is still running"
    assert our_listeners() == []
    down = subprocess.run([sys.executable, "-m", "blockswarm", "testbed", "down"], capture_output=True, text=True,
                          timeout=60)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "nothing of the testbed is left" in down.stdout


def _emulator_overhead(source: str, internal: str, port: int, one_way_s: float) -> float:
    """What the link emulator itself adds to a round trip with this delay: the same server reached
    through a second emulator holding each direction `one_way_s`, less that, less the round trip
    straight to the server."""
    import threading

    from blockswarm.testbed.links import LinkEmulator, LinkPlan, Listener

    there = "127.20.199.1"
    emulator = LinkEmulator(LinkPlan([Listener(there, port, internal)],
                                     {(source, there): one_way_s, (there, source): one_way_s}))
    emulator.bind()
    thread = threading.Thread(target=emulator.run, daemon=True)
    thread.start()
    try:
        through = _rtt_through_links(source, f"{there}:{port}")
        direct = _rtt_through_links(source, f"{internal}:{port}")
    finally:
        emulator.stop()
        thread.join(timeout=5)
    return max(0.0, through - 2 * one_way_s - direct)


def _is_zombie(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.slow
def test_an_emulated_server_takes_the_scenarios_per_block_decode_time(scenario_file, tmp_path):
    """One server emulating `east` (6 ms per block) over 4 of the tiny model's blocks: a decode
    step's device time is 24 ms, within 5 %, measured at the client less the loopback round trip."""
    from blockswarm.runtime.client import DistributedModel
    from blockswarm.runtime.launcher import local_swarm
    from blockswarm.testbed.devices import tiny_model

    model = tiny_model(8)
    args = ["--threads", "1", "--emulate", f"{scenario_file}:east"]
    with local_swarm(str(model), [(0, 4), (4, 8)], args) as addresses:
        client = DistributedModel.from_servers(addresses, model=str(model))
        try:
            result = client.generate([5, 6, 7], max_new_tokens=30, stop_at_eos=False)
        finally:
            client.close()
    first = result.hops[0]
    decode = sorted(first.round_trip_s[1:])[len(first.round_trip_s[1:]) // 2]
    transport = sorted(rt - s for rt, s in zip(first.round_trip_s[1:], first.server_s[1:]))[len(first.round_trip_s) // 2]
    per_block = (decode - transport) / 4
    assert abs(per_block - 0.006) <= 0.05 * 0.006, per_block
    assert all(abs(c - 0.024) < 1e-9 for c in first.compute_s[1:])  # what it reports is the device's time
