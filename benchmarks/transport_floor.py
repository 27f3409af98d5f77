"""Transport floor: what relaying one token's hidden states through local echo processes costs
with nothing but the transport — no model, no msgpack, no torch.

The client relays a hidden-state-sized frame hop by hop, as blockswarm's client does; each echo
process stands for a server: it sleeps until a message comes, busy-works for the compute time of
its span, and answers. Overhead per hop = round trip minus that compute time. Measured for
ZeroMQ ROUTER/DEALER (blockswarm's transport) and, for reference, plain blocking TCP sockets.
Whatever blockswarm's own overhead exceeds the ZeroMQ floor by is ours; the floor is the machine's.

    .venv/bin/python benchmarks/transport_floor.py --json transport_floor.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import statistics
import struct
import time

import zmq

from meta import run_metadata

HIDDEN_BYTES = 576 * 4  # one SmolLM2 token's hidden state in float32
STOP = b"stop"


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def zmq_echo(ports, compute_s: float) -> None:
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    ports.put(router.bind_to_random_port("tcp://127.0.0.1"))
    while True:
        if router.poll(100):
            frames = router.recv_multipart()
            if frames[1] == STOP:
                break
            busy(compute_s)
            router.send_multipart(frames)
    router.close(linger=0)
    context.term()


def _recv_exact(connection: socket.socket, size: int) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def _recv_frame(connection: socket.socket) -> bytes | None:
    head = _recv_exact(connection, 4)
    return None if head is None else _recv_exact(connection, struct.unpack("!I", head)[0])


def _send_frame(connection: socket.socket, payload: bytes) -> None:
    connection.sendall(struct.pack("!I", len(payload)) + payload)


def tcp_echo(ports, compute_s: float) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    ports.put(listener.getsockname()[1])
    connection, _ = listener.accept()
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while (payload := _recv_frame(connection)) not in (None, STOP):
        busy(compute_s)
        _send_frame(connection, payload)
    connection.close()
    listener.close()


class _ZmqHops:
    def __init__(self, ports: list[int]):
        self.context = zmq.Context()
        self.sockets = []
        for port in ports:
            dealer = self.context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(f"tcp://127.0.0.1:{port}")
            self.sockets.append(dealer)

    def round_trip(self, hop: int, payload: bytes) -> None:
        self.sockets[hop].send(payload)
        self.sockets[hop].recv()

    def close(self) -> None:
        for dealer in self.sockets:
            dealer.send(STOP)
            dealer.close()
        self.context.term()


class _TcpHops:
    def __init__(self, ports: list[int]):
        self.sockets = [socket.create_connection(("127.0.0.1", port)) for port in ports]
        for connection in self.sockets:
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def round_trip(self, hop: int, payload: bytes) -> None:
        _send_frame(self.sockets[hop], payload)
        _recv_frame(self.sockets[hop])

    def close(self) -> None:
        for connection in self.sockets:
            _send_frame(connection, STOP)
            connection.close()


TRANSPORTS = {"zeromq": (zmq_echo, _ZmqHops), "tcp": (tcp_echo, _TcpHops)}


def relay_overheads(transport: str, hops: int, tokens: int, compute_s: float, client_s: float) -> list[float]:
    """Per-hop overheads (seconds) of relaying `tokens` tokens through `hops` echo processes."""
    echo, client_class = TRANSPORTS[transport]
    spawn = multiprocessing.get_context("spawn")
    ports = spawn.Queue()
    processes = [spawn.Process(target=echo, args=(ports, compute_s), daemon=True) for _ in range(hops)]
    for process in processes:
        process.start()
    client = client_class([ports.get(timeout=60) for _ in processes])
    payload = b"\0" * HIDDEN_BYTES
    overheads = []
    try:
        for token in range(tokens + 3):
            busy(client_s)  # the client's own work per token (embedding, LM head, sampling)
            for hop in range(hops):
                begin = time.perf_counter()
                client.round_trip(hop, payload)
                if token >= 3:  # the first tokens warm up connections
                    overheads.append(time.perf_counter() - begin - compute_s)
    finally:
        client.close()
        for process in processes:
            process.join(timeout=10)
    return overheads


def measure(hops: int = 3, tokens: int = 60, compute_s: float = 0.02, client_s: float = 0.015) -> dict:
    """Median per-hop overhead in ms for each transport, in one run (compare them, not across runs)."""
    result = {"hops": hops, "tokens": tokens, "compute_ms_per_hop": 1e3 * compute_s, "client_ms": 1e3 * client_s}
    for transport in TRANSPORTS:
        overheads = relay_overheads(transport, hops, tokens, compute_s, client_s)
        result[f"{transport}_floor_per_hop_ms"] = 1e3 * statistics.median(overheads)
        result[f"{transport}_floor_per_hop_p90_ms"] = 1e3 * sorted(overheads)[int(0.9 * len(overheads))]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--hops", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=60)
    parser.add_argument("--compute-ms", type=float, default=20.0, help="busy work per hop, standing for a span")
    parser.add_argument("--client-ms", type=float, default=15.0, help="the client's busy work per token")
    args = parser.parse_args()
    result = measure(args.hops, args.tokens, args.compute_ms / 1e3, args.client_ms / 1e3)
    print(f"{'transport':<10}{'overhead/hop ms (median)':>26}{'p90 ms':>10}")
    for transport in TRANSPORTS:
        print(f"{transport:<10}{result[f'{transport}_floor_per_hop_ms']:>26.3f}"
              f"{result[f'{transport}_floor_per_hop_p90_ms']:>10.3f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({**result, "meta": run_metadata()}, handle, indent=2)


if __name__ == "__main__":
    main()
