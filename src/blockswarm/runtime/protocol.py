"""The wire protocol shared by servers and clients: a msgpack header frame plus raw tensor frames.

A message is `[header, tensor_0, tensor_1, ...]`. The header is a msgpack map with `op` (what
to do), `rid` (request id, echoed in the reply) and the op's fields; `tensors` lists each
tensor frame's dtype and shape. Nothing is ever unpickled: tensors are rebuilt from raw bytes
with the declared dtype and shape after checking that the sizes agree.

Ops and their fields:
- `info` → `ServerInfo` fields.
- `open` {session, start, end, max_length} → {reserved, data_port}: reserve KV cache for a
  session that will compute blocks [start, end) for at most max_length tokens.
- `step` {session, step} + one tensor (1, n, hidden) → {step, compute_s} + one tensor. Steps
  go to the server's data port (its compute thread), everything else to the control port.
- `close` {session} → {}.
Replies carry `ok: true`, or `ok: false` with `code`, `message` and `retriable`, and
`server_s`: the time from receiving the request to encoding the reply.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import msgpack
import numpy as np
import torch
import zmq

from blockswarm.core.errors import BadRequest, BlockswarmError, error_from_code

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
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
        names = {f.name for f in fields(cls)}
        missing = names - header.keys()
        if missing:
            raise BadRequest(f"info reply lacks {sorted(missing)}; is the server a blockswarm server?")
        return cls(**{k: header[k] for k in names})


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
    if not isinstance(meta, dict) or meta.get("dtype") not in DTYPES:
        raise BadRequest(f"tensor dtype must be one of {sorted(DTYPES)}, got {meta!r:.80}")
    shape = meta.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) or len(shape) > 8:
        raise BadRequest(f"tensor shape must be a list of non-negative ints, got {shape!r:.80}")
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
