"""A connection to the coordinator, for servers and clients alike: one request at a time, with a deadline.

Torch-free. A request that gets no reply in time raises `Timeout` and the socket is replaced, so
a late reply can never be taken for the next request's. The coordinator may hold a route request
until its route has room (WS-RR); callers give such requests a longer deadline.
"""

from __future__ import annotations

import itertools
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from blockswarm.core.errors import BadPeer, BadRequest, Refused, Timeout
from blockswarm.runtime import cooperative
from blockswarm.runtime.messages import (
    MAX_HEADER_BYTES, REFUSED_EVENTS, decode_header, dial, encode_header, keep_alive, parse_address, raise_if_error,
)


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
        self.monitor = socket.get_monitor_socket(REFUSED_EVENTS)  # before connect: no event missed
        socket.connect(dial(self.context, self.host, self.port))
        return socket

    def call(self, op: str, timeout_s: float = 10.0, **fields) -> dict:
        """Send one request and return its reply (or raise the error the coordinator answered)."""
        rid = next(self._rids)
        self.socket.send(encode_header({"op": op, "rid": rid, **fields}))
        deadline = time.monotonic() + timeout_s
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        while True:
            left = deadline - time.monotonic()
            ready = dict(cooperative.poll(poller, int(left * 1000) + 1)) if left > 0 else {}
            if self.monitor in ready:
                event = recv_monitor_message(self.monitor)["event"]
                self._reset()
                raise Refused(self._refused(event))
            if self.socket not in ready:
                self._reset()
                raise Timeout(f"the coordinator at {self.address} did not answer {op!r} within {timeout_s:g} s; "
                              "is it running?")
            frames = self.socket.recv_multipart()
            try:
                header = decode_header(frames, MAX_REPLY_BYTES)
            except BadRequest as exc:
                raise BadPeer(f"{self.address} is not a blockswarm coordinator: {exc}") from None
            if header.get("rid") == rid:
                return raise_if_error(header)

    def _reset(self) -> None:
        self.close()
        self.socket = self._connect()

    def _refused(self, event: int) -> str:
        if self.keys is None:
            return (f"the coordinator at {self.address} refused the connection at the handshake: it is private; "
                    "connect with --keys DIR/NAME and --known-servers FILE (with its public key)")
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (f"the coordinator at {self.address} refused our key: it is not in its --allow directory; "
                    "ask its operator to add our public key file (NAME.key)")
        return (f"the handshake with the coordinator at {self.address} failed: it is not private, or its key is "
                "not the one --known-servers names for it")

    def close(self) -> None:
        self.monitor.close(linger=0)
        self.socket.close(linger=0)
