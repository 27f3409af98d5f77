"""The `blockswarm` command. Thin: parse, call the library, print; user mistakes exit 2 with a message.

Heavy imports (torch, transformers, zmq) happen inside the commands that need them, so planning
and simulating start instantly. `swarm` holds the commands that run servers and clients,
`planning` those that plan and simulate, `coordination` the coordinator and `status`, `frontdoor` the HTTP API; all register
on the one `app`.
"""

from __future__ import annotations

import typer

from blockswarm.cli import coordination, demo, frontdoor, planning, swarm, testbed  # noqa: F401  (registers the commands)
from blockswarm.cli.common import app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("blockswarm")
    except PackageNotFoundError:  # running from a source tree that was never installed
        from blockswarm import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"blockswarm {_version()}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")):
    """Run a language model split by transformer blocks across many servers."""


def main() -> None:
    app()
