"""A server's sockets: binding them with their limits, and reading one message within those limits.

Both ports are bound, guarded (`guard.py`) and, in a private swarm, secured before the model
loads, so that a port in use is an error at once and no connection arrives before its limits.
"""

from __future__ import annotations

import os

import zmq

from blockswarm.core.errors import ConfigError
from blockswarm.runtime.guard import Guard, PortLimits, raise_descriptor_limit, source_fd
from blockswarm.runtime.messages import MAX_HEADER_BYTES, keep_alive
from blockswarm.runtime.ratelog import RateLimitedLog
from blockswarm.runtime.security import KeyPair, secure_server, start_gate

MAX_FRAMES = 8  # header and tensors; our messages have at most two, fewer than 8 get a clear error
DESCRIPTOR_RESERVE = 64  # descriptors kept for the model's files, libzmq's own signalling and the like


def port_limits(config, max_tokens: int, hidden_size: int, itemsize: int) -> tuple[PortLimits, PortLimits]:
    """What the control and data ports accept (`config`: the server's ServeConfig). Control
    messages are small headers (an honest client sends one request at a time); the largest step carries one whole session's tokens, and
    a connection carries one session's steps, so no honest data connection ever has more than one
    session's hidden states in flight. Connections are capped below what the process's descriptor
    limit allows: a server out of descriptors accepts nobody and libzmq spins retrying (seen: 344
    idle connections under a limit of 256 made a server unreachable, at half a core)."""
    step_bytes = max_tokens * hidden_size * itemsize
    spare = max(2, (raise_descriptor_limit() - _open_descriptors() - DESCRIPTOR_RESERVE) // 2)
    connections = min(config.max_connections, spare)
    common = dict(queue_per_peer=64, max_connections=connections,
                  max_per_address=min(config.max_connections_per_address, max(1, connections // 2)))
    # a message of more frames than MAX_FRAMES is no mistake of an honest client: its sender is cut
    control = PortLimits(max_frame_bytes=MAX_HEADER_BYTES, max_frames=MAX_FRAMES, max_backlog_bytes=2**18, **common)
    data = PortLimits(max_frame_bytes=max(MAX_HEADER_BYTES, step_bytes), max_frames=MAX_FRAMES,
                      max_backlog_bytes=step_bytes + step_bytes // 4 + 2**20, **common)
    return control, data


class Endpoints:
    """The server's context and its two bound sockets with their guards (`guards[0]` control,
    `guards[1]` data; each knows its port's limits)."""

    def __init__(self, config, limits: tuple[PortLimits, PortLimits], ratelog: RateLimitedLog):
        pair = KeyPair.load(config.keys) if config.keys else None
        self.log = ratelog  # the server logs through it too: one rate limit for the process
        self.context = zmq.Context()
        self.gate = None
        self.guards: list[Guard] = []
        self.private = pair is not None
        try:
            if pair:
                self.gate = start_gate(self.context, config.allow, ratelog)
            self.control = self._router(config.host, config.port, "--port", pair, limits[0], "control", ratelog)
            self.data = self._router(config.host, config.data_port, "--data-port", pair, limits[1], "data", ratelog)
        except BaseException:
            self.close()
            raise

    def _router(self, host: str, port: int, flag: str, pair, limits: PortLimits, name: str,
                ratelog: RateLimitedLog) -> zmq.Socket:
        socket, guard = bind_router(self.context, host, port, flag, pair, limits, name, ratelog)
        self.guards.append(guard)
        return socket

    def close(self) -> None:
        for guard in self.guards:
            guard.close()
        if self.gate is not None:
            self.gate.stop()
        self.context.destroy(linger=0)


def bind_router(context: zmq.Context, host: str, port: int, flag: str, pair, limits: PortLimits, name: str,
                ratelog: RateLimitedLog) -> tuple[zmq.Socket, Guard]:
    """A ROUTER bound to host:port (0: a free port) with heartbeats, its guard, and CURVE if `pair`
    is given; a port in use is a ConfigError naming `flag`."""
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.LINGER, 0)
    keep_alive(socket)  # connections of vanished peers are dropped
    if pair:
        secure_server(socket, pair)
    guard = Guard.attach(socket, name, limits, ratelog)
    try:
        if port:
            socket.bind(f"tcp://{host}:{port}")
        else:
            socket.bind_to_random_port(f"tcp://{host}")
    except zmq.ZMQError as exc:
        guard.close()
        socket.close(linger=0)
        raise ConfigError(f"cannot listen on {host}:{port or 'a free port'} ({exc.strerror}); "
                          f"pick another {flag} or stop what listens there") from None
    return socket, guard


def receive(socket: zmq.Socket, guard: Guard, peer_property: str):
    """One waiting message as (routing id, body frames, peer), or None when none waits. A message
    with more frames than its port allows is read to its end and dropped, and its sender cut:
    libzmq delivers a message whole, so the frames must be drained, but only once per peer.
    `peer_property`: "User-Id" (the CURVE key) in a private swarm, else "Peer-Address".
    (This runs for every step: it asks ZMQ_EVENTS rather than catching zmq.Again, and reads
    the routing id as bytes; each saves microseconds that turn into tens right after a wake-up.)"""
    if not socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
        return None
    identity = socket.recv()
    body, max_frames = [], guard.limits.max_frames
    while True:
        frame = socket.recv(copy=False)
        if len(body) == max_frames:
            drained = _drain_message(socket) + 1
            guard.request_cut(source_fd(frame), f"sent a message of {len(body) + drained} frames "
                                                f"(at most {max_frames})")
            return None
        body.append(frame)
        if not frame.more:
            break
    guard.consumed(source_fd(body[0]), body)
    try:
        peer = body[0].get(peer_property) or "?"
    except zmq.ZMQError:
        peer = "?"
    return identity, body, peer


def _drain_message(socket: zmq.Socket) -> int:
    count = 0
    while socket.rcvmore:
        socket.recv()
        count += 1
    return count


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # no /proc: assume little is open
        return 16
