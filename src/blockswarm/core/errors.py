"""One exception hierarchy for the whole project.

Two kinds of failure, never mixed: `Retriable` errors (a full cache, a timeout, a peer that went
away) travel back to callers as data and are the only ones anybody retries; every other
`BlockswarmError` is a mistake in the input and says what to fix. Bugs are plain exceptions.
Each class has a stable `code` used on the wire.
"""


class BlockswarmError(Exception):
    """A user-facing error whose message says what to do."""

    code = "error"
    retriable = False


class BadRequest(BlockswarmError):
    """A request that can never succeed as sent (wrong shape, dtype, span, ...)."""

    code = "bad_request"


class UnknownSession(BlockswarmError):
    code = "unknown_session"


class LengthExceeded(BlockswarmError):
    """A step would go past the number of tokens reserved when the session was opened."""

    code = "length_exceeded"


class TooLarge(BlockswarmError):
    """A request that needs more cache than the server has in total; it can never fit."""

    code = "too_large"


class ConfigError(BlockswarmError):
    """A bad scenario, model path or command-line value."""

    code = "config_error"


class Infeasible(BlockswarmError):
    """The swarm cannot serve the model as asked (too little memory, a gap in coverage, ...)."""

    code = "infeasible"


class Retriable(BlockswarmError):
    retriable = True
    code = "retriable"


class CacheFull(Retriable):
    """The server's KV cache has no room now; try later or elsewhere."""

    code = "cache_full"


class Timeout(Retriable):
    code = "timeout"


class PeerGone(Retriable):
    code = "peer_gone"


ERRORS_BY_CODE: dict[str, type[BlockswarmError]] = {
    cls.code: cls
    for cls in (
        BlockswarmError, BadRequest, UnknownSession, LengthExceeded, TooLarge, ConfigError,
        Infeasible, Retriable, CacheFull, Timeout, PeerGone,
    )
}


def error_from_code(code: str, message: str) -> BlockswarmError:
    """Rebuild the exception a peer reported (unknown codes become a plain BlockswarmError)."""
    return ERRORS_BY_CODE.get(code, BlockswarmError)(message)
