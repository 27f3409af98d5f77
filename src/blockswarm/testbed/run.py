"""`blockswarm testbed run`: a real swarm on emulated hosts and devices, driven with a scenario's
workload, next to the simulator's prediction for the same scenario and seed.

For each policy: the link emulator starts in front of every host (`links.py`), the coordinator on
its host with the policy, and one server per scenario server on its host, emulating its device
(`serve --emulate`) and asking for the span the policy's placement gives it (the simulator's
placement for that seed, so both run the same swarm). One client per scenario client, each on its
own host, sends that client's requests at their arrival times (divided by the time scale K),
each with the policy's routing (the coordinator's). Measured times are multiplied by K back
into the scenario's units.

The simulator runs the same scenario, seed and requests with the runtime's own constants in
place of the PETALS-measured overheads (a hop's overhead for decode and prefill steps, a
request's set-up, a server's and a client's own work per step): fitted on calibration runs of
another scenario (the scenario's `testbed.calibration`, one run per policy, seed + 1000, pooled),
never on the run they predict. They are measured in real seconds and enter the simulator
multiplied by K: the runtime's ~1 ms per hop is K ms in the scenario's units, which is why K
stays small enough that the emulated devices and links dominate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from blockswarm.core.errors import BlockswarmError, CacheFull, ConfigError
from blockswarm.core.specs import Request, Scenario
from blockswarm.perf.scenario import load_scenario
from blockswarm.planner import wsrr
from blockswarm.planner.registry import PLACEMENTS, QUEUE_ROUTERS, parse_policy
from blockswarm.sim.metrics import RequestRecord, percentile
from blockswarm.sim.runner import simulate
from blockswarm.sim.workload import generate
from blockswarm.sim.world import MAX_BACKOFF_S
from blockswarm.testbed import hosts as hostmap
from blockswarm.testbed.calibration import (Calibration, Measured, RuntimeConstants, SetupSample, StepBreakdown,
                                            calibrate, mean_breakdown)
from blockswarm.testbed.devices import tiny_model
from blockswarm.testbed.links import Listener, LinkPlan
from blockswarm.testbed.procs import Processes

METRICS = ("mean_per_token_s", "mean_ttft_s", "p90_per_token_s", "mean_wait_s")
CALIBRATION_SEED_OFFSET = 1000


@dataclass(frozen=True)
class TestbedSettings:
    """A scenario's `testbed:` section."""

    time_scale: float = 10.0
    requests: int | None = None  # None: the workload's
    calibration_requests: int = 20  # requests of a calibration run of this scenario
    coordinator_location: str | None = None
    calibration: str | None = None  # the scenario whose runs calibrate this one's (None: this one, another seed)

    @classmethod
    def of(cls, path: str | Path) -> "TestbedSettings":
        """The settings of the scenario at `path`; `calibration` resolved against its folder."""
        data = (yaml.safe_load(Path(path).read_text()) or {}).get("testbed") or {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"testbed.{unknown[0]}: unknown field; known: {', '.join(sorted(known))}")
        if data.get("calibration") is not None:
            calibration = Path(path).parent / str(data["calibration"])
            if not calibration.is_file():
                raise ConfigError(f"testbed.calibration: {calibration} does not exist")
            data["calibration"] = str(calibration)
        return cls(**data)

    def calibration_path(self, scenario_path: str | Path) -> str:
        return self.calibration or str(scenario_path)


SATURATED = 0.85  # a run this busy measured this machine's cores as much as the emulated swarm


def cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all this machine's cores since boot (/proc/stat), None where unreadable."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_between(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def placement_for(scenario: Scenario, policy: str, seed: int):
    placement_name, routing = parse_policy(policy)
    if routing in QUEUE_ROUTERS:
        raise ConfigError(f"{policy} dispatches from a central queue, which the coordinator does not run yet")
    R = wsrr.choose_R(scenario) if placement_name == "cgbp" else None
    return PLACEMENTS[placement_name](scenario, R, seed), R


class SpansNotKept(BlockswarmError):
    """The live swarm is not the planned one (a server moved while the swarm assembled)."""


@contextlib.contextmanager
def swarm(scenario: Scenario, scenario_path: str, policy: str, seed: int, settings: TestbedSettings,
          workdir: Path, constants: RuntimeConstants, say=print, attempts: int = 2):
    """The emulated swarm for one policy; yields (coordinator's public address, hosts by name).
    A swarm that did not assemble as planned is started again from scratch (up to `attempts`
    times). Seen once, with its logs lost: probably, with a dozen servers loading on two cores,
    one missed its heartbeats, was taken for gone and had its blocks covered by moving another,
    which then did not move back."""
    for attempt in range(1, attempts + 1):
        stack = contextlib.ExitStack()
        try:
            started = stack.enter_context(_swarm(scenario, scenario_path, policy, seed, settings, workdir, constants,
                                                 say))
        except SpansNotKept as exc:
            if attempt == attempts:
                raise
            say(f"  {policy}: {exc}; starting it again")
            continue
        with stack:
            yield started
        return


@contextlib.contextmanager
def _swarm(scenario: Scenario, scenario_path: str, policy: str, seed: int, settings: TestbedSettings,
           workdir: Path, constants: RuntimeConstants, say=print):
    K = settings.time_scale
    hosts = hostmap.hosts_of(scenario, settings.coordinator_location)
    by_name = {h.name: h for h in hosts}
    placement, R = placement_for(scenario, policy, seed)
    spans = {span.server: span for span in placement.spans}
    model_dir = tiny_model(scenario.model.num_blocks)
    servers = [(i, by_name[s.name]) for i, s in enumerate(scenario.servers) if i in spans]
    coordinator_host = by_name[hostmap.COORDINATOR]
    listeners = [Listener(coordinator_host.public, 0, coordinator_host.internal)]
    for _, host in servers:
        listeners += [Listener(host.public, 0, host.internal), Listener(host.public, 0, host.internal)]
    plan = LinkPlan(listeners, hostmap.one_way_delays(scenario, hosts, K), stats=str(workdir / "links-stats.json"))
    (workdir / "links.json").write_text(plan.to_json())
    processes = Processes(workdir)
    try:
        links = processes.start("links", [sys.executable, "-m", "blockswarm.testbed.links", str(workdir / "links.json")])
        line = links.stdout.readline()
        if not line.startswith("LINKS READY "):
            raise BlockswarmError(f"the link emulator did not start: {(workdir / 'links.log').read_text()[-500:]}")
        ports = json.loads(line.split(" ", 2)[2])
        coordinator_address = f"{coordinator_host.public}:{ports[0]}"
        state = workdir / f"coordinator-{policy}.sqlite"
        state.unlink(missing_ok=True)  # a fresh swarm: no servers on record from an earlier run
        from blockswarm.runtime.launcher import wait_ready

        command = [sys.executable, "-m", "blockswarm", "coordinator", "--model", model_dir.name, "--policy", policy,
                   "--host", coordinator_host.internal, "--port", str(ports[0]),
                   "--state", str(state),
                   "--session-tokens", str(scenario.workload.max_tokens),
                   "--hop-overhead-ms", f"{constants.decode_hop_s * 1e3:.4f}"]
        if R is not None:
            command += ["--R", str(R)]
        wait_ready(processes.start("coordinator", command), 60)
        started = []
        for n, (index, host) in enumerate(servers):
            span = spans[index]
            name = scenario.servers[index].name
            started.append(processes.start(f"server-{name}", [
                sys.executable, "-m", "blockswarm", "serve", "--model", str(model_dir),
                "--coordinator", coordinator_address, "--blocks", f"{span.start}:{span.end}",
                "--host", host.internal, "--public-host", host.public,
                "--port", str(ports[1 + 2 * n]), "--data-port", str(ports[2 + 2 * n]),
                "--emulate", f"{scenario_path}:{name}", "--time-scale", f"{K:g}", "--threads", "1"]))
        say(f"  {policy}: link emulator, coordinator and {len(started)} emulated servers starting "
            f"(placement of seed {seed}{f', R = {R}' if R else ''})")
        for process in started:
            wait_ready(process, 180)
        _check_spans(coordinator_address, {by_name[scenario.servers[i].name].public: spans[i] for i, _ in servers})
        yield coordinator_address, by_name
    finally:
        processes.stop()


def _check_spans(coordinator: str, planned: dict, wait_s: float = 60.0) -> None:
    """Every server serves the span the simulator's placement gives it (`planned`: public host ->
    Span); anything else would compare two different swarms. Waits up to `wait_s` for servers
    still joining (one starved of CPU while a dozen start on two cores misses heartbeats, is
    marked gone and registers again)."""
    import zmq

    from blockswarm.runtime.coordinator.link import CoordinatorLink

    deadline = time.monotonic() + wait_s
    context = zmq.Context()
    try:
        link = CoordinatorLink(context, coordinator, None)
        while True:
            status = link.call("status", timeout_s=10.0)
            live = {s["address"].rsplit(":", 1)[0]: (s["start"], s["end"]) for s in status["servers"]
                    if s["state"] == "serving"}
            wrong = [f"{host}: {live.get(host)} instead of {span.start}:{span.end}" for host, span in planned.items()
                     if live.get(host) != (span.start, span.end)]
            if not wrong:
                return
            if time.monotonic() > deadline:
                raise SpansNotKept(f"the coordinator did not keep the planned spans ({'; '.join(wrong)}) within "
                                      f"{wait_s:.0f} s; the testbed would not run the swarm the simulator predicts")
            time.sleep(0.5)
    finally:
        context.destroy(linger=0)


def drive(scenario: Scenario, requests: list[Request], coordinator: str, hosts: dict, K: float,
          model_dir: Path) -> Measured:
    """Send every request from its client's host at its arrival time / K; measure in scenario units."""
    import torch

    from blockswarm.runtime.client import DistributedModel

    locations = {host.public: host.location for host in hosts.values()}
    models = [DistributedModel.from_coordinator(coordinator, model=str(model_dir), wait_s=120,
                                                source=hosts[c.name].public) for c in scenario.clients]
    try:
        time.sleep(1.5)  # the clients' first RTT reports reach the coordinator
        records = [RequestRecord(r.request_id, r.client, r.arrival_s, r.prompt_tokens, r.output_tokens)
                   for r in requests]
        breakdowns, setup_samples, errors = [], [], []
        lock = threading.Lock()
        t0 = time.perf_counter() + 0.5
        ticks = cpu_ticks()

        def one(request: Request, record: RequestRecord) -> None:
            model = models[request.client]
            head = model.head
            due = t0 + request.arrival_s / K
            time.sleep(max(0.0, due - time.perf_counter()))
            try:
                session, begin = _open(model, request, K)
                with torch.no_grad(), session:
                    opened = time.perf_counter()
                    ids = torch.tensor([[3 + (request.request_id + i) % 250 for i in range(request.prompt_tokens)]])
                    hidden = session.step(head.embed_tokens(ids, 0))
                    token = int(head.logits(hidden[:, -1:])[0, -1].argmax())
                    first = time.perf_counter()
                    for _ in range(request.output_tokens - 1):
                        hidden = session.step(head.embed_tokens(torch.tensor([[token]]), session.position))
                        token = int(head.logits(hidden[:, -1:])[0, -1].argmax())
                    done = time.perf_counter()
                    timings, chain = session.timings, session.chain
            except BlockswarmError as exc:
                with lock:
                    errors.append(f"request {request.request_id}: {exc}")
                return
            record.start = request.arrival_s + (opened - due) * K
            record.first_token = request.arrival_s + (first - due) * K
            record.completion = request.arrival_s + (done - due) * K
            record.hops = len(timings)
            per_token = (done - first) / (request.output_tokens - 1) if request.output_tokens > 1 else None
            client = scenario.clients[request.client].location
            setup = SetupSample(opened - begin, scenario.network.rtt(client, hosts[hostmap.COORDINATOR].location) / K,
                                tuple((t.open_s, _hop_rtt(scenario, locations, request, t.address, K))
                                      for t in timings))
            with lock:
                breakdowns.append(_breakdown(scenario, locations, request, timings, chain, K, per_token))
                setup_samples.append(setup)

        threads = [threading.Thread(target=one, args=(r, rec), daemon=True) for r, rec in zip(requests, records)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise BlockswarmError(f"{len(errors)} of {len(requests)} requests failed on the testbed; first: {errors[0]}")
        return Measured(records, breakdowns, setup_samples, busy_between(ticks, cpu_ticks()))
    finally:
        for model in models:
            model.close()


def _open(model, request: Request, K: float):
    """A session for the request; a swarm without room is asked again after 1, 2, 4 … 60 s (scenario
    units), as PETALS' clients do and the simulator models. Returns it and when the last try began."""
    for attempt in itertools.count():
        begin = time.perf_counter()
        try:
            return model.session(request.prompt_tokens + request.output_tokens,
                                 prompt_tokens=request.prompt_tokens), begin
        except CacheFull:
            time.sleep(min(2.0 ** attempt, MAX_BACKOFF_S) / K)


def _hop_rtt(scenario: Scenario, locations: dict[str, str], request: Request, address: str, K: float) -> float:
    """The link RTT (real seconds) between the request's client and the server at `address`."""
    return scenario.network.rtt(scenario.clients[request.client].location, locations[address.rsplit(":", 1)[0]]) / K


def _breakdown(scenario: Scenario, locations: dict[str, str], request: Request, timings, chain, K: float,
               per_token_s: float | None) -> StepBreakdown:
    """Split the request's steps (real seconds) into the device, the link's RTT, the server's hold
    beyond the device, the rest of each round trip, and the client's work between hops.
    `locations`: public address -> scenario location; `chain`: the hops (their blocks)."""
    wire, wire_prefill, server, host, blocks, round_trips = [], [], [], 0.0, 0, 0.0
    for timing, hop in zip(timings, chain):
        rtt = _hop_rtt(scenario, locations, request, timing.address, K)
        steps = list(zip(timing.round_trip_s, timing.compute_s, timing.server_s, timing.host_s))
        if steps:
            wire_prefill.append(steps[0][0] - steps[0][2] - rtt)
        decode = steps[1:]
        if decode:
            wire.extend(rt - s - rtt for rt, _, s, _ in decode)
            server.extend(s - c for _, c, s, _ in decode)
            host += sum(h for _, _, _, h in decode)
            blocks += (hop.end - hop.start) * len(decode)
            round_trips += statistics.fmean(rt for rt, _, _, _ in decode)
    mean = lambda xs: statistics.fmean(xs) if xs else 0.0  # noqa: E731
    client = per_token_s - round_trips if per_token_s is not None and wire else 0.0
    return StepBreakdown(mean(wire), mean(wire_prefill), mean(server), host / blocks if blocks else 0.0, client,
                         len(timings))


def summary(records: list[RequestRecord]) -> dict:
    done = [r for r in records if r.completion is not None]
    per_token = [r.per_token_s for r in done]
    return {"mean_per_token_s": statistics.fmean(per_token) if done else math.nan,
            "mean_ttft_s": statistics.fmean(r.ttft_s for r in done) if done else math.nan,
            "p50_per_token_s": percentile(per_token, 0.5), "p90_per_token_s": percentile(per_token, 0.9),
            "mean_wait_s": statistics.fmean(r.wait_s for r in done) if done else math.nan,
            "p50_ttft_s": percentile([r.ttft_s for r in done], 0.5),
            "p90_ttft_s": percentile([r.ttft_s for r in done], 0.9), "n_completed": len(done)}


def relative_errors(predicted: dict, measured: dict, keys=METRICS) -> dict:
    return {k: (predicted[k] - measured[k]) / measured[k] if measured[k] else math.nan for k in keys}


def calibrate_on(scenario_path: str, policies: list[str], seed: int, settings: TestbedSettings, workdir: Path,
                 say=print) -> Calibration:
    """Run the scenario's calibration scenario (`testbed.calibration`, else itself) once per policy,
    seed + 1000 (arrivals, lengths and placement), at the measured run's time scale (the load on
    this machine's cores is part of what is calibrated), and fit the constants on the runs pooled."""
    path = settings.calibration_path(scenario_path)
    own = settings if path == str(scenario_path) else TestbedSettings.of(path)
    own = dataclasses.replace(own, time_scale=settings.time_scale)
    scenario = load_scenario(path)
    model_dir = tiny_model(scenario.model.num_blocks)
    calibration_seed = seed + CALIBRATION_SEED_OFFSET
    requests = generate(scenario, calibration_seed, count=own.calibration_requests)
    runs = []
    for policy in policies:
        with swarm(scenario, path, policy, calibration_seed, own, workdir, RuntimeConstants(), say) as (address, hosts):
            say(f"  {policy}: calibration run ({Path(path).name}, seed {calibration_seed}, {len(requests)} requests)")
            runs.append(drive(scenario, requests, address, hosts, own.time_scale, model_dir))
    busy = [r.cpu_busy for r in runs if r.cpu_busy is not None]
    return Calibration(calibrate(runs), path, calibration_seed, tuple(policies),
                       {**mean_breakdown(runs), "cpu_busy": statistics.fmean(busy) if busy else None})


def run_policy(scenario_path: str, policy: str, seed: int, settings: TestbedSettings, workdir: Path,
               constants: RuntimeConstants, say=print) -> dict:
    """Run the measured seed on the testbed and predict it with `constants`; one policy."""
    scenario = load_scenario(scenario_path)
    K = settings.time_scale
    model_dir = tiny_model(scenario.model.num_blocks)
    count = settings.requests or scenario.workload.num_requests
    requests = generate(scenario, seed, count=count)
    with swarm(scenario, scenario_path, policy, seed, settings, workdir, constants, say) as (address, hosts):
        say(f"  {policy}: measured run (seed {seed}, {len(requests)} requests, time scale {K:g})")
        measured = drive(scenario, requests, address, hosts, K, model_dir)
    if measured.cpu_busy is not None and measured.cpu_busy > SATURATED:
        say(f"  {policy}: warning: this machine's CPU was {measured.cpu_busy:.0%} busy during the run: its cores, "
            "not only the emulated swarm, set the times measured (fewer concurrent requests, shorter answers or a "
            "smaller time scale load it less)")
    coordinator = hostmap.coordinator_location(scenario, settings.coordinator_location)
    predicted = simulate(constants.scenario(scenario, K, coordinator), policy, seed, requests=requests)
    measured_summary, predicted_summary = summary(measured.records), summary(predicted.records)
    return {"measured": measured_summary, "predicted": predicted_summary,
            "relative_error": relative_errors(predicted_summary, measured_summary),
            "constants": dataclasses.asdict(constants), "breakdown": mean_breakdown([measured]),
            "cpu_busy": measured.cpu_busy,
            "per_request": [{"id": m.request_id, "measured_per_token_s": m.per_token_s,
                             "predicted_per_token_s": p.per_token_s, "measured_ttft_s": m.ttft_s,
                             "predicted_ttft_s": p.ttft_s}
                            for m, p in zip(measured.records, predicted.records) if p.completion is not None]}
