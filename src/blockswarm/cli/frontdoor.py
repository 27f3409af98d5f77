"""`blockswarm api`: the OpenAI-compatible API and the swarm page, in front of a swarm."""

from __future__ import annotations

from typing import Optional

import typer

from blockswarm.cli.common import DTYPE_NAMES, _addresses, _fail, _interruptible, _require, app


@app.command()
def api(
    servers: Optional[str] = typer.Option(None, help="Comma-separated host:port of servers (without a coordinator)."),
    coordinator: Optional[str] = typer.Option(None, help="host:port of the swarm's coordinator: each request "
                                              "gets its own route."),
    model: str = typer.Option("smollm2", help="The model the servers hold; its name (or folder name) is the "
                              "model id clients ask for."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on. Beyond loopback it needs --api-keys "
                             "(or --insecure)."),
    port: int = typer.Option(8000, help="Port to listen on (0 picks a free one, printed in the READY line)."),
    api_keys: Optional[str] = typer.Option(None, help="File of API keys, one per line: clients must send "
                                           "`Authorization: Bearer KEY`."),
    insecure: bool = typer.Option(False, help="Serve beyond loopback without API keys (anyone who reaches it "
                                  "may use the swarm)."),
    concurrency: int = typer.Option(16, help="Generations running at once (each choice of a request is one); "
                                    "more requests wait in the queue."),
    queue: int = typer.Option(64, help="Requests that may wait for a free generation; beyond it, 429 with "
                              "Retry-After."),
    full_wait: float = typer.Option(30.0, help="Seconds a request waits out a full swarm (cache_full) before "
                                    "a 429."),
    max_request_bytes: int = typer.Option(1 << 20, help="Largest request body accepted (413 beyond)."),
    default_max_tokens: int = typer.Option(256, help="New tokens when a request sets no max_tokens (less if "
                                           "the model's context leaves less room)."),
    wait: float = typer.Option(120.0, help="With --coordinator: seconds to wait at start until the swarm covers "
                               "the model."),
    dtype: str = typer.Option("float32", help="The servers' dtype (float32, float16 or bfloat16)."),
    timeout: float = typer.Option(60.0, help="Seconds to wait for each server's reply before treating it as failed."),
    keys: Optional[str] = typer.Option(None, help="DIR/NAME of this API's key pair, for a private swarm."),
    known_servers: Optional[str] = typer.Option(None, help="File of `HOST:PORT PUBLIC_KEY_FILE` lines: the key "
                                                "each private server (or the coordinator) must show."),
):
    """Serve an OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions, streaming
    or not) and the live swarm page (/, data at /api/swarm) in front of a swarm.

    Example: blockswarm api --coordinator 127.0.0.1:5550 --port 8000, then point any OpenAI client
    at http://127.0.0.1:8000/v1 (model "smollm2") and open http://127.0.0.1:8000/ in a browser.
    """
    from blockswarm.cli.swarm import _client_keys

    _require((servers is None) != (coordinator is None),
             "give --servers HOST:PORT,... or --coordinator HOST:PORT (not both)")
    _require(0 <= port <= 65535, f"--port must be 0..65535, got {port}")
    _require(dtype in DTYPE_NAMES, f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    _require(timeout > 0 and wait >= 0 and full_wait >= 0, "--timeout must be > 0, --wait and --full-wait >= 0")
    client_keys = _client_keys(keys, known_servers)
    from blockswarm.api.serving import APIConfig, APIServer, read_api_keys
    from blockswarm.core.errors import BlockswarmError

    try:
        config = APIConfig(servers=_addresses(servers) if servers else None, coordinator=coordinator, model=model,
                           host=host, port=port, keys=client_keys,
                           api_keys=read_api_keys(api_keys) if api_keys else None, insecure=insecure,
                           slots=concurrency, queue=queue, full_wait_s=full_wait, timeout_s=timeout, wait_s=wait,
                           dtype=dtype, max_request_bytes=max_request_bytes, default_max_tokens=default_max_tokens)
        with _interruptible("stopped"):
            server = APIServer(config, on_wait=lambda message: typer.echo(message, err=True))
            announce(server)
            server.serve_forever()
    except BlockswarmError as exc:
        _fail(str(exc))


def announce(server) -> None:
    """Where to point clients and browsers; the READY line is for scripts (as servers print theirs)."""
    url = server.url
    typer.echo(f"OpenAI-compatible API for model {server.engine.name!r}: {url}/v1   swarm page: {url}/"
               + ("   (API keys required)" if server.config.api_keys else ""), err=True)
    typer.echo(f"READY {url.removeprefix('http://')}", )
