"""Commands that run the swarm: serve, generate, info, keys (the demo is `demo.py`)."""

from __future__ import annotations

import logging
import sys
from typing import Optional

import typer

from blockswarm.cli.common import (
    DTYPE_NAMES, _addresses, _check_span_in_model, _check_writable, _fail, _interruptible,
    _parse_span, _require, _write_json, app,
)


@app.command()
def serve(
    model: str = typer.Option("smollm2", help="`smollm2` (embedded) or a local Hugging Face model directory."),
    blocks: Optional[str] = typer.Option(None, help="Blocks to hold, START:END with END exclusive, e.g. 10:20 "
                                         "(or leave it to a --coordinator)."),
    coordinator: Optional[str] = typer.Option(None, help="host:port of a coordinator that places this server "
                                              "(instead of --blocks)."),
    memory: Optional[str] = typer.Option(None, help="With --coordinator: memory this server offers for weights "
                                         "and cache, e.g. 8GiB or 300MiB (default: 90% of a GPU's free memory, "
                                         "half the free RAM on a CPU)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(0, help="Control port (info/open/close); 0 picks a free one (printed in the READY line)."),
    data_port: int = typer.Option(0, help="Port for steps (hidden states); 0 picks a free one, which clients learn "
                                  "from the server. Fix it when a firewall must let it through."),
    device: str = typer.Option("cpu", help="torch device for the blocks, e.g. cpu or cuda."),
    dtype: str = typer.Option("float32", help="float32, float16 or bfloat16."),
    cache_tokens: int = typer.Option(16384, help="KV-cache budget in tokens for the whole span, shared by sessions "
                                     "(with --coordinator, --memory decides it)."),
    session_timeout: float = typer.Option(300.0, help="Close sessions idle for this many seconds."),
    threads: Optional[int] = typer.Option(None, help="torch threads for compute (default: torch's choice)."),
    keys: Optional[str] = typer.Option(None, help="DIR/NAME of this server's key pair (from `blockswarm keys new`): "
                                       "serve a private swarm, encrypted, admitting only --allow's keys."),
    allow: Optional[str] = typer.Option(None, help="Directory of the public key files (*.key) of the clients a "
                                        "private server admits."),
    known_servers: Optional[str] = typer.Option(None, help="With --coordinator and --keys: a file of `HOST:PORT "
                                                "PUBLIC_KEY_FILE` lines naming the coordinator's public key."),
    prefill_budget: int = typer.Option(512, help="Tokens computed per slice: longer prompts run in slices, with "
                                       "other sessions' steps in between."),
    max_session_tokens: Optional[int] = typer.Option(None, help="Longest session one client may open (default: "
                                                     "the model's context length)."),
    max_peer_share: float = typer.Option(1.0, help="Share of the cache one client (key, or source address) may "
                                         "hold at once, e.g. 0.25."),
    max_sessions: int = typer.Option(4096, help="Sessions open at once, from everybody."),
    max_connections: int = typer.Option(1024, help="Connections per port, from everybody."),
    max_connections_per_address: int = typer.Option(512, help="Connections per port from one source address."),
    public_host: Optional[str] = typer.Option(None, help="The address others reach this server at, and its own "
                                              "connections leave from (the testbed's link emulator listens there "
                                              "on the same ports); default: --host."),
    emulate: Optional[str] = typer.Option(None, help="SCENARIO.yaml:SERVER: take on that scenario server's device "
                                          "(per-block decode and prefill times, memory, the scenario model's sizes); "
                                          "a tiny model computes underneath (the testbed)."),
    time_scale: float = typer.Option(1.0, help="With --emulate: divide the device's times by this."),
    decode_ms: Optional[float] = typer.Option(None, help="Per-block decode time (ms per token) to announce instead "
                                              "of the one measured at start, e.g. 2.5: what clients and the "
                                              "coordinator plan with. For a host whose start-up measurement "
                                              "misleads (a shared machine)."),
):
    """Hold a span of blocks and serve sessions over ZeroMQ until Ctrl-C.

    Example: blockswarm serve --model smollm2 --blocks 0:15 --port 5551
    Placed by a coordinator: blockswarm serve --coordinator 127.0.0.1:5550 --memory 300MiB
    Private: blockswarm serve --blocks 0:15 --keys keys/server1 --allow keys/clients"""
    _require(blocks is not None or coordinator is not None,
             "give --blocks START:END (the blocks to hold) or --coordinator HOST:PORT (to be placed); with both, "
             "the server asks the coordinator for that span")
    _require(memory is None or coordinator is not None, "--memory is what a server offers a coordinator; "
             "use it with --coordinator (without one, --cache-tokens sizes the cache)")
    _require(memory is None or emulate is None, "--emulate brings the scenario server's memory; leave --memory out")
    _require(time_scale > 0, f"--time-scale must be positive, got {time_scale}")
    _require(decode_ms is None or decode_ms > 0, f"--decode-ms must be positive, got {decode_ms}")
    start, end = _parse_span(blocks) if blocks else (0, 0)
    memory_bytes = None
    if memory is not None:
        from blockswarm.core.errors import BlockswarmError
        from blockswarm.runtime.member import parse_memory

        try:
            memory_bytes = parse_memory(memory)
        except BlockswarmError as exc:
            _fail(str(exc))
    _require(known_servers is None or (coordinator is not None and keys is not None),
             "--known-servers is for a private server joining a coordinator (with --coordinator and --keys)")
    _require(coordinator is None or keys is None or known_servers is not None,
             "a private server joining a coordinator needs --known-servers FILE with the coordinator's public key "
             "(a line `HOST:PORT PATH/TO/coordinator.key`)")
    if coordinator is not None:
        from blockswarm.runtime.messages import parse_address

        try:
            parse_address(coordinator)
        except Exception as exc:  # BadRequest: the message says what an address looks like
            _fail(f"--coordinator: {exc}")
    for name, value in (("--port", port), ("--data-port", data_port)):
        _require(0 <= value <= 65535, f"{name} must be a TCP port in 0..65535 (0 picks a free one), got {value}")
    _require(threads is None or threads >= 1, f"--threads must be at least 1 (or left out), got {threads}")
    _require(dtype in DTYPE_NAMES, f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    with _interruptible("interrupted while starting; the server was not started"):
        from blockswarm.core.errors import BlockswarmError
        from blockswarm.runtime.serveconfig import ServeConfig

        emulation = None
        if emulate is not None:
            from blockswarm.testbed.devices import parse_emulate

            try:
                emulation = parse_emulate(emulate, time_scale)
            except BlockswarmError as exc:
                _fail(f"--emulate: {exc}")
        config = ServeConfig(model=model, start=start, end=end, host=host, port=port, data_port=data_port,
                             device=device, dtype=dtype, cache_tokens=cache_tokens,
                             session_timeout_s=session_timeout, threads=threads, prefill_budget=prefill_budget,
                             decode_s=None if decode_ms is None else decode_ms / 1e3,
                             max_session_tokens=max_session_tokens, max_peer_share=max_peer_share,
                             max_sessions=max_sessions, max_connections=max_connections,
                             max_connections_per_address=max_connections_per_address, keys=keys, allow=allow,
                             coordinator=coordinator, memory=memory_bytes, public_host=public_host,
                             emulation=emulation)
        try:  # (torch-free checks first: a mistyped option is said at once, not after ~8 s of imports)
            config.check()
            from blockswarm.runtime.devices import check_device

            check_device(config.device)  # (before the server's imports: a missing GPU is said in ~2 s, not ~8)
        except BlockswarmError as exc:
            _fail(str(exc))
        from blockswarm.runtime.server import run_server

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
        try:
            if coordinator is not None:
                from blockswarm.runtime.member import run_member

                run_member(config, _client_keys(keys, known_servers) if keys else None)
                return
            _check_span_in_model(model, start, end)
            run_server(config)
        except BlockswarmError as exc:
            _fail(str(exc))


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The prompt."),
    servers: Optional[str] = typer.Option(None, help="Comma-separated host:port of servers, in any order."),
    coordinator: Optional[str] = typer.Option(None, help="host:port of the swarm's coordinator (instead of "
                                              "--servers): it hands out the route."),
    wait: float = typer.Option(120.0, help="With --coordinator: seconds to wait until the swarm covers the model."),
    model: str = typer.Option("smollm2", help="The same model the servers hold (the client needs its head)."),
    max_new_tokens: int = typer.Option(64, help="Stop after this many new tokens."),
    temperature: float = typer.Option(0.0, help="0 is greedy; above 0 samples."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling."),
    chat_template: bool = typer.Option(True, help="Wrap the prompt in the model's chat template."),
    dtype: str = typer.Option("float32", help="The servers' dtype (float32, float16 or bfloat16); the client's "
                              "head runs in it too."),
    timeout: float = typer.Option(60.0, help="Seconds to wait for each server's reply before treating it as failed."),
    keys: Optional[str] = typer.Option(None, help="DIR/NAME of this client's key pair, for a private swarm."),
    known_servers: Optional[str] = typer.Option(None, help="File of `HOST:PORT PUBLIC_KEY_FILE` lines: the key "
                                                "each private server must show."),
):
    """Generate text through a chain of servers: text on stdout, route and timings on stderr.

    List spare servers too: one that fails mid-generation is replaced, and the output stays the same.
    Example: blockswarm generate --coordinator 127.0.0.1:5550 --max-new-tokens 24 "What is 2+2?"
    """
    _require((servers is None) != (coordinator is None),
             "give --servers HOST:PORT,... or --coordinator HOST:PORT (not both)")
    _require(wait >= 0, f"--wait must be >= 0 seconds, got {wait}")
    addresses = _addresses(servers) if servers else [coordinator]
    _require(max_new_tokens >= 1, f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    _require(temperature >= 0, f"--temperature must be >= 0 (0 is greedy), got {temperature}")
    _require(0 < top_p <= 1, f"--top-p must be in (0, 1] (1 keeps every token), got {top_p}")
    _require(dtype in DTYPE_NAMES, f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    _require(timeout > 0, f"--timeout must be a positive number of seconds, got {timeout}")
    client_keys = _client_keys(keys, known_servers)
    with _interruptible("interrupted; generation stopped"):
        result = _generate(prompt, addresses, model, max_new_tokens, temperature, top_p, seed, chat_template,
                           dtype, timeout, client_keys, coordinator=coordinator, wait=wait)
    sys.stdout.write("\n")
    _report(result)


def _client_keys(keys: Optional[str], known_servers: Optional[str]):
    """A private swarm's client keys, or None; both flags or neither."""
    _require((keys is None) == (known_servers is None),
             "a private swarm needs both --keys DIR/NAME (this client's key pair) and --known-servers FILE "
             "(each server's public key)")
    if keys is None:
        return None
    from blockswarm.core.errors import BlockswarmError
    from blockswarm.runtime.security import ClientKeys

    try:
        return ClientKeys.load(keys, known_servers)
    except BlockswarmError as exc:
        _fail(str(exc))


def _generate(prompt, addresses, model, max_new_tokens, temperature, top_p, seed, chat_template, dtype, timeout,
              keys=None, coordinator=None, wait=120.0):
    """Stream the text to stdout; a Ctrl-C ends the text's line before the caller says so on stderr."""
    from blockswarm.core.errors import BlockswarmError
    from blockswarm.model.sampling import SamplingParams
    from blockswarm.runtime.client import DistributedModel

    try:
        sampling = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
        if coordinator is not None:
            opened = DistributedModel.from_coordinator(
                coordinator, model=model, timeout_s=timeout, dtype=dtype, keys=keys, wait_s=wait,
                on_wait=lambda message: typer.echo(message, err=True))
        else:
            opened = DistributedModel.from_servers(addresses, model=model, timeout_s=timeout, dtype=dtype, keys=keys)
        with opened as model_:
            return model_.generate(prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                                   chat_template=chat_template,
                                   on_token=lambda _id, delta: (sys.stdout.write(delta), sys.stdout.flush()))
    except BlockswarmError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        sys.stdout.flush()
        raise


@app.command()
def info(
    servers: str = typer.Option(..., help="Comma-separated host:port of servers to ask."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Also write what they answered to this file."),
    timeout: float = typer.Option(5.0, help="Seconds to wait for each server."),
    keys: Optional[str] = typer.Option(None, help="DIR/NAME of this client's key pair, for a private swarm."),
    known_servers: Optional[str] = typer.Option(None, help="File of `HOST:PORT PUBLIC_KEY_FILE` lines."),
):
    """Ask servers what they hold and how loaded they are; exit code 1 if any does not answer."""
    addresses = _addresses(servers)
    client_keys = _client_keys(keys, known_servers)
    _require(timeout > 0, f"--timeout must be a positive number of seconds, got {timeout}")
    _check_writable(json_path, "--json")
    from blockswarm.core.errors import BlockswarmError
    from blockswarm.runtime.connection import client_context, fetch_info

    context = client_context()
    answers, down = {}, {}
    for address in addresses:
        try:
            answers[address] = fetch_info(context, address, timeout, client_keys)
        except BlockswarmError as exc:
            down[address] = str(exc)
    for address, i in answers.items():
        typer.echo(f"{address}  blocks {i.start}:{i.end} of {i.num_blocks}  {i.dtype}  "
                   f"decode {i.block_decode_s * 1e3:.3f} ms/block/token  "
                   f"cache {i.free_cache_tokens}/{i.cache_tokens} tokens free  sessions {i.sessions}  "
                   f"model {i.model}")
    for address, why in down.items():
        typer.echo(f"{address}  down: {why}")
    if json_path:
        _write_json(json_path, "--json", {"up": {a: i.to_wire() for a, i in answers.items()}, "down": down})
    if down:
        raise typer.Exit(1)


def _report(result) -> None:
    from blockswarm.runtime.report import timing_report

    typer.echo(timing_report(result), err=True)


keys_app = typer.Typer(help="Key pairs for private swarms (ZeroMQ CURVE).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
def keys_new(
    name: str = typer.Argument(..., help="Name of the pair, e.g. server1 or alice."),
    directory: str = typer.Option(".", "--dir", help="Directory to write NAME.key and NAME.key_secret into."),
):
    """Write a key pair: DIR/NAME.key (public: hand it out) and DIR/NAME.key_secret (mode 0600: keep it).

    Example: blockswarm keys new server1 --dir keys && blockswarm keys new alice --dir keys/clients"""
    from blockswarm.core.errors import BlockswarmError
    from blockswarm.runtime.security import write_keypair

    try:
        public, secret = write_keypair(directory, name)
    except BlockswarmError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write keys into {directory}: {exc.strerror}")
    typer.echo(f"public key: {public}\nsecret key: {secret} (mode 0600; never share it)")
