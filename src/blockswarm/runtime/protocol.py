"""The wire protocol shared by servers and clients: a msgpack header frame plus raw tensor frames.

A message is `[header, tensor_0, tensor_1, ...]`. The header is a msgpack map with `op` (what
to do), `rid` (request id, echoed in the reply) and the op's fields; `tensors` lists each
tensor frame's dtype and shape. Nothing is ever unpickled: tensors are rebuilt from raw bytes
with the declared dtype and shape after checking that the sizes agree, and every field from a
peer is checked for type and range before use (`integer`, `text`, `ServerInfo.from_wire`).

Ops and their fields:
- `info` → `ServerInfo` fields.
- `open` {start, max_length} → {session, reserved, data_port}: reserve KV cache for a session
  whose route enters this server at block `start` and computes to the end of its span, for at
  most max_length tokens. `session` is the token the server minted for it: every later step and
  close must carry it. (`end`, if sent, must be the span's end.)
- `step` {session, step} + one tensor (1, n, hidden) → {step, compute_s} + one tensor. Steps
  are numbered 1, 2, 3, ... per session; they go to the server's data port (its compute
  thread), everything else to the control port.
- `close` {session} → {}.
Replies carry `ok: true`, or `ok: false` with `code`, `message` and `retriable`, and
`server_s`: the time from receiving the request to encoding the reply.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import msgpack
import numpy as np
import torch
import zmq

from blockswarm.core.errors import BadRequest, BlockswarmError, error_from_code

PROTOCOL_VERSION = 2  # 2: server-minted session tokens, numbered steps
MAX_HEADER_BYTES = 64 * 1024
MAX_DIM = 2**31  # any larger tensor dimension is nonsense here
MAX_TEXT = 256  # model fingerprints, dtypes, tokens
MAX_INT = 2**53
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
OPS = ("info", "open", "step", "close")
HEARTBEAT_S = 2.0  # liveness: ZMTP pings this often on every socket...
HEARTBEAT_MISSES = 3  # ...and a peer that leaves this many unanswered is gone


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

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, header: dict) -> "ServerInfo":
        """Check every field a peer reported: a server is not trusted to describe itself sanely."""
        names = {f.name for f in fields(cls)}
        missing = names - header.keys()
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
        )
        if values["dtype"] not in DTYPES:
            raise BadRequest(f"info: dtype must be one of {sorted(DTYPES)}, got {values['dtype']!r:.40}")
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


# numpy has no bfloat16: those travel as their raw 16-bit patterns
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


def encode(header: dict, tensors: tuple[torch.Tensor, ...] = ()) -> list:
    """Frames for send_multipart: the header, then each tensor as a buffer (numpy, no extra copy).

    As few torch calls as possible: right after a server or client wakes from a long wait every
    call is slow (~10-50 µs each on a VM), and this runs on every hop of every token."""
    meta = []
    frames = []
    for tensor in tensors:
        if tensor.dtype not in DTYPE_NAMES:
            raise BadRequest(f"cannot send dtype {tensor.dtype}; use one of {sorted(DTYPES)}")
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            tensor = tensor.detach().contiguous().cpu()
        meta.append({"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape)})
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.uint16)
        frames.append(tensor.detach().numpy())
    return [msgpack.packb({**header, "tensors": meta}, use_bin_type=True), *frames]


def decode(frames: list[bytes]) -> tuple[dict, list[torch.Tensor]]:
    """Parse and validate a message; raises BadRequest with a precise reason, never anything else."""
    if not frames:
        raise BadRequest("empty message")
    raw = frames[0]
    if len(raw) > MAX_HEADER_BYTES:
        raise BadRequest(f"header of {len(raw)} bytes is larger than {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises many types for garbage
        raise BadRequest(f"header is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise BadRequest("header must be a msgpack map")
    meta = header.get("tensors", [])
    if not isinstance(meta, list) or len(meta) != len(frames) - 1:
        raise BadRequest(f"header declares {len(meta) if isinstance(meta, list) else '?'} tensors "
                         f"but {len(frames) - 1} tensor frames arrived")
    return header, [_tensor_from_frame(m, frame) for m, frame in zip(meta, frames[1:])]


def _tensor_from_frame(meta, frame: bytes) -> torch.Tensor:
    if not isinstance(meta, dict) or not isinstance(meta.get("dtype"), str) or meta["dtype"] not in DTYPES:
        raise BadRequest(f"tensor dtype must be one of {sorted(DTYPES)}")
    shape = meta.get("shape")
    if not isinstance(shape, list) or not 0 < len(shape) <= 8 \
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_DIM for d in shape):
        raise BadRequest(f"tensor shape must be a list of 1..8 positive integers, got {shape!r:.80}")
    dtype = DTYPES[meta["dtype"]]
    count = 1
    for dim in shape:
        count *= dim
    element = np.dtype(_NUMPY[dtype])
    expected = count * element.itemsize
    size = memoryview(frame).nbytes
    if size != expected:
        raise BadRequest(f"tensor frame has {size} bytes; shape {shape} of {meta['dtype']} needs {expected}")
    # copy: the tensor must own writable memory, never alias the message buffer
    array = np.frombuffer(frame, dtype=element).reshape(shape).copy()
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def ok(rid, **fields_) -> dict:
    return {"ok": True, "rid": rid, **fields_}


def error_reply(rid, error: BlockswarmError) -> dict:
    return {"ok": False, "rid": rid, "code": error.code, "message": str(error), "retriable": error.retriable}


def raise_if_error(header: dict) -> dict:
    """On the client: turn an error reply back into the exception the server raised."""
    if not header.get("ok"):
        raise error_from_code(str(header.get("code")), str(header.get("message")))
    return header
