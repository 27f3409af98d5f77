"""Connection limits a server's ZeroMQ sockets cannot enforce themselves.

libzmq limits one frame (`MAXMSGSIZE`) and the complete messages queued per peer (`RCVHWM`),
but not the number of connections, nor the frames of one message, nor the bytes of a multipart
message that never ends: it buffers that message where the application cannot see it until
the last frame arrives. A `Guard` watches one bound socket from outside:

- its socket monitor reports every accepted connection with its file descriptor, so the guard
  knows each connection's source address and refuses more than `max_connections` in all or
  `max_per_address` from one address (it shuts the descriptor down; libzmq then drops the
  connection and frees what it held, a half-received message included);
- `check` compares the bytes the kernel received on each connection (TCP_INFO) with the
  bytes the application has taken from it (`consumed`, fed by the socket's owner from each
  message's source descriptor). What lies between is held inside libzmq; a connection holding
  more than `max_backlog_bytes` is sending a message larger than any the server accepts, and
  is cut. Every connection is looked at every FULL_CHECK_S; new ones and those receiving fast
  ("hot") every HOT_CHECK_S, because a flood on loopback fills hundreds of MiB in a quarter
  second (~7 µs per connection per look, so looking at all of them that often would cost a core);
- a peer cut for abuse is banned for `ban_s`: its new connections are cut on arrival.

Linux only (TCP_INFO's layout); elsewhere the byte check is skipped and says so once.
"""

from __future__ import annotations

import fcntl
import socket as sockets
import struct
import sys
import termios
import time
from collections import deque
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import recv_monitor_message

from blockswarm.runtime.ratelog import RateLimitedLog

_TCPI_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received (u64) in Linux's struct tcp_info
_TCP_INFO_SIZE = 136
HANDSHAKE_SLACK_BYTES = 8192  # ZMTP greeting + READY (+ CURVE's HELLO/INITIATE) and a margin
HEARTBEAT_SLACK_BYTES_PER_S = 64  # PINGs and PONGs the application never sees
FULL_CHECK_S = 0.25  # every connection is looked at this often...
HOT_CHECK_S = 0.01  # ...new and fast-growing ones this often
HOT_AGE_S = 1.0  # a connection is hot for its first second...
HOT_GROWTH_BYTES = 1 << 16  # ...and whenever it received this much since it was last looked at
EVENTS = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
          | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
          | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


@dataclass(frozen=True, slots=True)
class PortLimits:
    """What one port accepts. Frames and bytes count what a peer sends, not the routing id."""

    max_frame_bytes: int  # one frame (ZMQ_MAXMSGSIZE: a bigger frame drops the connection)
    max_frames: int  # frames in one message
    max_backlog_bytes: int  # bytes one connection may have inside libzmq, not yet taken by us
    queue_per_peer: int  # complete messages queued per connection (ZMQ_RCVHWM)
    max_connections: int = 1024  # on this port, from everybody
    max_per_address: int = 512  # on this port, from one source address
    ban_s: float = 60.0  # how long a peer cut for abuse stays refused


@dataclass(slots=True)
class _Connection:
    address: str
    since: float
    consumed: int = 0  # bytes the application has taken from this connection, framing included
    received: int = 0  # bytes libzmq had taken from the kernel when last looked at
    hot: bool = True


@dataclass
class Guard:
    """Watches one socket; the socket's owner reports consumption, the control thread calls `events`/`check`."""

    socket_name: str
    limits: PortLimits
    monitor: zmq.Socket
    log: RateLimitedLog
    clock: callable = time.monotonic
    connections: dict[int, _Connection] = field(default_factory=dict)
    banned: dict[str, float] = field(default_factory=dict)
    cut_count: int = 0
    _byte_check: bool = sys.platform.startswith("linux")
    _next_full: float = 0.0
    trim_due: bool = False
    _requests: deque = field(default_factory=deque)  # cuts asked for by the socket's owner thread

    @classmethod
    def attach(cls, socket: zmq.Socket, socket_name: str, limits: PortLimits, log: RateLimitedLog) -> "Guard":
        """Apply the limits libzmq has and start watching the rest (call from the socket's owner,
        before it binds, so that no connection is missed)."""
        socket.setsockopt(zmq.MAXMSGSIZE, limits.max_frame_bytes)
        socket.setsockopt(zmq.RCVHWM, limits.queue_per_peer)
        socket.setsockopt(zmq.HANDSHAKE_IVL, 5000)  # a peer that never finishes its handshake is dropped
        return cls(socket_name, limits, socket.get_monitor_socket(EVENTS), log)

    # -- called by the socket's owner (only these two: `connections` belongs to the control thread)
    def request_cut(self, fd: int, why: str) -> None:
        """Ask for a sender to be cut and refused; done by the control thread within a loop turn."""
        self._requests.append((fd, why))  # deque.append is thread-safe

    def consumed(self, fd: int, frames: list) -> None:
        connection = self.connections.get(fd)
        if connection is not None:
            connection.consumed += sum(len(f) + 9 for f in frames)  # 9: the longest ZMTP frame header

    # -- called by the control thread -------------------------------------------------------
    def events(self) -> None:
        """Take every pending monitor event: admit or refuse new connections, forget closed ones;
        then carry out the cuts the socket's owner asked for."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                self._admit(fd)
            elif event["event"] in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                self.connections.pop(fd, None)
            elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:  # e.g. a client without keys
                # (refused keys are logged by the gate, with who; "no detail" is a peer that hung up
                # mid-handshake, as port scanners and clients giving up do: not worth a line)
                self.log.warning(f"handshake-{self.socket_name}",
                                 "%s port: a peer failed its handshake (%s): refused before reaching any session",
                                 self.socket_name, _event_name(event["event"]))
        while self._requests:
            fd, why = self._requests.popleft()
            if fd in self.connections:
                self.cut(fd, why, ban=True)

    @property
    def hot(self) -> bool:
        """Whether some connection needs looking at every HOT_CHECK_S."""
        return self._byte_check and any(c.hot for c in self.connections.values())

    def check(self) -> None:
        """Cut connections whose unfinished messages hold more than the port allows: the hot ones
        on every call, all of them every FULL_CHECK_S."""
        if not self._byte_check:
            return
        now = self.clock()
        full = now >= self._next_full
        if full:
            self._next_full = now + FULL_CHECK_S
        for fd, connection in list(self.connections.items()):
            if full or connection.hot:
                self._look(fd, connection, now)

    def _look(self, fd: int, connection: _Connection, now: float) -> None:
        received = _bytes_held(fd)
        if received is None:
            return
        connection.hot = now - connection.since < HOT_AGE_S or received - connection.received > HOT_GROWTH_BYTES
        connection.received = received
        slack = HANDSHAKE_SLACK_BYTES + HEARTBEAT_SLACK_BYTES_PER_S * (now - connection.since)
        backlog = received - connection.consumed - slack
        if backlog > self.limits.max_backlog_bytes:
            self.cut(fd, f"holds {backlog / 2**20:.1f} MiB of unfinished messages "
                         f"(at most {self.limits.max_backlog_bytes / 2**20:.1f} MiB)", ban=True)

    def cut(self, fd: int, why: str, ban: bool) -> None:
        """Drop one connection (libzmq notices the shut-down descriptor and frees its buffers).
        Control thread only; the socket's owner uses `request_cut`."""
        connection = self.connections.pop(fd, None)
        address = connection.address if connection else "?"
        if ban and connection:
            self.banned[address] = self.clock() + self.limits.ban_s
        self.cut_count += 1
        self.log.warning(f"cut-{self.socket_name}-{address}", "%s port: dropped a connection from %s: %s%s",
                         self.socket_name, address, why, f"; refused for {self.limits.ban_s:g} s" if ban else "")
        _shutdown(fd)
        self.trim_due = True  # what libzmq held for it is freed soon; then give the memory back

    def _admit(self, fd: int) -> None:
        address = _peer_address(fd)
        now = self.clock()
        if self.banned.get(address, 0.0) > now:
            _shutdown(fd)
            return
        self.banned.pop(address, None)
        self.connections[fd] = _Connection(address, now)
        if len(self.connections) > self.limits.max_connections:
            self.cut(fd, f"{len(self.connections) - 1} connections are open, the port's limit", ban=False)
        elif sum(c.address == address for c in self.connections.values()) > self.limits.max_per_address:
            self.cut(fd, f"it has {self.limits.max_per_address} connections open, the limit per address", ban=False)

    def close(self) -> None:
        self.monitor.close(linger=0)


def source_fd(frame: zmq.Frame) -> int:
    """The descriptor of the connection a received frame came through."""
    return frame.get(zmq.SRCFD)


def _peer_address(fd: int) -> str:
    try:
        with _borrowed(fd) as sock:
            return str(sock.getpeername()[0])
    except OSError:
        return "?"


def _bytes_held(fd: int) -> int | None:
    """Bytes the kernel received on this connection that libzmq has read from it."""
    try:
        with _borrowed(fd) as sock:
            info = sock.getsockopt(sockets.IPPROTO_TCP, sockets.TCP_INFO, _TCP_INFO_SIZE)
        unread = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return None
    if len(info) < _TCPI_BYTES_RECEIVED + 8:
        return None
    return struct.unpack_from("Q", info, _TCPI_BYTES_RECEIVED)[0] - unread


def _shutdown(fd: int) -> None:
    try:
        with _borrowed(fd) as sock:
            sock.shutdown(sockets.SHUT_RDWR)
    except OSError:
        pass  # already gone


class _borrowed:
    """A socket object over a descriptor libzmq owns, released (never closed) on exit."""

    def __init__(self, fd: int):
        self.sock = sockets.socket(sockets.AF_INET, sockets.SOCK_STREAM, 0, fd)  # stated: no probing syscalls

    def __enter__(self):
        return self.sock

    def __exit__(self, *exc):
        self.sock.detach()


def _event_name(event: int) -> str:
    try:
        return zmq.Event(event).name.lower()
    except ValueError:
        return str(event)


def give_memory_back() -> None:
    """Return freed heap to the system (glibc keeps it otherwise: libzmq's message queues are
    many small blocks, so RSS would stay at a flood's peak after the flood is cut)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def raise_descriptor_limit() -> int:
    """Let the server open as many descriptors as the system allows it; returns the new limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft

