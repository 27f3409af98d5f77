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


class ServerError(Retriable):
    """A server failed while computing a step and dropped the session; it can be opened again."""

    code = "server_error"


class BadPeer(Retriable):
    """A server answered with something no honest server sends (a malformed reply, a wrong shape,
    NaN or Inf, an internal error); the client moves its blocks elsewhere, as for a failed server."""

    code = "bad_peer"


class Refused(BlockswarmError):
    """A peer refused us at the handshake (a private swarm without our key, or keys missing)."""

    code = "refused"


ERRORS_BY_CODE: dict[str, type[BlockswarmError]] = {
    cls.code: cls
    for cls in (
        BlockswarmError, BadRequest, UnknownSession, LengthExceeded, TooLarge, ConfigError,
        Infeasible, Retriable, CacheFull, Timeout, PeerGone, ServerError, BadPeer, Refused,
    )
}


def error_from_code(code: str, message: str) -> BlockswarmError:
    """Rebuild the exception a peer reported (unknown codes become a plain BlockswarmError)."""
    return ERRORS_BY_CODE.get(code, BlockswarmError)(message)
