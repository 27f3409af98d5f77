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
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from blockswarm.core.errors import ConfigError

PUBLIC_SUFFIX, SECRET_SUFFIX = ".key", ".key_secret"


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
        try:
            public, secret = zmq.auth.load_certificate(path)
        except (ValueError, OSError) as exc:
            raise ConfigError(f"{path} is not a key file written by `blockswarm keys new` ({exc})") from None
        if not secret:
            raise ConfigError(f"{path} holds no secret key")
        return cls(public, secret)


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
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"cannot read a public key from {path} ({exc})") from None
    if not public:
        raise ConfigError(f"{path} holds no public key")
    return public


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
    socket.zap_domain = b"blockswarm"


def start_authenticator(context: zmq.Context, allow: str | os.PathLike):
    """A ZAP handler that admits the CURVE keys found in `allow` (its *.key files) and no other."""
    from zmq.auth.thread import ThreadAuthenticator

    folder = Path(allow)
    if not folder.is_dir():
        raise ConfigError(f"--allow {allow} is not a directory of public key files (*.key)")
    if not any(folder.glob(f"*{PUBLIC_SUFFIX}")):
        raise ConfigError(f"--allow {allow} holds no *.key files: no client could connect")
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=str(folder))
    return authenticator
