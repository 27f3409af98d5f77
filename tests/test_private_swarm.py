"""Private swarms: CURVE keys, who gets in, what an eavesdropper sees, whose sessions are whose."""

from __future__ import annotations

import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
import zmq

from blockswarm.core.errors import ConfigError, Refused, UnknownSession
from blockswarm.runtime.client import DistributedModel
from blockswarm.runtime.connection import Connection
from blockswarm.runtime.launcher import local_swarm
from blockswarm.runtime.security import ClientKeys, KeyPair, write_keypair

from test_runtime_e2e import reference_greedy

PROMPT = [3, 14, 15, 92, 65, 35]


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blockswarm", *args], capture_output=True, text=True, timeout=timeout)


def test_keys_new_writes_a_public_file_and_a_secret_only_its_owner_can_read(tmp_path):
    run = cli("keys", "new", "alice", "--dir", str(tmp_path / "keys"))
    assert run.returncode == 0, run.stderr
    public, secret = tmp_path / "keys" / "alice.key", tmp_path / "keys" / "alice.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "secret-key" not in public.read_text() and "secret-key" in secret.read_text()
    assert KeyPair.load(tmp_path / "keys" / "alice").public.decode() in public.read_text()
    again = cli("keys", "new", "alice", "--dir", str(tmp_path / "keys"))
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    write_keypair(root, "server")
    for name in ("alice", "bob"):
        write_keypair(root / "clients", name)
    write_keypair(root / "strangers", "mallory")
    return root


def known_servers(keys, addresses: list[str]) -> str:
    path = keys / f"known-{len(addresses)}-{time.monotonic_ns()}"
    path.write_text("".join(f"{address} server.key\n" for address in addresses))
    return str(path)


@pytest.mark.slow
def test_a_private_server_admits_its_clients_only(tiny_model_dirs, keys):
    directory = tiny_model_dirs["llama"]
    private = ["--threads", "1", "--keys", str(keys / "server"), "--allow", str(keys / "clients")]
    with local_swarm(str(directory), [(0, 3), (3, 6)], private) as addresses:
        known = known_servers(keys, addresses)
        alice = ClientKeys.load(str(keys / "clients" / "alice"), known)
        model = DistributedModel.from_servers(addresses, model=str(directory), keys=alice)
        assert model.generate(PROMPT, max_new_tokens=8).token_ids == reference_greedy(directory, PROMPT, 8)

        mallory = ClientKeys.load(str(keys / "strangers" / "mallory"), known)
        with pytest.raises(Refused, match="refused our key"):
            DistributedModel.from_servers(addresses, model=str(directory), keys=mallory)
        with pytest.raises(Refused, match="private server; connect with --keys"):
            DistributedModel.from_servers(addresses, model=str(directory))
        with pytest.raises(ConfigError, match="not in --known-servers"):
            Connection(zmq.Context.instance(), "127.0.0.1:1", keys=alice)
        # a server that cannot prove it holds the key the client expects is refused by the client
        (keys / "impostor-known").write_text(f"{addresses[0]} {keys / 'clients' / 'bob.key'}\n")
        fooled = ClientKeys.load(str(keys / "clients" / "alice"), str(keys / "impostor-known"))
        with pytest.raises(Refused):
            Connection(zmq.Context.instance(), addresses[0], timeout_s=10, keys=fooled).info()

        # without keys, the command line says what is missing, quickly
        began = time.monotonic()
        run = cli("generate", "--servers", ",".join(addresses), "--model", str(directory), "hello", timeout=60)
        assert run.returncode == 2 and "--keys" in run.stderr and "Traceback" not in run.stderr
        assert time.monotonic() - began < 10 + 8  # (+ the client's own start: loading torch and the model)


@pytest.mark.slow
def test_a_session_belongs_to_the_key_that_opened_it(tiny_model_dirs, keys):
    directory = tiny_model_dirs["llama"]
    private = ["--threads", "1", "--keys", str(keys / "server"), "--allow", str(keys / "clients")]
    with local_swarm(str(directory), [(0, 6)], private) as (address,):
        known = known_servers(keys, [address])
        context = zmq.Context.instance()
        alice = Connection(context, address, timeout_s=10, keys=ClientKeys.load(str(keys / "clients" / "alice"), known))
        bob = Connection(context, address, timeout_s=10, keys=ClientKeys.load(str(keys / "clients" / "bob"), known))
        alice.open(0, 8, 2**20)
        bob.open(0, 8, 2**20)  # bob needs a data connection of his own to try
        hidden = torch.randn(1, 2, 64)
        with pytest.raises(UnknownSession):
            bob.request("step", (hidden,), session=alice.token, step=1)
        bob.request("close", session=alice.token)  # ignored: not his
        _, out = alice.step(hidden)
        assert out.shape == hidden.shape
        alice.close()
        bob.close()


class RecordingProxy:
    """Forwards TCP from `listen` to `target` in both directions and keeps every byte it saw."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]):
        self.target, self.seen, self._lock = target, bytearray(), threading.Lock()
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(listen)
        self.server.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source, sink):
        try:
            while chunk := source.recv(1 << 16):
                with self._lock:
                    self.seen += chunk
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.server.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("private", [False, True])
def test_with_curve_neither_hidden_states_nor_session_tokens_cross_the_wire_in_clear(tiny_model_dirs, keys, private):
    """The client reaches the server through a recording proxy on 127.0.0.20 (both ports). Without
    CURVE the raw bytes of a hidden state and the session token are on the wire (so the test can
    fail); with CURVE neither is."""
    directory = tiny_model_dirs["llama"]
    port, data_port = free_port(), free_port()
    extra = ["--keys", str(keys / "server"), "--allow", str(keys / "clients")] if private else []
    with local_swarm(str(directory), [(0, 6)], ["--threads", "1", "--port", str(port), "--data-port", str(data_port),
                                                *extra]):
        proxies = [RecordingProxy(("127.0.0.20", p), ("127.0.0.1", p)) for p in (port, data_port)]
        try:
            address = f"127.0.0.20:{port}"
            client_keys = (ClientKeys.load(str(keys / "clients" / "alice"), known_servers(keys, [address]))
                           if private else None)
            connection = Connection(zmq.Context.instance(), address, timeout_s=10, keys=client_keys)
            connection.open(0, 8, 2**20)
            token = connection.token
            hidden = torch.randn(1, 3, 64)
            connection.step(hidden)
            connection.close()
            time.sleep(0.2)
            wire = bytes(proxies[0].seen + proxies[1].seen)
            on_the_wire = hidden.numpy().tobytes() in wire, token.encode() in wire
            assert on_the_wire == ((False, False) if private else (True, True))
        finally:
            for proxy in proxies:
                proxy.close()


@pytest.mark.slow
def test_a_private_coordinated_swarm_admits_its_members_only(tiny_model_dirs, keys, tmp_path):
    """The coordinator takes CURVE keys like servers: it admits the servers and clients in its
    --allow directory, and hands clients the keys of the servers on their route."""
    import shutil

    from blockswarm.runtime.coordinator.link import CoordinatorLink
    from blockswarm.runtime.launcher import coordinated_swarm

    directory = tiny_model_dirs["llama"]
    write_keypair(tmp_path, "coordinator")
    members = tmp_path / "members"
    members.mkdir()
    for public in (keys / "server.key", keys / "clients" / "alice.key"):
        shutil.copy(public, members / public.name)
    coordinator_args = ["--R", "2", "--session-tokens", "256", "--state", str(tmp_path / "state.sqlite"),
                        "--keys", str(tmp_path / "coordinator"), "--allow", str(members)]
    server_args = ["--threads", "1", "--keys", str(keys / "server"), "--allow", str(keys / "clients")]
    known = tmp_path / "known"
    with coordinated_swarm(str(directory), ["2.5MiB"], coordinator_args, server_args,
                           known_servers=known, coordinator_key=tmp_path / "coordinator.key") as (address, _, _):
        alice = ClientKeys.load(str(keys / "clients" / "alice"), str(known))
        with DistributedModel.from_coordinator(address, model=str(directory), keys=alice) as model:
            assert model.generate(PROMPT, max_new_tokens=8).token_ids == reference_greedy(directory, PROMPT, 8)
        context = zmq.Context()
        try:
            mallory = ClientKeys.load(str(keys / "strangers" / "mallory"), str(known))
            with pytest.raises(Refused, match="refused our key"):
                CoordinatorLink(context, address, mallory).call("hello", client="m")
            with pytest.raises(Refused, match="it is private; connect with --keys"):
                CoordinatorLink(context, address).call("hello", client="anonymous")
        finally:
            context.destroy(linger=0)
