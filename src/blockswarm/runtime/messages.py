"""The messages of the wire protocol, without tensors: framing constants, field checkers, replies.

Torch-free, so that the coordinator (which never sees a tensor) starts without torch; the tensor
codec is `protocol.py`, which re-exports everything here. A message is `[header, tensor_0, ...]`;
the header is a msgpack map with `op`, `rid` and the op's fields (ops are listed in `protocol.py`
for servers and in `coordinator/service.py` for the coordinator).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields

import msgpack
import zmq

from blockswarm.core.errors import BadRequest, BlockswarmError, error_from_code

PROTOCOL_VERSION = 2  # 2: server-minted session tokens, numbered steps
MAX_HEADER_BYTES = 64 * 1024
MAX_DIM = 2**31  # any larger tensor dimension is nonsense here
MAX_TEXT = 256  # model fingerprints, dtypes, tokens
MAX_INT = 2**53
DTYPE_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}  # the dtypes a step may carry
HEARTBEAT_S = 2.0  # liveness: ZMTP pings this often on every socket...
HEARTBEAT_MISSES = 3  # ...and a peer that leaves this many unanswered is gone


# a peer that refused us at the handshake (a private swarm without our key, or keys missing)
REFUSED_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise BadRequest(f"address {address!r} must look like host:port, e.g. 127.0.0.1:5555")
    return host, int(port)


class SourcedContext(zmq.Context):
    """A ZeroMQ context whose outgoing connections leave from one local address (`source`), as
    `tcp://SRC:0;HOST:PORT` asks: a process standing for an emulated host (the testbed) is then
    seen by everyone it connects to as that host. `source` None: the system chooses."""

    source: str | None = None  # (declared on the class: pyzmq takes other attributes for options)


def dial(context: zmq.Context, host: str, port: int) -> str:
    """The endpoint to connect a socket of `context` to host:port (from its source address, if any)."""
    source = getattr(context, "source", None)
    return f"tcp://{source}:0;{host}:{port}" if source else f"tcp://{host}:{port}"


def model_name(model: str) -> str:
    """The name a swarm knows a model by: `smollm2`, or a local model's folder name."""
    return os.path.basename(os.path.normpath(model)) if os.sep in model else model


def keep_alive(socket: zmq.Socket, interval_s: float = HEARTBEAT_S) -> None:
    """Turn on ZeroMQ's heartbeats: the connection drops when the peer stops answering pings."""
    interval_ms = max(1, int(interval_s * 1000))
    socket.setsockopt(zmq.HEARTBEAT_IVL, interval_ms)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_MISSES * interval_ms)


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What a server tells anyone who asks: its span and its measured speed."""

    version: int
    model: str  # fingerprint of the checkpoint's architecture
    num_blocks: int
    start: int
    end: int
    hidden_size: int
    dtype: str
    cache_tokens: int  # capacity in token-blocks divided by the span length
    free_cache_tokens: int
    sessions: int
    block_decode_s: float  # seconds per token per block, measured at start
    block_prefill_s_per_token: float  # slope of prefill time per block (affine in prompt length)
    block_prefill_base_s: float  # intercept of prefill time per block
    data_port: int  # where steps go (same host); the control port takes info/open/close
    device: str = "unknown"  # e.g. cpu or cuda:0 (optional on the wire: shown, never relied on)

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, header: dict) -> "ServerInfo":
        """Check every field a peer reported: a server is not trusted to describe itself sanely."""
        names = {f.name for f in fields(cls)}
        missing = names - header.keys() - {"device"}
        if missing:
            raise BadRequest(f"info reply lacks {sorted(missing)}; is the server a blockswarm server?")
        version = integer(header, "version", 0)
        if version != PROTOCOL_VERSION:
            raise BadRequest(f"the server speaks blockswarm protocol {version}, this client {PROTOCOL_VERSION}; "
                             "run the same blockswarm version on both")
        num_blocks = integer(header, "num_blocks", 1, 100_000)
        start = integer(header, "start", 0, num_blocks - 1)
        values = dict(
            version=version, model=text(header, "model"), num_blocks=num_blocks, start=start,
            end=integer(header, "end", start + 1, num_blocks), hidden_size=integer(header, "hidden_size", 1, MAX_DIM),
            dtype=text(header, "dtype"), cache_tokens=integer(header, "cache_tokens", 0),
            free_cache_tokens=integer(header, "free_cache_tokens", 0), sessions=integer(header, "sessions", 0),
            block_decode_s=duration(header, "block_decode_s", positive=True),
            block_prefill_s_per_token=duration(header, "block_prefill_s_per_token"),
            block_prefill_base_s=duration(header, "block_prefill_base_s"),
            data_port=integer(header, "data_port", 1, 65535),
            device=text(header, "device") if "device" in header else "unknown",
        )
        if values["dtype"] not in DTYPE_ITEMSIZE:
            raise BadRequest(f"info: dtype must be one of {sorted(DTYPE_ITEMSIZE)}, got {values['dtype']!r:.40}")
        if values["free_cache_tokens"] > values["cache_tokens"]:
            raise BadRequest("info: free_cache_tokens is more than cache_tokens")
        return cls(**values)


def integer(header: dict, name: str, low: int = 0, high: int = MAX_INT) -> int:
    """A field that must be an integer in [low, high] (booleans are not integers here)."""
    value = header.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"{name} must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}, got {value}")
    return value


def text(header: dict, name: str, max_length: int = MAX_TEXT) -> str:
    value = header.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= max_length:
        raise BadRequest(f"{name} must be a string of 1..{max_length} characters")
    return value


def duration(header: dict, name: str, positive: bool = False) -> float:
    """Seconds: a finite, non-negative number below a day (and above zero if `positive`)."""
    value = header.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or not 0 <= value < 86400 or (positive and value == 0):
        raise BadRequest(f"{name} must be a {'positive' if positive else 'non-negative'} number of seconds, "
                         f"got {value!r:.40}")
    return float(value)




def number(header: dict, name: str, low: float, high: float) -> float:
    """A finite number in (low, high]."""
    value = header.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or not low < value <= high:
        raise BadRequest(f"{name} must be a number in ({low:g}, {high:g}], got {value!r:.40}")
    return float(value)


def encode_header(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def decode_header(frames: list, max_bytes: int = MAX_HEADER_BYTES) -> dict:
    """Parse and validate a message's header; BadRequest with a reason, never anything else.
    (`max_bytes`: a coordinator's `status` of a big swarm is larger than any request.)"""
    if not frames:
        raise BadRequest("empty message")
    raw = frames[0]
    size = memoryview(raw).nbytes
    if size > max_bytes:
        raise BadRequest(f"header of {size} bytes is larger than {max_bytes}")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types for garbage
        raise BadRequest(f"header is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise BadRequest("header must be a msgpack map")
    return header


def ok(rid, **fields_) -> dict:
    return {"ok": True, "rid": rid, **fields_}


def error_reply(rid, error: BlockswarmError) -> dict:
    return {"ok": False, "rid": rid, "code": error.code, "message": str(error), "retriable": error.retriable}


def raise_if_error(header: dict) -> dict:
    """On the client: turn an error reply back into the exception the server raised."""
    if not header.get("ok"):
        raise error_from_code(str(header.get("code")), str(header.get("message")))
    return header
