"""A client's synchronous connection to one server: request, wait with a deadline, check the reply.

Each connection owns its DEALER sockets (control, and data once a session is open), so a
connection belongs to one thread; sessions that run concurrently each open their own
connections from one shared zmq.Context. A server that dies or stops answering is noticed while
a reply is awaited, from ZeroMQ's own liveness signals: a dropped TCP connection, failed
reconnects, or heartbeats (ZMTP PINGs, answered by the server's I/O thread even mid-compute)
left unanswered. The request then fails with a retriable `PeerGone` at once, not at its deadline.
"""

from __future__ import annotations

import itertools
import time

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from blockswarm.core.errors import BadRequest, BlockswarmError, PeerGone, Timeout
from blockswarm.runtime.protocol import (
    HEARTBEAT_MISSES, HEARTBEAT_S, ServerInfo, decode, encode, keep_alive, raise_if_error,
)


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit():
        raise BadRequest(f"server address {address!r} must look like host:port, e.g. 127.0.0.1:5555")
    return host, int(port)


# what tells a waiting client that its server is gone: the connection dropped (closed by the
# peer, or heartbeats unanswered), or reconnecting to it failed
LOST_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED


def client_context() -> zmq.Context:
    """A ZeroMQ context for one client. Every hop of every session holds four sockets (control
    and data DEALERs, each with a monitor), so many concurrent sessions pass ZeroMQ's default
    cap of 1023 sockets per context; this one allows as many as the platform does."""
    context = zmq.Context()
    context.set(zmq.MAX_SOCKETS, context.get(zmq.SOCKET_LIMIT))
    return context


class _Link:
    """One DEALER socket with heartbeats, and the monitor that reports its connection's losses."""

    def __init__(self, context: zmq.Context, endpoint: str, heartbeat_s: float):
        try:
            self.socket = context.socket(zmq.DEALER)
        except zmq.ZMQError as exc:
            raise _out_of_sockets(exc) from None
        self.socket.setsockopt(zmq.LINGER, 0)
        keep_alive(self.socket, heartbeat_s)
        try:
            self.monitor = self.socket.get_monitor_socket(LOST_EVENTS)  # before connect: no event missed
        except zmq.ZMQError as exc:
            self.socket.close(linger=0)
            raise _out_of_sockets(exc) from None
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.socket.connect(endpoint)

    def forget_losses(self) -> None:
        """Drop loss events from before a request: a server that came back answers for itself."""
        while self.monitor.get(zmq.EVENTS) & zmq.POLLIN:  # no poller: this runs before every request
            self.monitor.recv_multipart()

    def ready(self, timeout_ms: int) -> bool:
        """True when a reply waits; False on timeout; raises _Lost when the connection is gone."""
        events = dict(self.poller.poll(timeout_ms))
        if self.monitor in events:
            raise _Lost(recv_monitor_message(self.monitor)["event"])
        return self.socket in events

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.socket.close(linger=0)


def _out_of_sockets(exc: zmq.ZMQError) -> BlockswarmError:
    return BlockswarmError(f"cannot open another connection ({exc}): every hop of every open session holds "
                           "a few sockets and file descriptors; close sessions or raise `ulimit -n`")


class _Lost(Exception):
    def __init__(self, event: int):
        super().__init__(event)
        self.event = event


class Connection:
    """Control requests go to the server's control port; steps to its data port, which the
    `open` reply names. While a decode step is expected back, the connection spins for a
    moment instead of sleeping: waking a sleeping thread costs ~0.2-0.5 ms on a VM.
    `heartbeat_s`: how often ZeroMQ pings the server; HEARTBEAT_MISSES unanswered pings mean it is gone."""

    def __init__(self, context: zmq.Context, address: str, timeout_s: float = 60.0, spin_s: float = 0.002,
                 heartbeat_s: float = HEARTBEAT_S):
        self.host, port = parse_address(address)
        self.address = address
        self.timeout_s = timeout_s
        self.spin_s = spin_s
        self.heartbeat_s = heartbeat_s
        self._context = context
        self._control = self._connect(port)
        self._data: _Link | None = None
        self._rids = itertools.count(1)
        self._expected_step_s: float | None = None  # last decode step's round trip

    def _connect(self, port: int) -> _Link:
        return _Link(self._context, f"tcp://{self.host}:{port}", self.heartbeat_s)

    def request(self, op: str, tensors: tuple[torch.Tensor, ...] = (), timeout_s: float | None = None,
                **fields) -> tuple[dict, list[torch.Tensor]]:
        link = self._link(op)
        timeout_s = timeout_s or self.timeout_s
        link.forget_losses()
        begin = time.perf_counter()
        rid = self._send(link, op, tensors, fields)
        decode_step = op == "step" and tensors and tensors[0].shape[1] == 1
        expected = self._expected_step_s if decode_step else None
        header, out = self._receive(link, op, {rid}, begin, timeout_s, expected)[rid]
        if decode_step:
            self._expected_step_s = time.perf_counter() - begin
        if op == "open" and header.get("ok") and isinstance(header.get("data_port"), int) and self._data is None:
            self._data = self._connect(header["data_port"])
        return raise_if_error(header), out

    def replay(self, steps: list[torch.Tensor], window: int = 64, **fields) -> list[torch.Tensor]:
        """Run a session's earlier steps again, exactly as they were sent, up to `window` in flight
        (the server answers them in order): rebuilding a session costs compute, not a round trip
        per step. Returns each step's output."""
        link = self._link("step")
        link.forget_losses()
        outputs = []
        for first in range(0, len(steps), window):
            begin = time.perf_counter()
            rids = [self._send(link, "step", (hidden,), fields) for hidden in steps[first:first + window]]
            replies = self._receive(link, "step", set(rids), begin, self.timeout_s, None)
            for rid in rids:
                header, out = replies[rid]
                raise_if_error(header)
                outputs.append(out[0])
        return outputs

    def _link(self, op: str) -> _Link:
        if self._control is None:
            raise BadRequest(f"the connection to {self.address} is closed")
        if op != "step":
            return self._control
        if self._data is None:
            raise BadRequest(f"open a session on {self.address} before stepping")
        return self._data

    def _send(self, link: _Link, op: str, tensors: tuple[torch.Tensor, ...], fields: dict) -> int:
        rid = next(self._rids)
        link.socket.send_multipart(encode({"op": op, "rid": rid, **fields}, tensors), copy=False)
        return rid

    def _receive(self, link: _Link, op: str, rids: set[int], begin: float, timeout_s: float,
                 expected_s: float | None) -> dict[int, tuple[dict, list[torch.Tensor]]]:
        deadline = begin + timeout_s
        replies = {}
        while len(replies) < len(rids):
            try:
                if not self._wait(link, deadline, expected_s):
                    raise Timeout(f"{self.address} did not answer {op!r} within {timeout_s:g} s")
            except _Lost as lost:
                raise PeerGone(self._lost_message(lost.event, op)) from None
            header, out = decode(link.socket.recv_multipart())
            rid = header.get("rid")
            if rid is None:  # the server could not even read which request it was
                raise_if_error(header)
                raise BadRequest(f"{self.address} answered without a request id")
            if rid in rids:  # replies to earlier timed-out requests are dropped
                replies[rid] = (header, out)
        return replies

    def _wait(self, link: _Link, deadline: float, expected_s: float | None) -> bool:
        """Sleep until shortly before the reply is due, spin for at most 2·spin_s, then sleep again."""
        if expected_s is not None and self.spin_s > 0:
            nap_ms = int((expected_s - self.spin_s) * 1000)
            if nap_ms > 0 and link.ready(nap_ms):
                return True
            spin_until = min(time.perf_counter() + 2 * self.spin_s, deadline)
            while time.perf_counter() < spin_until:
                if link.ready(0):
                    return True
        return link.ready(max(0, int((deadline - time.perf_counter()) * 1000)))

    def _lost_message(self, event: int, op: str) -> str:
        if event == zmq.EVENT_CONNECT_RETRIED:
            return f"nothing accepts connections at {self.address} (while waiting for {op!r}); is the server running?"
        return (f"lost the connection to {self.address} while waiting for {op!r}: the server stopped, "
                f"or left {HEARTBEAT_MISSES * self.heartbeat_s:g} s of heartbeats unanswered")

    def info(self, timeout_s: float | None = None) -> ServerInfo:
        header, _ = self.request("info", timeout_s=timeout_s)
        return ServerInfo.from_wire(header)

    @property
    def closed(self) -> bool:
        return self._control is None

    def close(self) -> None:
        if self._control is not None:
            self._control.close()
        if self._data is not None:
            self._data.close()
        self._control = self._data = None


def fetch_info(context: zmq.Context, address: str, timeout_s: float = 10.0) -> ServerInfo:
    connection = Connection(context, address, timeout_s)
    try:
        return connection.info()
    except Timeout as exc:
        raise PeerGone(f"no blockswarm server answers at {address} ({exc})") from None
    finally:
        connection.close()
