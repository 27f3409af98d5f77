"""A client's synchronous connection to one server: request, wait with a deadline, check the reply.

Each connection owns one DEALER socket, so a connection belongs to one thread; sessions that run
concurrently each open their own connections from one shared zmq.Context.
"""

from __future__ import annotations

import itertools

import torch
import zmq

from blockswarm.core.errors import BadRequest, PeerGone, Timeout
from blockswarm.runtime.protocol import ServerInfo, decode, encode, raise_if_error


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise BadRequest(f"server address {address!r} must look like host:port, e.g. 127.0.0.1:5555")
    return host, int(port)


class Connection:
    def __init__(self, context: zmq.Context, address: str, timeout_s: float = 60.0):
        host, port = parse_address(address)
        self.address = address
        self.timeout_s = timeout_s
        self._socket = context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(f"tcp://{host}:{port}")
        self._rids = itertools.count(1)

    def request(self, op: str, tensors: tuple[torch.Tensor, ...] = (), timeout_s: float | None = None,
                **fields) -> tuple[dict, list[torch.Tensor]]:
        rid = next(self._rids)
        self._socket.send_multipart(encode({"op": op, "rid": rid, **fields}, tensors), copy=False)
        deadline_ms = int(1000 * (timeout_s or self.timeout_s))
        while True:
            if not self._socket.poll(deadline_ms):
                raise Timeout(f"{self.address} did not answer {op!r} within {timeout_s or self.timeout_s:.0f} s")
            header, out = decode(self._socket.recv_multipart())
            if header.get("rid") in (rid, None):  # replies to earlier timed-out requests are dropped
                return raise_if_error(header), out

    def info(self, timeout_s: float | None = None) -> ServerInfo:
        header, _ = self.request("info", timeout_s=timeout_s)
        return ServerInfo.from_wire(header)

    def close(self) -> None:
        self._socket.close(linger=0)


def fetch_info(context: zmq.Context, address: str, timeout_s: float = 10.0) -> ServerInfo:
    connection = Connection(context, address, timeout_s)
    try:
        return connection.info()
    except Timeout as exc:
        raise PeerGone(f"no blockswarm server answers at {address} ({exc})") from None
    finally:
        connection.close()
