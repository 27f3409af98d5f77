"""A raw ZMTP 3.0 peer over a plain TCP socket: what a hostile client can send that pyzmq never would.

libzmq only hands a multipart message on when its last frame arrives, and a DEALER never sends
half a message; a hostile peer writes the wire format itself. This speaks just enough of it (the
NULL-mechanism greeting, READY, frames, PONGs) to open a connection from a chosen source address,
send frames of any number and size, and stop half-way.
"""

from __future__ import annotations

import socket
import struct
import time

MORE, LONG, COMMAND = 0x01, 0x02, 0x04


def _greeting() -> bytes:
    return b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31


def _frame(body: bytes, flags: int = 0) -> bytes:
    if len(body) > 255:
        return bytes([flags | LONG]) + struct.pack(">Q", len(body)) + body
    return bytes([flags, len(body)]) + body


def _ready(socket_type: bytes = b"DEALER") -> bytes:
    name = b"Socket-Type"
    body = b"\x05READY" + bytes([len(name)]) + name + struct.pack(">I", len(socket_type)) + socket_type
    return _frame(body, COMMAND)


class RawPeer:
    def __init__(self, address: str, source: str = "127.0.0.2", timeout_s: float = 5.0):
        host, port = address.rsplit(":", 1)
        self.sock = socket.socket()
        self.sock.settimeout(timeout_s)
        self.sock.bind((source, 0))
        self.sock.connect((host, int(port)))
        self.sock.sendall(_greeting())
        self._buffer = b""
        self._read(64)  # the server's greeting
        self.sock.sendall(_ready())
        self._read_frame()  # its READY

    def _read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def _read_frame(self) -> tuple[int, bytes]:
        flags = self._read(1)[0]
        size = struct.unpack(">Q", self._read(8))[0] if flags & LONG else self._read(1)[0]
        return flags, self._read(size)

    def send_frames(self, frames: list[bytes], finish: bool = True) -> None:
        """Frames of one message; with finish=False the last one says more follows (it never does)."""
        out = b"".join(_frame(f, MORE if (i < len(frames) - 1 or not finish) else 0) for i, f in enumerate(frames))
        self.sock.sendall(out)

    def stream_unfinished(self, total_bytes: int, frame_bytes: int = 1 << 20, pace_s: float = 0.0) -> int:
        """Send frames that all say `more`, up to total_bytes; returns the bytes sent before the
        server cut the connection (or all of them)."""
        sent, payload = 0, b"\x00" * frame_bytes
        try:
            while sent < total_bytes:
                self.sock.sendall(_frame(payload, MORE))
                sent += frame_bytes
                if pace_s:
                    time.sleep(pace_s)
        except OSError:
            pass
        return sent

    def receive(self, timeout_s: float = 5.0) -> list[bytes]:
        """The next message (answering PINGs on the way); socket.timeout if none comes in time."""
        frames, deadline = [], time.monotonic() + timeout_s
        while True:
            if time.monotonic() > deadline:
                raise socket.timeout("no message")
            flags, body = self._read_frame()
            if flags & COMMAND:
                if body[1:5] == b"PING":
                    self.sock.sendall(_frame(b"\x04PONG" + body[7:], COMMAND))
                continue
            frames.append(body)
            if not flags & MORE:
                return frames

    def is_cut(self, wait_s: float = 3.0) -> bool:
        """True once the server has closed this connection (within wait_s)."""
        deadline = time.monotonic() + wait_s
        self.sock.settimeout(0.1)
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(1 << 16):
                    return True
            except socket.timeout:
                continue
            except OSError:
                return True
        return False

    def close(self) -> None:
        self.sock.close()
