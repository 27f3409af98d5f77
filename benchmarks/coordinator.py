"""The coordinator under load: route decisions at 10 / 100 / 1,000 servers, failover and joins.

1. Route decision latency. A real `blockswarm coordinator` process; the servers are synthetic
   registrations (Llama-2-70B's shape, a mix of 24/40/48/80 GB budgets and 5-30 ms per block and
   token), kept alive by heartbeats from this process (each server beats once a second, as real
   ones do, so the coordinator also carries that load). One client asks for routes with WS-RR
   while holding live reservations: it keeps `--occupancy` × R of them open (releasing the oldest),
   (R = servers / 4; CG-BP gives every server cache for R sessions, so up to R sessions WS-RR's
   cheapest route has room). Reported: the coordinator's own time from request decoded to reply
   encoded (its `route_ms`), and the client's round trip beside it. Targets: median ≤ 1 ms,
   p99 ≤ 5 ms at 1,000 servers. Congested rows: 1.5 × R sessions held, so most requests must
   price waiting (the full Dijkstra over every span); timed on the coordinator's `Swarm` in-process.
2. Failover and joins on a real swarm (SmolLM2, a coordinator and three servers of different
   memory budgets on one torch thread each): the time from SIGKILL of a server on a session's
   route to the session's next token; the time from a server whose blocks nobody else holds
   dying to its blocks being served again by a moved server (target: 5 s plus loading the span);
   the time from a new server's start to its first session.

    .venv/bin/python benchmarks/coordinator.py --json coordinator.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time

import zmq

from blockswarm.core.catalogue import MODELS
from blockswarm.runtime.coordinator.link import CoordinatorLink
from blockswarm.runtime.launcher import coordinator_command, start, stop_all, wait_ready
from blockswarm.runtime.messages import PROTOCOL_VERSION
from meta import run_metadata

GB = 10**9
SIZES = (10, 100, 1000)


def synthetic_servers(count: int, seed: int = 0) -> list[dict]:
    spec = MODELS["llama-2-70b"]
    rng = random.Random(seed)
    shape = {"model": "llama-2-70b", "fingerprint": "llama-8192-80", "num_blocks": spec.num_blocks,
             "hidden_size": spec.d_model, "d_kv": spec.d_kv, "params_per_block": spec.params_per_block,
             "dtype": "float16", "itemsize": 2}
    servers = []
    for i in range(count):
        servers.append({**shape, "version": PROTOCOL_VERSION, "address": f"10.{i // 250}.{i % 250}.1:5000",
                        "data_port": 5001, "device": "cuda", "memory_bytes": rng.choice((24, 40, 48, 80)) * GB,
                        "block_decode_s": rng.uniform(0.005, 0.030), "block_prefill_s_per_token": 1e-4,
                        "block_prefill_base_s": 0.01})
    return servers


class Heartbeats:
    """Keeps synthetic servers alive: each beats once a second, reporting it serves its span."""

    def __init__(self, context, address: str):
        self.link = CoordinatorLink(context, address)
        self.servers: dict[str, list] = {}  # id -> [start, end]
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def register(self, registration: dict) -> None:
        reply = self.link.call("register", timeout_s=60, **registration)
        self.servers[reply["server"]] = [None, None]

    def run(self) -> None:
        while not self._stop.is_set():
            begin = time.monotonic()
            for server, span in list(self.servers.items()):
                reply = self.link.call("heartbeat", timeout_s=60, server=server, state="serving", start=span[0],
                                       end=span[1], free_cache_tokens=0, sessions=0)
                if reply.get("assign"):
                    span[0], span[1] = reply["assign"]["start"], reply["assign"]["end"]
            self._stop.wait(max(0.0, 1.0 - (time.monotonic() - begin)))

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(30)
        self.link.close()


def route_latency(count: int, requests: int, occupancy: float) -> dict:
    context = zmq.Context()
    R = max(2, count // 4)
    state = f"/tmp/bench-coordinator-{count}-{time.time_ns()}.sqlite"
    process = start(coordinator_command("llama-2-70b", ["--R", str(R), "--state", state]))
    try:
        address = wait_ready(process, 30)
        beats = Heartbeats(context, address)
        for registration in synthetic_servers(count):
            beats.register(registration)
        link = CoordinatorLink(context, address)
        deadline = time.monotonic() + 120
        while link.call("status", timeout_s=60)["missing"] and time.monotonic() < deadline:
            beats.link.call("status", timeout_s=60)
            for server, span in beats.servers.items():  # report the assigned spans at once
                reply = beats.link.call("heartbeat", timeout_s=60, server=server, state="serving", start=span[0],
                                        end=span[1], free_cache_tokens=0, sessions=0)
                if reply.get("assign"):
                    span[0], span[1] = reply["assign"]["start"], reply["assign"]["end"]
            time.sleep(0.3)
        beats.thread.start()
        held, round_trips, full = [], [], 0
        hold = max(1, int(R * occupancy))
        for i in range(requests):
            begin = time.perf_counter()
            try:
                reply = link.call("route", timeout_s=60, client=f"c{i % 8}", prompt_tokens=64, max_new_tokens=128)
                held.append(reply["reservation"])
            except Exception:  # cache_full at this occupancy: still a decision, timed inside
                full += 1
            round_trips.append((time.perf_counter() - begin) * 1e3)
            while len(held) > hold:
                link.call("release", client="c", reservation=held.pop(0))
        inside = link.call("status", timeout_s=60)["route_ms"]
        beats.stop()
        link.close()
    finally:
        stop_all([process])
        context.destroy(linger=0)
    round_trips.sort()
    return {"servers": count, "R": R, "held": hold, "requests": requests, "cache_full": full,
            "median": inside["median"], "p99": inside["p99"],
            "client_median": statistics.median(round_trips),
            "client_p99": round_trips[min(len(round_trips) - 1, int(len(round_trips) * 0.99))]}


def congested_decisions(count: int, requests: int, occupancy: float) -> dict:
    """Route decisions when more sessions are open than R (WS-RR must price waiting), timed on the
    coordinator's own `Swarm` in this process: over sockets each such reply is held until its route
    starts, so a client's round trip would measure the wait, not the decision."""
    from blockswarm.runtime.coordinator.swarm import SETTLE_S, Swarm, SwarmConfig

    clock = _Clock()
    R = max(2, count // 4)
    swarm = Swarm(SwarmConfig("llama-2-70b", R=R, hold_s=1e9), None, clock)
    for registration in synthetic_servers(count):
        swarm.register({**registration, "start": None, "end": None})
    clock.now += SETTLE_S
    swarm.place()
    for record in swarm.members():
        swarm.heartbeat(record.id, {"state": "serving", "start": record.start, "end": record.end,
                                    "free_cache_tokens": 0, "sessions": 0})
    held, times, waited = [], [], 0
    hold = max(1, int(R * occupancy))
    for i in range(requests):
        clock.now += 0.05
        begin = time.perf_counter()
        reservation, start_at = swarm.route(f"c{i % 8}", 64, 128)
        times.append((time.perf_counter() - begin) * 1e3)
        waited += start_at > clock.now
        held.append(reservation.id)
        while len(held) > hold:
            swarm.release(held.pop(0))
    times.sort()
    return {"servers": count, "R": R, "held": hold, "requests": requests, "waiting": waited,
            "median": statistics.median(times), "p99": times[min(len(times) - 1, int(len(times) * 0.99))]}


class _Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def live_swarm_times() -> dict:
    """Failover, repair and join times on a real SmolLM2 swarm."""
    from blockswarm.model.checkpoint import SMOLLM2, ensure_smollm2
    from blockswarm.runtime.client import DistributedModel
    from blockswarm.runtime.launcher import member_command

    ensure_smollm2()
    context = zmq.Context()
    processes = []
    out: dict = {}
    try:
        coordinator = start(coordinator_command(SMOLLM2, ["--R", "2", "--state", f"/tmp/bench-live-{time.time_ns()}.sqlite"]))
        processes.append(coordinator)
        address = wait_ready(coordinator, 30)
        link = CoordinatorLink(context, address)
        started = [start(member_command(SMOLLM2, address, memory, ["--threads", "1"]))
                   for memory in ("400MiB", "300MiB", "200MiB")]
        processes.extend(started)  # all at once: none is placed until together they can cover the model
        servers = {wait_ready(process, 180): process for process in started}
        _wait(lambda: not link.call("status")["missing"], 60)
        model = DistributedModel.from_coordinator(address, model=SMOLLM2)
        # 1. a server on the route killed: the next token's latency
        marks = {}

        def kill_second_hop(token, _text):
            if "killed" not in marks and len(marks) == 0:
                now = link.call("status")
                mine = [r for r in now["routes"] if r["client"] == model.coordinator.client]
                held = {s["address"]: s for s in now["servers"] if s["state"] == "serving"}

                def replicated(address):  # another server holds every block of its hop
                    return all(any(o["start"] <= b < o["end"] for a, o in held.items() if a != address)
                               for b in range(held[address]["start"], held[address]["end"]))

                hops = [h[0] for h in mine[0]["hops"]]
                victim = next((a for a in hops if replicated(a)), hops[-1])
                servers[victim].kill()
                servers[victim].wait()
                marks["killed"] = time.perf_counter()
                marks["victim"] = victim
            elif "killed" in marks and "next" not in marks:
                marks["next"] = time.perf_counter()

        result = model.generate("The history of Paris begins", max_new_tokens=12, on_token=kill_second_hop,
                                chat_template=False)
        out["death_to_rerouted_token_s"] = marks["next"] - marks["killed"]
        out["repairs"] = result.repairs
        # 2. a new server: time from its start to its first session
        begin = time.perf_counter()
        process = start(member_command(SMOLLM2, address, "300MiB", ["--threads", "1"]))
        processes.append(process)
        newcomer = wait_ready(process, 180)
        servers[newcomer] = process
        _wait(lambda: any(s["address"] == newcomer and s["state"] == "serving"
                          for s in link.call("status")["servers"]), 60)
        out["join_to_serving_s"] = time.perf_counter() - begin
        held = []
        while True:  # sessions keep coming (held open) until one is given the newcomer
            reply = link.call("route", timeout_s=60, client="filler", prompt_tokens=16, max_new_tokens=16)
            held.append(reply["reservation"])
            if any(h["address"] == newcomer for h in reply["hops"]) or len(held) > 64:
                break
        out["join_to_first_session_s"] = time.perf_counter() - begin
        out["sessions_before_newcomer_used"] = len(held) - 1
        for reservation in held:
            link.call("release", client="filler", reservation=reservation)
        # 3. re-placement: a server whose blocks nobody else holds dies; an idle one moves onto them.
        # Redundant servers are stopped first until such a configuration exists.
        stopped = []
        victim = _repairable_victim(link.call("status"))
        while victim is None:
            redundant = _redundant_server(link.call("status"))
            if redundant is None:
                break
            servers[redundant].kill()
            servers[redundant].wait()
            stopped.append(redundant)
            _wait(lambda: all(s["state"] == "gone" for s in link.call("status")["servers"]
                              if s["address"] in stopped), 10)
            victim = _repairable_victim(link.call("status"))
        out["replacement"] = {"victim": victim, "stopped_first": stopped}
        if victim is not None:
            began = time.perf_counter()
            servers[victim].kill()
            servers[victim].wait()
            timeline = {}

            def moved():
                now = link.call("status")
                gone = any(s["address"] == victim and s["state"] == "gone" for s in now["servers"])
                if gone and "gone" not in timeline:
                    timeline["gone"] = time.perf_counter() - began
                if any(s["state"] == "loading" for s in now["servers"]) and "assigned" not in timeline:
                    timeline["assigned"] = time.perf_counter() - began
                return gone and not now["missing"] and all(s["state"] != "loading" for s in now["servers"])

            if _wait(moved, 120):
                timeline["serving"] = time.perf_counter() - began
            out["replacement"].update(timeline)
        model.close()
        link.close()
    finally:
        stop_all(processes[::-1])
        context.destroy(linger=0)
    return out


def _repairable_victim(status: dict) -> str | None:
    """A serving server whose death leaves blocks nobody holds that an idle server can take over
    (the planner's `live.repairable_losses`, on the spans the coordinator reports)."""
    from blockswarm.core.specs import Placement, Span
    from blockswarm.planner import live

    serving = [s for s in status["servers"] if s["state"] == "serving"]
    placement = Placement(tuple(Span(i, s["start"], s["end"], s["slots"]) for i, s in enumerate(serving)),
                          len(status["coverage"]))
    losses = live.repairable_losses(placement)
    return serving[losses[0]]["address"] if losses else None


def _redundant_server(status: dict) -> str | None:
    """A serving server whose loss uncovers no block."""
    from blockswarm.core.specs import Placement, Span
    from blockswarm.planner import live

    serving = [s for s in status["servers"] if s["state"] == "serving"]
    for i, candidate in enumerate(serving):
        rest = [s for j, s in enumerate(serving) if j != i]
        spans = tuple(Span(k, s["start"], s["end"], s["slots"]) for k, s in enumerate(rest))
        if not live.missing_blocks(Placement(spans, len(status["coverage"]))):
            return candidate["address"]
    return None


def _wait(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="route requests per swarm size")
    parser.add_argument("--occupancy", type=float, default=0.8, help="reservations held, as a share of R")
    parser.add_argument("--congested-occupancy", type=float, default=1.5, help="sessions held, as a share of R, "
                        "for the congested rows")
    parser.add_argument("--congested-requests", type=int, default=300, help="route requests per congested row")
    parser.add_argument("--skip-live", action="store_true", help="only the route latency (no model processes)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    rows = [route_latency(n, args.requests, args.occupancy) for n in SIZES]
    print(f"{'servers':>8} {'R':>5} {'held':>5} {'median ms':>10} {'p99 ms':>8} {'client median':>14} "
          f"{'client p99':>11} {'cache_full':>10}")
    for row in rows:
        print(f"{row['servers']:>8} {row['R']:>5} {row['held']:>5} {row['median']:>10.3f} {row['p99']:>8.3f} "
              f"{row['client_median']:>14.3f} {row['client_p99']:>11.3f} {row['cache_full']:>10}")
    congested = [congested_decisions(n, args.congested_requests, args.congested_occupancy) for n in SIZES]
    print(f"\ncongested ({args.congested_occupancy:g} x R sessions held; decisions timed in-process)")
    print(f"{'servers':>8} {'R':>5} {'held':>5} {'median ms':>10} {'p99 ms':>8} {'had to wait':>12}")
    for row in congested:
        print(f"{row['servers']:>8} {row['R']:>5} {row['held']:>5} {row['median']:>10.3f} {row['p99']:>8.3f} "
              f"{row['waiting']:>12}")
    live = None if args.skip_live else live_swarm_times()
    if live:
        for key, value in live.items():
            print(f"{key}: {value}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"meta": run_metadata(), "route_ms_by_servers": {str(r["servers"]): {
                "median": r["median"], "p99": r["p99"]} for r in rows}, "route": rows, "congested": congested,
                       "live": live}, out, indent=2)


if __name__ == "__main__":
    main()
