"""The link emulator: one process in front of every emulated host's ports that holds each
direction's bytes for the one-way delay of its (source host, destination host) pair.

This kernel has no `netem`, so delay is added in user space. For every listening port (a
host's public address and port) the emulator accepts a connection, learns the source host from
the connecting address (the runtime binds its connections' source, `messages.dial`), and
connects on to the host's internal address from that same source address, so the server sees
the real peer (its per-address limits still apply). Each chunk read is stamped with the time it
is due at the other end — arrival + the pair's one-way delay, after the bytes ahead of it on
that pair's link when a bandwidth is given — and a sender thread writes it then. Chunks of one
direction keep their order (their due times never decrease). A closed side is passed on after
the same delay.

Why threads and not asyncio: both asyncio and libuv wait in whole milliseconds (epoll's
timeout), so every chunk would be up to 1 ms late; a condition variable's timed wait wakes
within ~0.1 ms here. The emulator measures its own lateness (when a chunk left against when it
was due) and writes it to `stats` on exit; `measure_overhead` measures what it adds end to end.

Run as `python -m blockswarm.testbed.links PLAN.json`: it binds every listener, prints one
`LINKS READY {json: listener index -> port}` line, and runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import heapq
import itertools
import json
import selectors
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

CHUNK = 262144
SEND_TIMEOUT_S = 10.0
WAKE_S = 0.00025  # a timed wait returns ~0.25 ms late here (measured): the first guess of how early to wake


@dataclass(frozen=True, slots=True)
class Listener:
    public: str  # address to listen on
    port: int  # 0: any free port (reported in the READY line)
    internal: str  # where the host's process listens, on the same port


@dataclass
class LinkPlan:
    listeners: list[Listener]
    one_way_s: dict[tuple[str, str], float]  # (source address, destination address) -> seconds
    bytes_per_s: dict[tuple[str, str], float] = field(default_factory=dict)  # absent: unlimited
    stats: str | None = None  # a file for the emulator's own lateness, written on exit

    def to_json(self) -> str:
        return json.dumps({"listeners": [[l.public, l.port, l.internal] for l in self.listeners],
                           "one_way_s": [[a, b, s] for (a, b), s in self.one_way_s.items()],
                           "bytes_per_s": [[a, b, s] for (a, b), s in self.bytes_per_s.items()],
                           "stats": self.stats})

    @classmethod
    def from_json(cls, text: str) -> "LinkPlan":
        data = json.loads(text)
        return cls([Listener(*l) for l in data["listeners"]], {(a, b): s for a, b, s in data["one_way_s"]},
                   {(a, b): s for a, b, s in data["bytes_per_s"]}, data.get("stats"))


class _Direction:
    """One direction of one relayed connection."""

    __slots__ = ("source", "target", "delay_s", "link", "peer", "ended", "broken")

    def __init__(self, source: socket.socket, target: socket.socket, delay_s: float, link: tuple[str, str]):
        self.source, self.target, self.delay_s, self.link = source, target, delay_s, link
        self.peer: _Direction | None = None
        self.ended = False  # its source's end was passed on
        self.broken = False  # a write failed: nothing more is passed on


class LinkEmulator:
    def __init__(self, plan: LinkPlan):
        self.plan = plan
        self.selector = selectors.DefaultSelector()
        self.listening: list[socket.socket] = []
        self.ports: list[int] = []
        self._due: list[tuple] = []  # (due, order, direction, bytes or None for the end)
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._link_free: dict[tuple[str, str], float] = {}
        self._early_s = WAKE_S  # how late timed waits return, learnt as they do: the sender wakes that early
        self._stop = threading.Event()
        self.lateness: list[float] = []  # seconds each chunk left after it was due (a sample)
        self.chunks = 0

    def bind(self) -> list[int]:
        for listener in self.plan.listeners:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((listener.public, listener.port))
            sock.listen(512)
            sock.setblocking(False)
            self.listening.append(sock)
            self.ports.append(sock.getsockname()[1])
            self.selector.register(sock, selectors.EVENT_READ, ("listen", listener, sock.getsockname()[1]))
        return self.ports

    def run(self) -> None:
        sender = threading.Thread(target=self._send_loop, name="links-send", daemon=True)
        sender.start()
        try:
            while not self._stop.is_set():
                for key, _ in self.selector.select(timeout=0.2):
                    kind = key.data[0]
                    if kind == "listen":
                        self._accept(key.fileobj, key.data[1], key.data[2])
                    else:
                        self._read(key.data[1])
        finally:
            self._stop.set()
            with self._wake:
                self._wake.notify()
            sender.join(timeout=2)
            self._write_stats()
            for sock in self.listening:
                sock.close()

    def stop(self) -> None:
        self._stop.set()

    def _accept(self, listening: socket.socket, listener: Listener, port: int) -> None:
        try:
            conn, (source_ip, _) = listening.accept()
        except (BlockingIOError, InterruptedError):
            return
        out = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            out.bind((source_ip, 0))  # the host's process sees the real peer
            out.connect((listener.internal, port))
        except OSError:  # nothing listens there (yet): the peer reconnects later
            out.close()
            conn.close()
            return
        for sock in (conn, out):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(SEND_TIMEOUT_S)  # reads happen only when the selector says data waits
        there = (source_ip, listener.public)
        back = (listener.public, source_ip)
        forward = _Direction(conn, out, self.plan.one_way_s.get(there, 0.0), there)
        backward = _Direction(out, conn, self.plan.one_way_s.get(back, 0.0), back)
        forward.peer, backward.peer = backward, forward
        self.selector.register(conn, selectors.EVENT_READ, ("data", forward))
        self.selector.register(out, selectors.EVENT_READ, ("data", backward))

    def _read(self, direction: _Direction) -> None:
        try:
            data = direction.source.recv(CHUNK)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return
        except OSError:
            data = b""
        now = time.perf_counter()
        if not data:
            self.selector.unregister(direction.source)
        due = now
        rate = self.plan.bytes_per_s.get(direction.link)
        if rate and data:  # the bytes ahead on this link go first
            due = max(now, self._link_free.get(direction.link, 0.0)) + len(data) / rate
            self._link_free[direction.link] = due
        with self._wake:
            heapq.heappush(self._due, (due + direction.delay_s, next(self._order), direction, data or None))
            self._wake.notify()

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            with self._wake:
                while not self._stop.is_set():
                    if self._due:
                        aim = self._due[0][0] - self._early_s
                        left = aim - time.perf_counter()
                        if left <= 0:
                            break
                        if not self._wake.wait(left):  # timed out: learn how late it woke
                            late = time.perf_counter() - aim
                            self._early_s = min(0.002, max(0.0, 0.9 * self._early_s + 0.1 * late))
                    else:
                        self._wake.wait(0.2)
                now = time.perf_counter() + self._early_s
                ready = []
                while self._due and self._due[0][0] <= now:
                    ready.append(heapq.heappop(self._due))
            for due, _, direction, data in ready:
                self._deliver(direction, data)
                late = time.perf_counter() - due
                self.chunks += 1
                if len(self.lateness) < 200_000:
                    self.lateness.append(late)

    def _deliver(self, direction: _Direction, data: bytes | None) -> None:
        """Runs on the sender thread, which never touches the selector: the reader unregisters a
        socket when it reads its end, and a socket is closed only once both its directions ended."""
        if data is None:  # the source closed: pass the end on
            direction.ended = True
            _quietly(direction.target.shutdown, socket.SHUT_WR)
            if direction.peer.ended:
                direction.source.close()
                direction.target.close()
            return
        if direction.broken:
            return
        try:
            direction.target.sendall(data)
        except OSError:  # the other side is gone: end both directions; the reader sees both ends
            direction.broken = direction.peer.broken = True
            _quietly(direction.source.shutdown, socket.SHUT_RDWR)
            _quietly(direction.target.shutdown, socket.SHUT_RDWR)

    def _write_stats(self) -> None:
        if not self.plan.stats:
            return
        late = sorted(self.lateness)
        pick = (lambda q: late[min(len(late) - 1, int(q * len(late)))] * 1e3) if late else (lambda q: 0.0)
        with open(self.plan.stats, "w") as out:
            json.dump({"chunks": self.chunks, "late_ms_p50": pick(0.5), "late_ms_p90": pick(0.9),
                       "late_ms_p99": pick(0.99), "late_ms_max": late[-1] * 1e3 if late else 0.0}, out)


def _quietly(call, *args) -> None:
    try:
        call(*args)
    except OSError:
        pass


def main(argv: list[str]) -> None:
    plan = LinkPlan.from_json(open(argv[0]).read())
    emulator = LinkEmulator(plan)
    ports = emulator.bind()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: emulator.stop())
    print("LINKS READY " + json.dumps(ports), flush=True)
    emulator.run()


if __name__ == "__main__":
    main(sys.argv[1:])
