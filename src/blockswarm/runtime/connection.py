"""A client's synchronous connection to one server: request, wait with a deadline, check the reply.

Each connection owns its DEALER sockets (control, and data once a session is open), so a
connection belongs to one thread; sessions that run concurrently each open their own
connections from one shared zmq.Context. A server that dies or stops answering is noticed while
a reply is awaited, from ZeroMQ's own liveness signals: a dropped TCP connection, failed
reconnects, or heartbeats (ZMTP PINGs, answered by the server's I/O thread even mid-compute)
left unanswered. The request then fails with a retriable `PeerGone` at once, not at its deadline.

A connection also holds the hop's session: `open` keeps the token the server minted and numbers
the steps, so a caller never handles either. Replies are checked like requests are on the
server: bounded in size, well formed, the right shape; a server that answers otherwise is a
`BadPeer`, which the session treats like a failed server. In a private swarm every socket
speaks CURVE with the key the client knows for that server (`security.py`).
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from blockswarm.core.errors import BadPeer, BadRequest, BlockswarmError, PeerGone, Refused, Timeout
from blockswarm.runtime import cooperative
from blockswarm.runtime.messages import REFUSED_EVENTS, SourcedContext, dial, parse_address
from blockswarm.runtime.protocol import (
    HEARTBEAT_MISSES, HEARTBEAT_S, MAX_HEADER_BYTES, ServerInfo, decode, encode, keep_alive, raise_if_error,
)


# what tells a waiting client that its server is gone: the connection dropped (closed by the
# peer, or heartbeats unanswered), or reconnecting to it failed; and that it refused us
LOST_EVENTS = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | REFUSED_EVENTS


def client_context(source: str | None = None) -> zmq.Context:
    """A ZeroMQ context for one client. Every hop of every session holds four sockets (control
    and data DEALERs, each with a monitor), so many concurrent sessions pass ZeroMQ's default
    cap of 1023 sockets per context; this one allows as many as the platform does.
    `source`: the local address every connection leaves from (None: the system's choice)."""
    context = SourcedContext()
    context.source = source
    context.set(zmq.MAX_SOCKETS, context.get(zmq.SOCKET_LIMIT))
    return context


class _Link:
    """One DEALER socket with heartbeats, and the monitor that reports its connection's losses."""

    def __init__(self, context: zmq.Context, endpoint: str, heartbeat_s: float, max_reply_bytes: int,
                 secure=None):
        try:
            self.socket = context.socket(zmq.DEALER)
        except zmq.ZMQError as exc:
            raise _out_of_sockets(exc) from None
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_reply_bytes)  # a bigger reply drops the connection
        keep_alive(self.socket, heartbeat_s)
        if secure is not None:
            secure(self.socket)
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
        events = dict(cooperative.poll(self.poller, timeout_ms))
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
    `heartbeat_s`: how often ZeroMQ pings the server; HEARTBEAT_MISSES unanswered pings mean it is gone.
    `keys`: a private swarm's client keys (`security.ClientKeys`), or None for an open swarm."""

    def __init__(self, context: zmq.Context, address: str, timeout_s: float = 60.0, spin_s: float = 0.002,
                 heartbeat_s: float = HEARTBEAT_S, keys=None):
        self.host, port = parse_address(address)
        self.address = address
        self.timeout_s = timeout_s
        self.spin_s = spin_s
        self.heartbeat_s = heartbeat_s
        self._context = context
        self._secure = None
        if keys is not None:
            from blockswarm.runtime.security import secure_client

            keys.server_key(address)  # unknown servers fail here, before any connection
            self._secure = lambda socket: secure_client(socket, keys, address)
        self._control_port = port
        self._closed = False
        self._control: _Link | None = self._connect(port, MAX_HEADER_BYTES)
        self._data: _Link | None = None
        self._data_port: int | None = None
        self._rids = itertools.count(1)
        self._expected_step_s: float | None = None  # last decode step's round trip
        self.token: str | None = None  # the open session's token, minted by the server
        self.steps = 0  # steps sent in the open session

    def _connect(self, port: int, max_reply_bytes: int) -> _Link:
        return _Link(self._context, dial(self._context, self.host, port), self.heartbeat_s, max_reply_bytes,
                     self._secure)

    def open(self, start: int, max_length: int, step_bytes: int, ticket: str | None = None) -> dict:
        """Open a session entering at block `start` for `max_length` tokens; `step_bytes`: the
        largest step reply it can get (all its tokens at once); `ticket`: the coordinator's, in a
        coordinated swarm. Re-learns the data port each time (a restarted server has a new one)."""
        extra = {"ticket": ticket} if ticket is not None else {}
        header, _ = self.request("open", start=start, max_length=max_length, **extra)
        token, port = header.get("session"), header.get("data_port")
        if not isinstance(token, str) or not isinstance(port, int) or not 0 < port < 65536:
            raise BadPeer(f"{self.address} answered 'open' without a session token and data port")
        if self._data is None or port != self._data_port:
            if self._data is not None:
                self._data.close()
            self._data = self._connect(port, step_bytes + MAX_HEADER_BYTES)
            self._data_port = port
        self.token, self.steps = token, 0
        return header

    def step(self, hidden: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Run one step of the open session; the reply is checked to be (1, n, d) like `hidden`."""
        header, out = self.request("step", (hidden,), session=self._token(), step=self.steps + 1)
        self.steps += 1
        return header, self._checked(out, hidden)

    def replay(self, steps: list[torch.Tensor], window: int = 64) -> list[torch.Tensor]:
        """Run a session's earlier steps again, exactly as they were sent, up to `window` in flight
        (the server answers them in order): rebuilding a session costs compute, not a round trip
        per step. Returns each step's output."""
        link = self._link("step")
        link.forget_losses()
        token = self._token()
        outputs = []
        for first in range(0, len(steps), window):
            begin = time.perf_counter()
            rids = []
            for hidden in steps[first:first + window]:
                rids.append(self._send(link, "step", (hidden,), {"session": token, "step": self.steps + 1}))
                self.steps += 1
            replies = self._receive(link, "step", set(rids), begin, self.timeout_s, None)
            for rid, hidden in zip(rids, steps[first:first + window]):
                header, out = replies[rid]
                raise_if_error(header)
                outputs.append(self._checked(out, hidden))
        return outputs

    def close_session(self, timeout_s: float = 2.0) -> None:
        """Tell the server the session is over (best effort: idle sessions expire anyway)."""
        token, self.token = self.token, None
        if token is not None and not self.closed:
            try:
                self.request("close", session=token, timeout_s=timeout_s)
            except BlockswarmError:
                pass

    def _token(self) -> str:
        if self.token is None:
            raise BadRequest(f"open a session on {self.address} before stepping")
        return self.token

    def _checked(self, out: list[torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        if len(out) != 1 or out[0].shape != hidden.shape or out[0].dtype != hidden.dtype:
            got = [(tuple(t.shape), str(t.dtype)) for t in out]
            raise BadPeer(f"{self.address} answered a step with a malformed tensor ({got} for "
                          f"{tuple(hidden.shape)} {hidden.dtype})")
        if not _finite(out[0]):
            raise BadPeer(f"{self.address} answered a step with NaN or Inf hidden states")
        return out[0]

    def request(self, op: str, tensors: tuple[torch.Tensor, ...] = (), timeout_s: float | None = None,
                **fields) -> tuple[dict, list[torch.Tensor]]:
        """One request and its checked reply; raises the error the server answered with."""
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
        return raise_if_error(header), out

    def _link(self, op: str) -> _Link:
        if self._closed:
            raise BadRequest(f"the connection to {self.address} is closed")
        if op != "step":
            if self._control is None:  # dropped after a loss: a fresh one (the server may be back)
                self._control = self._connect(self._control_port, MAX_HEADER_BYTES)
            return self._control
        if self._data is None:
            raise BadRequest(f"open a session on {self.address} before stepping")
        return self._data

    def _drop(self, link: _Link) -> None:
        """Forget a link whose connection was lost. libzmq reconnects after a dropped TCP connection
        but not after a protocol error (e.g. a reply over the size limit), and a DEALER with no
        connection blocks every send; a lost link is therefore never used again."""
        link.close()
        if link is self._control:
            self._control = None
        if link is self._data:
            self._data, self._data_port, self.token = None, None, None

    def _send(self, link: _Link, op: str, tensors: tuple[torch.Tensor, ...], fields: dict) -> int:
        """Queue a request without ever blocking: a link that cannot take it within the timeout is lost."""
        rid = next(self._rids)
        frames = encode({"op": op, "rid": rid, **fields}, tensors)
        try:
            link.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if not cooperative.poll_socket(link.socket, zmq.POLLOUT, int(self.timeout_s * 1000)):
                self._drop(link)
                raise PeerGone(f"cannot send {op!r} to {self.address}: its connection is down") from None
            link.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
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
                self._drop(link)
                if lost.event & REFUSED_EVENTS:
                    raise Refused(self._refused_message(lost.event)) from None
                raise PeerGone(self._lost_message(lost.event, op)) from None
            try:
                header, out = decode(link.socket.recv_multipart())
            except BadRequest as exc:
                raise BadPeer(f"{self.address} sent a reply that is not blockswarm's protocol: {exc}") from None
            rid = header.get("rid")
            if rid is None:  # the server could not even read which request it was
                raise_if_error(header)
                raise BadPeer(f"{self.address} answered without a request id")
            if header.get("code") == "internal":
                raise BadPeer(f"{self.address} failed with an internal error: {str(header.get('message'))[:200]}")
            if rid in rids:  # replies to earlier timed-out requests are dropped
                replies[rid] = (header, out)
        return replies

    def _wait(self, link: _Link, deadline: float, expected_s: float | None) -> bool:
        """Sleep until shortly before the reply is due, spin for at most 2·spin_s, then sleep again.
        (On an event loop only while it has nothing else to serve, and after one turn of the loop:
        a spin holds the loop up, and the hop's reply is rarely back by then. Without that turn a
        generation whose hops all answered within their spin held the loop for its whole stream.)"""
        if expected_s is not None and self.spin_s > 0 and cooperative.may_spin():
            nap_ms = int((expected_s - self.spin_s) * 1000)
            if nap_ms > 0 and link.ready(nap_ms):
                return True
            cooperative.let_loop_run()
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

    def _refused_message(self, event: int) -> str:
        if self._secure is None:
            return (f"{self.address} refused the connection at the handshake: it is a private server; "
                    "connect with --keys DIR/NAME and --known-servers FILE (its public key)")
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (f"{self.address} refused our key: it is not in the server's --allow directory; "
                    "ask its operator to add our public key file (NAME.key)")
        return (f"the handshake with {self.address} failed: it is not private, or its key is not the one "
                "--known-servers names for it (check the key file, or drop --keys for an open server)")

    def info(self, timeout_s: float | None = None) -> ServerInfo:
        header, _ = self.request("info", timeout_s=timeout_s)
        try:
            return ServerInfo.from_wire(header)
        except BadRequest as exc:
            raise BadPeer(f"{self.address} describes itself oddly: {exc}") from None

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        for link in (self._control, self._data):
            if link is not None:
                link.close()
        self._control = self._data = None
        self._closed = True


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in a reply. This runs on every hop of every token, so cheaply: a finite sum
    (numpy, ~2 µs; torch.isfinite().all() takes ~20) proves every element finite; only a sum that
    is not (NaN, Inf, or an overflow) is looked at element by element."""
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16
        return bool(torch.isfinite(tensor).all())
    array = tensor.numpy()
    return math.isfinite(array.sum(dtype=np.float64)) or bool(np.isfinite(array).all())  # float64: no overflow


def fetch_info(context: zmq.Context, address: str, timeout_s: float = 10.0, keys=None) -> ServerInfo:
    connection = Connection(context, address, timeout_s, keys=keys)
    try:
        return connection.info()
    except Timeout as exc:
        raise PeerGone(f"no blockswarm server answers at {address} ({exc})") from None
    finally:
        connection.close()
