"""The wire protocol shared by servers and clients: a msgpack header frame plus raw tensor frames.

This module is the tensor codec (it needs torch); the messages themselves, their field checkers
and replies are in `messages.py` (torch-free, for the coordinator) and re-exported here.

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
  thread), everything else to the control port. A server emulating another device reports
  that device's time as `compute_s` and its own compute as `host_s`.
- `close` {session} → {}.
Replies carry `ok: true`, or `ok: false` with `code`, `message` and `retriable`, and
`server_s`: the time from receiving the request to encoding the reply.
"""

from __future__ import annotations

import msgpack
import numpy as np
import torch

from blockswarm.core.errors import BadRequest
from blockswarm.runtime.messages import (  # noqa: F401  (re-exported: one import for server and client)
    DTYPE_ITEMSIZE, HEARTBEAT_MISSES, HEARTBEAT_S, MAX_DIM, MAX_HEADER_BYTES, MAX_INT, MAX_TEXT, PROTOCOL_VERSION,
    ServerInfo, decode_header, duration, error_reply, integer, keep_alive, ok, raise_if_error, text,
)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
OPS = ("info", "open", "step", "close")


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
    header = decode_header(frames)
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
