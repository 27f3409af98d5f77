"""What every command shares: the app, and the checks that turn user mistakes into one `error:` line.

A user mistake exits 2 with one line that says what to do, found before any long work starts
(`_require`, `_check_writable`); Ctrl-C ends a command with one line and exit code 130.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run a language model split by transformer blocks across many servers.")

DEFAULT_PROMPT = "What is the capital of France?"
# The names only, so that a mistyped --dtype is refused before torch loads; the runtime checks again.
DTYPE_NAMES = ("float32", "float16", "bfloat16")


def _fail(message: str, code: int = 2):
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _require(ok: bool, message: str) -> None:
    """A user mistake found before any work: one `error:` line, exit code 2."""
    if not ok:
        _fail(message)


@contextlib.contextmanager
def _interruptible(message: str):
    """Ctrl-C ends a long command with one line and exit code 130 (128 + SIGINT), not a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        typer.echo(message, err=True)
        raise typer.Exit(130) from None


def _check_writable(path: Optional[str], option: str) -> None:
    """Refuse an output path that cannot be written before the work, not after minutes of it."""
    if path is None:
        return
    target = Path(path)
    folder = target.parent
    _require(not target.is_dir(), f"{option} {path} is a directory; give a file name, e.g. {target / 'out'}")
    _require(folder.is_dir(), f"{option} {path}: the directory {folder} does not exist; create it or "
                              "choose another path")
    writable = os.access(folder, os.W_OK) and (not target.exists() or os.access(target, os.W_OK))
    _require(writable, f"{option} {path}: no permission to write there; choose another path")


@contextlib.contextmanager
def _writing(path: str, option: str):
    """What still goes wrong while writing (a full disk) is one error line too."""
    try:
        yield
    except OSError as exc:
        _fail(f"could not write {option} {path}: {exc.strerror or exc}; choose another path")


def _write_json(path: str, option: str, data) -> None:
    import json

    with _writing(path, option), open(path, "w") as handle:
        json.dump(data, handle, indent=2)


def _addresses(servers: str) -> list[str]:
    addresses = [s.strip() for s in servers.split(",") if s.strip()]
    _require(bool(addresses), f"--servers needs at least one host:port, e.g. --servers 127.0.0.1:5551; got {servers!r}")
    return addresses


def _parse_span(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        _fail(f"--blocks must look like START:END (end exclusive), e.g. 0:10; got {text!r}")
    _require(0 <= start < end, f"--blocks {text}: need 0 <= START < END (END exclusive), e.g. 0:10")
    return start, end


def _check_span_in_model(model: str, start: int, end: int) -> None:
    """--blocks past the model's last block, said before any weight is read."""
    from blockswarm.model.checkpoint import load_config, resolve_model
    from blockswarm.model.families import num_blocks

    total = num_blocks(load_config(resolve_model(model)))
    _require(end <= total, f"--blocks {start}:{end}: the model has {total} blocks; choose START:END within 0:{total}")
