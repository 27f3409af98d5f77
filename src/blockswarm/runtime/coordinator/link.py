"""A connection to the coordinator, for servers and clients alike: one request at a time, with a deadline.

Torch-free. A request that gets no reply in time raises `Timeout` and the socket is replaced, so
a late reply can never be taken for the next request's. The coordinator may hold a route request
until its route has room (WS-RR); callers give such requests a longer deadline.
"""

from __future__ import annotations

import itertools
import time

import zmq

from blockswarm.core.errors import BadPeer, BadRequest, Timeout
from blockswarm.runtime.messages import MAX_HEADER_BYTES, decode_header, encode_header, keep_alive, raise_if_error


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise BadRequest(f"address {address!r} must look like host:port, e.g. 127.0.0.1:5555")
    return host, int(port)


MAX_REPLY_BYTES = 256 * MAX_HEADER_BYTES  # 16 MiB: `status` of a swarm of thousands of servers


class CoordinatorLink:
    def __init__(self, context: zmq.Context, address: str, keys=None):
        """`keys`: a private swarm's `security.ClientKeys`, which must name the coordinator's key."""
        self.context, self.address, self.keys = context, address, keys
        self.host, self.port = parse_address(address)
        self._rids = itertools.count(1)
        self.socket = self._connect()

    def _connect(self) -> zmq.Socket:
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_BYTES)
        keep_alive(socket)
        if self.keys is not None:
            from blockswarm.runtime.security import secure_client

            secure_client(socket, self.keys, self.address)
        socket.connect(f"tcp://{self.host}:{self.port}")
        return socket

    def call(self, op: str, timeout_s: float = 10.0, **fields) -> dict:
        """Send one request and return its reply (or raise the error the coordinator answered)."""
        rid = next(self._rids)
        self.socket.send(encode_header({"op": op, "rid": rid, **fields}))
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.socket.poll(int(left * 1000) + 1):
                self.socket.close(linger=0)
                self.socket = self._connect()
                raise Timeout(f"the coordinator at {self.address} did not answer {op!r} within {timeout_s:g} s; "
                              "is it running?")
            frames = self.socket.recv_multipart()
            try:
                header = decode_header(frames, MAX_REPLY_BYTES)
            except BadRequest as exc:
                raise BadPeer(f"{self.address} is not a blockswarm coordinator: {exc}") from None
            if header.get("rid") == rid:
                return raise_if_error(header)

    def close(self) -> None:
        self.socket.close(linger=0)
