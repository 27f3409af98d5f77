"""`blockswarm demo`: a coordinator places SmolLM2 on local servers and answers through them
(with `--api`, then serves the HTTP API and the swarm page over that swarm)."""

from __future__ import annotations

import sys

import typer

from blockswarm.cli.common import DEFAULT_PROMPT, _fail, _interruptible, _require, app
from blockswarm.cli.swarm import _report


DEMO_MEMORIES = ("400MiB", "300MiB", "200MiB", "300MiB", "200MiB", "400MiB")


@app.command()
def demo(
    prompt: str = typer.Option(DEFAULT_PROMPT, help="The question to ask."),
    servers: int = typer.Option(3, help="How many local servers (each offers a different memory budget: "
                                "400, 300, 200 MiB, ...)."),
    max_new_tokens: int = typer.Option(48, help="Stop after this many new tokens."),
    api: bool = typer.Option(False, "--api", help="Then serve the OpenAI-compatible API and the swarm page "
                             "(URL printed) until Ctrl-C."),
    api_port: int = typer.Option(8000, help="With --api: the port (0 picks a free one)."),
):
    """A coordinator places SmolLM2-135M on local servers none of which is told its blocks, then
    answers a question through the route it hands out; everything stops at the end or on Ctrl-C.

    Example: blockswarm demo --api   (then open the printed URL, or point an OpenAI client at URL/v1)"""
    _require(2 <= servers <= len(DEMO_MEMORIES), f"--servers must be 2..{len(DEMO_MEMORIES)}, got {servers}")
    _require(max_new_tokens >= 1, f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if api:  # a taken port is said now, not after the swarm has started
        from blockswarm.api.serving import bind
        from blockswarm.core.errors import ConfigError

        try:
            bind("127.0.0.1", api_port).close()
        except ConfigError as exc:
            _fail(str(exc).replace("--port", "--api-port"))
    with _interruptible("\nInterrupted; the coordinator and servers stopped."):
        import tempfile

        from blockswarm.core.errors import BlockswarmError
        from blockswarm.model.checkpoint import SMOLLM2, ensure_smollm2
        from blockswarm.runtime.client import DistributedModel
        from blockswarm.runtime.launcher import coordinated_swarm

        try:
            typer.echo("Preparing SmolLM2-135M-Instruct (converted once, then cached)...", err=True)
            ensure_smollm2()
            memories = list(DEMO_MEMORIES[:servers])
            with tempfile.TemporaryDirectory(prefix="blockswarm-demo-") as scratch:
                log = f"{scratch}/swarm.log"
                typer.echo(f"Starting a coordinator (policy cgbprr, R=2) and {servers} servers offering "
                           f"{', '.join(memories)}; none is told its blocks (their logs: {log})", err=True)
                with open(log, "w") as logfile, coordinated_swarm(
                        SMOLLM2, memories, ["--R", "2", "--state", f"{scratch}/state.sqlite"], ["--threads", "1"],
                        stderr=logfile) as (address, _servers, _coordinator):
                    with DistributedModel.from_coordinator(address, model=SMOLLM2) as model:
                        typer.echo(_describe_placement(address), err=True)
                        typer.echo(f"\nQ: {prompt}\nA: ", nl=False)
                        result = model.generate(prompt, max_new_tokens=max_new_tokens,
                                                on_token=lambda _id, delta: (sys.stdout.write(delta),
                                                                             sys.stdout.flush()))
                    typer.echo("\n")
                    _report(result)
                    if api:
                        _serve_api(address, api_port)
            typer.echo("Coordinator and servers stopped.", err=True)
        except BlockswarmError as exc:
            _fail(str(exc))


def _serve_api(coordinator: str, port: int) -> None:
    """The API in front of the demo's swarm until Ctrl-C (which then stops the swarm too)."""
    from blockswarm.api.serving import APIConfig, APIServer
    from blockswarm.cli.frontdoor import announce
    from blockswarm.model.checkpoint import SMOLLM2

    server = APIServer(APIConfig(coordinator=coordinator, model=SMOLLM2, port=port))
    announce(server)
    typer.echo("Serving until Ctrl-C.", err=True)
    server.serve_forever()


def _describe_placement(address: str) -> str:
    """The coordinator's placement and why: CG-BP gives server j m_j = min(floor(M_j / (s_m + s_c R)), L)
    blocks, fastest (amortized) first, each on the window that most needs capacity."""
    import zmq

    from blockswarm.runtime.coordinator.link import CoordinatorLink

    context = zmq.Context()
    try:
        data = CoordinatorLink(context, address).call("status", scenario=True)
    finally:
        context.destroy(linger=0)
    model = data["scenario"]["model"]
    block = model["params_per_block"] * model["weight_bytes_per_param"]
    cache = 2 * model["d_kv"] * data["session_tokens"] * model["kv_bytes"]
    R, L = data["R"], model["num_blocks"]
    lines = [f"\nPlacement by {data['placement_policy']} for R={R} concurrent sessions: a block's weights take "
             f"s_m = {block / 2**20:.1f} MiB, one session's cache on a block s_c = {cache / 2**20:.1f} MiB "
             f"({data['session_tokens']} tokens), so a server with memory M gets min(floor(M / (s_m + {R}·s_c)), "
             f"{L}) blocks, fastest first, each where capacity is most needed:"]
    for s in data["servers"]:
        blocks = s["end"] - s["start"]
        lines.append(f"  {s['address']:<16} {s['memory_bytes'] / 2**20:5.0f} MiB  "
                     f"{s['block_decode_s'] * 1e3:6.2f} ms/block/token  -> blocks {s['start']:>2}:{s['end']:<2} "
                     f"({blocks} blocks, cache for {s['slots'] // max(1, blocks)} sessions)")
    lines.append("coverage per block: " + " ".join(str(c) for c in data["coverage"]))
    if data["predicted_per_token_s"] is not None:
        lines.append(f"predicted per-token time on the best route (WS-RR): "
                     f"{data['predicted_per_token_s'] * 1e3:.1f} ms")
    return "\n".join(lines)
