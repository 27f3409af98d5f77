"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the right status.

Clients built for OpenAI (its SDK raises `BadRequestError`, `NotFoundError`, `RateLimitError`, ...
by status) and people reading the body both get what they expect.
"""

from __future__ import annotations

from blockswarm.core.errors import (
    BadRequest, BlockswarmError, CacheFull, ConfigError, Infeasible, LengthExceeded, Refused, TooLarge,
)

RETRY_FULL_S = 2  # Retry-After when the swarm is full: sessions of a few seconds end by then
RETRY_MISSING_S = 10  # Retry-After when blocks are missing: a repair or a newcomer takes about this long


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after_s: int | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.retry_after_s, self.extra = retry_after_s, extra

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code,
                          **self.extra}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}


def bad_field(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def from_swarm(exc: BlockswarmError, missing: str | None = None) -> APIError:
    """What a swarm failure means to an HTTP client."""
    if isinstance(exc, CacheFull):
        return APIError(429, f"the swarm is full right now: {exc}", "rate_limit_error", code="swarm_full",
                        retry_after_s=RETRY_FULL_S)
    if isinstance(exc, Infeasible) or missing is not None and exc.retriable:  # (a server just lost left a gap)
        return APIError(503, f"the swarm cannot serve the model now: {exc}", "service_unavailable",
                        code="swarm_incomplete", retry_after_s=RETRY_MISSING_S, missing_blocks=missing)
    if isinstance(exc, (TooLarge, LengthExceeded)):
        return APIError(400, f"the request does not fit the swarm: {exc}", code="too_large")
    if isinstance(exc, (BadRequest, ConfigError)):
        return APIError(400, str(exc))
    if isinstance(exc, Refused):
        return APIError(502, f"the swarm refused this API: {exc}", "server_error", code="refused")
    # a server failed and no repair was possible (timeouts, peers gone): the swarm may recover
    return APIError(503, f"the swarm failed this request: {exc}", "service_unavailable", code="swarm_error",
                    retry_after_s=RETRY_FULL_S)
