"""A client's synchronous connection to one server: request, wait with a deadline, check the reply.

Each connection owns its DEALER sockets (control, and data once a session is open), so a
connection belongs to one thread; sessions that run concurrently each open their own
connections from one shared zmq.Context.
"""

from __future__ import annotations

import itertools
import time

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
    """Control requests go to the server's control port; steps to its data port, which the
    `open` reply names. While a decode step is expected back, the connection spins for a
    moment instead of sleeping: waking a sleeping thread costs ~0.2-0.5 ms on a VM."""

    def __init__(self, context: zmq.Context, address: str, timeout_s: float = 60.0, spin_s: float = 0.002):
        self.host, port = parse_address(address)
        self.address = address
        self.timeout_s = timeout_s
        self.spin_s = spin_s
        self._context = context
        self._control = self._connect(port)
        self._data = None
        self._rids = itertools.count(1)
        self._expected_step_s: float | None = None  # last decode step's round trip

    def _connect(self, port: int):
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(f"tcp://{self.host}:{port}")
        return socket

    def request(self, op: str, tensors: tuple[torch.Tensor, ...] = (), timeout_s: float | None = None,
                **fields) -> tuple[dict, list[torch.Tensor]]:
        socket = self._control
        if op == "step":
            if self._data is None:
                raise BadRequest(f"open a session on {self.address} before stepping")
            socket = self._data
        rid = next(self._rids)
        timeout_s = timeout_s or self.timeout_s
        begin = time.perf_counter()
        socket.send_multipart(encode({"op": op, "rid": rid, **fields}, tensors), copy=False)
        decode_step = op == "step" and tensors and tensors[0].shape[1] == 1
        expected = self._expected_step_s if decode_step else None
        while True:
            if not self._wait(socket, begin + timeout_s, expected):
                raise Timeout(f"{self.address} did not answer {op!r} within {timeout_s:.0f} s")
            header, out = decode(socket.recv_multipart())
            if header.get("rid") in (rid, None):  # replies to earlier timed-out requests are dropped
                break
        if decode_step:
            self._expected_step_s = time.perf_counter() - begin
        if op == "open" and header.get("ok") and isinstance(header.get("data_port"), int) and self._data is None:
            self._data = self._connect(header["data_port"])
        return raise_if_error(header), out

    def _wait(self, socket, deadline: float, expected_s: float | None) -> bool:
        """Sleep until shortly before the reply is due, spin for at most 2·spin_s, then sleep again."""
        if expected_s is not None and self.spin_s > 0:
            nap_ms = int((expected_s - self.spin_s) * 1000)
            if nap_ms > 0 and socket.poll(nap_ms):
                return True
            spin_until = min(time.perf_counter() + 2 * self.spin_s, deadline)
            while time.perf_counter() < spin_until:
                if socket.poll(0):
                    return True
        return bool(socket.poll(max(0, int((deadline - time.perf_counter()) * 1000))))

    def info(self, timeout_s: float | None = None) -> ServerInfo:
        header, _ = self.request("info", timeout_s=timeout_s)
        return ServerInfo.from_wire(header)

    def close(self) -> None:
        self._control.close(linger=0)
        if self._data is not None:
            self._data.close(linger=0)


def fetch_info(context: zmq.Context, address: str, timeout_s: float = 10.0) -> ServerInfo:
    connection = Connection(context, address, timeout_s)
    try:
        return connection.info()
    except Timeout as exc:
        raise PeerGone(f"no blockswarm server answers at {address} ({exc})") from None
    finally:
        connection.close()
