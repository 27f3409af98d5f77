"""Commands of a coordinated swarm: the coordinator itself, and `status`."""

from __future__ import annotations

import logging
import sys
from typing import Optional

import typer

from blockswarm.cli.common import _check_writable, _fail, _interruptible, _require, _write_json, app


@app.command()
def coordinator(
    model: str = typer.Option("smollm2", help="The model servers must hold: `smollm2` or a local model's folder name."),
    policy: str = typer.Option("cgbprr", help="PLACEMENT+ROUTING (placements: petals, cgbp; routings: petals, "
                               "shortest, wsrr) or a shorthand: cgbprr (CG-BP + WS-RR), petals."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(0, help="Port; 0 picks a free one (printed in the READY line)."),
    state: Optional[str] = typer.Option(None, help="SQLite state file (default: coordinator-PORT.sqlite in the "
                                        "user's cache directory). A restarted coordinator carries on from it."),
    r: Optional[int] = typer.Option(None, "--R", help="Concurrent sessions CG-BP sizes caches for (default: from "
                                    "the measured arrival rate, 0.1 request/s before any arrives)."),
    session_tokens: int = typer.Option(2048, help="Longest session (prompt + new tokens) a cache slot holds."),
    hop_overhead_ms: float = typer.Option(1.0, help="The runtime's own cost per hop, added to each client-server "
                                          "RTT in the performance model."),
    keys: Optional[str] = typer.Option(None, help="DIR/NAME of the coordinator's key pair: a private swarm."),
    allow: Optional[str] = typer.Option(None, help="Directory of the public keys (*.key) of the servers and "
                                        "clients a private coordinator admits."),
):
    """Place servers' blocks with the planner and route every session, until Ctrl-C.

    Example: blockswarm coordinator --model smollm2 --port 5550, then
    blockswarm serve --coordinator 127.0.0.1:5550 --memory 300MiB (no --blocks) on each server."""
    from blockswarm.core.errors import BlockswarmError

    _require(0 <= port <= 65535, f"--port must be a TCP port in 0..65535 (0 picks a free one), got {port}")
    _require(r is None or r >= 1, f"--R must be at least 1 (or left out), got {r}")
    _require(session_tokens >= 2, f"--session-tokens must be at least 2, got {session_tokens}")
    _require(hop_overhead_ms >= 0, f"--hop-overhead-ms must be >= 0, got {hop_overhead_ms}")
    from blockswarm.planner.registry import QUEUE_ROUTERS, parse_policy

    try:
        if parse_policy(policy)[1] in QUEUE_ROUTERS:
            _fail(f"--policy {policy} dispatches from a central queue, which the coordinator does not run yet; "
                  "use petals, cgbprr or another PLACEMENT+ROUTING pair")
    except BlockswarmError as exc:
        _fail(str(exc))
    with _interruptible("interrupted; the coordinator stopped"):
        from blockswarm.runtime.coordinator.service import CoordinatorConfig, run_coordinator
        from blockswarm.runtime.coordinator.swarm import SwarmConfig
        from blockswarm.runtime.messages import model_name

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
        try:
            swarm = SwarmConfig(model=model_name(model), policy=policy, R=r, session_tokens=session_tokens,
                                hop_overhead_s=hop_overhead_ms / 1e3)
            run_coordinator(CoordinatorConfig(swarm, host=host, port=port, state=state, keys=keys, allow=allow))
        except BlockswarmError as exc:
            _fail(str(exc))


@app.command()
def status(
    coordinator: str = typer.Option(..., help="host:port of the swarm's coordinator."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Also write the swarm's state as JSON here."),
    scenario: Optional[str] = typer.Option(None, help="Also write the live swarm as a scenario file (YAML) here, "
                                           "for `blockswarm plan` and `simulate`."),
    timeout: float = typer.Option(5.0, help="Seconds to wait for the coordinator."),
    keys: Optional[str] = typer.Option(None, help="DIR/NAME of this client's key pair, for a private swarm."),
    known_servers: Optional[str] = typer.Option(None, help="File of `HOST:PORT PUBLIC_KEY_FILE` lines (the "
                                                "coordinator's among them)."),
):
    """Show the swarm: servers, their spans and load, coverage per block, the policy, reserved routes.

    Example: blockswarm status --coordinator 127.0.0.1:5550 --json swarm.json"""
    from blockswarm.cli.swarm import _client_keys
    from blockswarm.core.errors import BlockswarmError
    from blockswarm.runtime.coordinator.link import CoordinatorLink

    _require(timeout > 0, f"--timeout must be a positive number of seconds, got {timeout}")
    _check_writable(json_path, "--json")
    _check_writable(scenario, "--scenario")
    client_keys = _client_keys(keys, known_servers)
    import zmq

    context = zmq.Context()
    try:
        link = CoordinatorLink(context, coordinator, client_keys)
        data = link.call("status", timeout_s=timeout, scenario=scenario is not None)
    except BlockswarmError as exc:
        _fail(str(exc), code=1)
    finally:
        context.destroy(linger=0)
    data = {k: v for k, v in data.items() if k not in ("ok", "rid")}
    typer.echo(describe_status(data))
    if json_path:
        _write_json(json_path, "--json", {k: v for k, v in data.items() if k != "scenario"})
    if scenario:
        import yaml

        with open(scenario, "w") as out:
            yaml.safe_dump(data["scenario"], out, sort_keys=False)


def describe_status(data: dict) -> str:
    lines = [f"model {data['model']}  policy {data['policy']} ({data['placement_policy']} placement, "
             f"{data['routing_policy']} routing)  R {data['R']}"]
    for s in data["servers"]:
        span = f"{s['start']}:{s['end']}" if s["start"] is not None else "-"
        lines.append(f"  {s['address']:<22} {s['state']:<9} blocks {span:<7} {s['device']:<6} "
                     f"{s['memory_bytes'] / 2**20:8.0f} MiB  {s['block_decode_s'] * 1e3:7.3f} ms/block/token  "
                     f"sessions {s['sessions']}  free cache {s['free_cache_tokens']}/{s['cache_tokens']} tokens")
    lines.append("coverage " + " ".join(str(c) for c in data["coverage"]))
    lines.append(f"missing: {data['missing']}" if data["missing"] else "every block is covered")
    if data["predicted_per_token_s"] is not None:
        lines.append(f"predicted per-token time {data['predicted_per_token_s'] * 1e3:.2f} ms")
    lines.append(f"routes reserved: {len(data['routes'])}")
    for route in data["routes"][:20]:
        lines.append("  " + " -> ".join(f"{a}[{s}:{e}]" for a, s, e in route["hops"]))
    return "\n".join(lines)
