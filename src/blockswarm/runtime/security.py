"""Private swarms: ZeroMQ CURVE keys, who may connect, and which key each server must show.

A private swarm encrypts and authenticates every connection with CURVE. Keys are pyzmq's
certificate files: `NAME.key` holds the public key, `NAME.key_secret` both (mode 0600). A
server admits only clients whose public key file lies in its `--allow` directory (checked by a
ZAP handler before a single message reaches it); a client must know each server's public key
before it connects (`--known-servers FILE`, lines `HOST:PORT PUBLIC_KEY_FILE`, like SSH's known
hosts), so a server that cannot prove it holds that key is refused by the client.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

from blockswarm.core.errors import ConfigError

PUBLIC_SUFFIX, SECRET_SUFFIX = ".key", ".key_secret"
ZAP_DOMAIN = b"blockswarm"  # the domain servers ask the ZAP handler about


@dataclass(frozen=True, slots=True)
class KeyPair:
    public: bytes  # z85, 40 characters
    secret: bytes

    @classmethod
    def load(cls, stem: str | os.PathLike) -> "KeyPair":
        """Load DIR/NAME (NAME.key_secret holds both halves)."""
        path = Path(f"{stem}{SECRET_SUFFIX}")
        if not path.is_file():
            raise ConfigError(f"no secret key file {path}; make one with `blockswarm keys new NAME --dir DIR` "
                              "and pass --keys DIR/NAME")
        return cls(*_read_certificate(path, "secret"))


def write_keypair(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (secret, created with mode 0600: never readable
    by others, not even for a moment). Refuses to overwrite an existing pair."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"key name {name!r} must be a plain file name, e.g. server1")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = folder / f"{name}{PUBLIC_SUFFIX}", folder / f"{name}{SECRET_SUFFIX}"
    for path in (public_path, secret_path):
        if path.exists():
            raise ConfigError(f"{path} exists; choose another name or remove it first")
    public, secret = zmq.curve_keypair()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    _write(public_path, 0o644, _certificate(stamp, "Public", public, None))
    _write(secret_path, 0o600, _certificate(stamp, "**Secret**", public, secret))
    return public_path, secret_path


def _certificate(stamp: str, kind: str, public: bytes, secret: bytes | None) -> str:
    """pyzmq's certificate format, so `zmq.auth.load_certificate` and czmq tools read it."""
    lines = [f"#   ****  Generated on {stamp} by blockswarm  ****", f"#   ZeroMQ CURVE {kind} Certificate"]
    if secret:
        lines.append("#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.")
    lines += ["", "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _write(path: Path, mode: int, content: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(content)
    os.chmod(path, mode)  # the umask may have taken bits away from a public file; never adds any


def load_public_key(path: str | os.PathLike) -> bytes:
    return _read_certificate(path, "public")[0]


def _read_certificate(path: str | os.PathLike, need: str) -> tuple[bytes, bytes | None]:
    """(public, secret or None) from a certificate file; `need`: "public" or "secret"."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"cannot read a {need} key from {path} ({exc}); "
                          "write key files with `blockswarm keys new`") from None
    if not public or (need == "secret" and not secret):
        raise ConfigError(f"{path} holds no {need} key")
    return public, secret


def load_known_servers(path: str | os.PathLike) -> dict[str, bytes]:
    """`HOST:PORT PUBLIC_KEY_FILE` per line (# comments); key paths are relative to the file."""
    file = Path(path)
    try:
        lines = file.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read --known-servers {path}: {exc.strerror}") from None
    known = {}
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2 or ":" not in words[0]:
            raise ConfigError(f"{path}:{number}: expected `HOST:PORT PUBLIC_KEY_FILE`, got {line.strip()!r}")
        key_path = Path(words[1]).expanduser()
        known[words[0]] = load_public_key(key_path if key_path.is_absolute() else file.parent / key_path)
    return known


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """What a client of a private swarm holds: its own pair and the servers' public keys."""

    pair: KeyPair
    servers: dict[str, bytes]  # control address (host:port) -> public key

    @classmethod
    def load(cls, keys: str, known_servers: str) -> "ClientKeys":
        return cls(KeyPair.load(keys), load_known_servers(known_servers))

    def server_key(self, address: str) -> bytes:
        key = self.servers.get(address)
        if key is None:
            raise ConfigError(f"{address} is not in --known-servers; add a line `{address} PATH/TO/ITS.key`")
        return key


def secure_client(socket: zmq.Socket, keys: ClientKeys, address: str) -> None:
    """CURVE on a client socket that will connect to the server at `address` (call before connect)."""
    socket.curve_secretkey = keys.pair.secret
    socket.curve_publickey = keys.pair.public
    socket.curve_serverkey = keys.server_key(address)


def secure_server(socket: zmq.Socket, pair: KeyPair) -> None:
    """CURVE on a server socket (call before bind); the ZAP handler decides who gets in."""
    socket.curve_secretkey = pair.secret
    socket.curve_publickey = pair.public
    socket.curve_server = True
    socket.zap_domain = ZAP_DOMAIN


class KeyGate:
    """The ZAP handler of a private server: admits CURVE clients whose public key is in the allowed
    set, refuses everyone else with one log line naming their address and key. A thread with a REP
    socket on ZeroMQ's ZAP endpoint; libzmq asks it during each handshake, before any message."""

    def __init__(self, context: zmq.Context, allowed: set[bytes], log):
        self.allowed, self.log = allowed, log  # z85 public keys; a RateLimitedLog
        self._socket = context.socket(zmq.REP)
        self._socket.linger = 0
        self._socket.bind("inproc://zeromq.zap.01")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="zap", daemon=True)

    def start(self) -> "KeyGate":
        self._thread.start()  # the socket moves to the thread: thread start is the memory barrier
        return self

    def _serve(self) -> None:
        try:
            while not self._stop.is_set():
                if self._socket.poll(100):
                    request = self._socket.recv_multipart()
                    try:
                        reply = self._answer(request)
                    except Exception:  # never let the gate die: a dead gate would stall every handshake
                        self.log.exception("gate", "the key gate failed on a request; refused it")
                        reply = [request[0], request[1] if len(request) > 1 else b"", b"500", b"error", b"", b""]
                    self._socket.send_multipart(reply)
        finally:
            self._socket.close(linger=0)

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        """ZAP 1.0: [version, id, domain, address, identity, mechanism, credentials...] -> reply."""
        version, request_id, _domain, address, _identity, mechanism, *credentials = frames + [b""] * 6
        if mechanism == b"CURVE" and len(credentials) >= 1 and len(credentials[0]) == 32:
            key = z85.encode(credentials[0])
            if key in self.allowed:
                return [version, request_id, b"200", b"OK", key, b""]
            self.log.warning(f"refused-{address!r}", "refused a client from %s: its key %s is not in --allow",
                             address.decode(errors="replace"), key.decode())
        else:
            self.log.warning(f"refused-{address!r}", "refused a client from %s: it did not offer a CURVE key",
                             address.decode(errors="replace"))
        return [version, request_id, b"400", b"key not allowed", b"", b""]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def start_gate(context: zmq.Context, allow: str | os.PathLike, log) -> KeyGate:
    """Admit the CURVE keys of the public key files (*.key) in directory `allow`, and no other."""
    folder = Path(allow)
    if not folder.is_dir():
        raise ConfigError(f"--allow {allow} is not a directory of public key files (*{PUBLIC_SUFFIX})")
    keys = {load_public_key(path) for path in sorted(folder.glob(f"*{PUBLIC_SUFFIX}"))}
    if not keys:
        raise ConfigError(f"--allow {allow} holds no *{PUBLIC_SUFFIX} files: no client could connect")
    return KeyGate(context, keys, log).start()
