"""The HTTP API's own cost, and the API under load, next to the Python API on the same swarm.

A local swarm of two server processes holds a tiny random llama that speaks SmolLM2's tokens
(`blockswarm.model.tiny`: real tokenizer and chat template, a token in ~10 ms here), so that what
is measured is the API and not the model. Both clients ask the same chat question with the chat
template, greedy, streaming. The API runs as its own process (`blockswarm api`), as users run it.
- overhead: one streaming HTTP client (keep-alive, as SDKs do) and the Python API
  (`DistributedModel.stream`) alternate at concurrency 1; TTFT is from sending the request to the
  first token's text arriving, per-token time is the mean gap between the first and the last
  token. The overhead is the difference of the medians, with a 95% interval from resampling the
  pairs (one request's TTFT varies by milliseconds on a shared VM).
- load: 1, 4 and 16 concurrent clients, each through the API and through the Python API (threads
  sharing one model), with requests/s and TTFT / latency percentiles.

    .venv/bin/python benchmarks/api_load.py --json api_load.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httptools

from blockswarm.model.checkpoint import ensure_smollm2
from blockswarm.model.sampling import SamplingParams
from blockswarm.model.tiny import tiny_chat_model
from blockswarm.runtime.client import DistributedModel
from blockswarm.runtime.launcher import local_swarm, start, stop_all, wait_ready
from meta import run_metadata

QUESTION = "Tell me about bees and how they build their hives."
GREEDY = SamplingParams()


class HTTPClient:
    """One keep-alive connection on a plain socket with Nagle off, each request in one write (as
    curl sends a small POST), the response read by httptools (uvicorn's C parser): the lightest
    streaming client, so that what is measured is the API's cost, not the client's. (stdlib
    http.client writes a request's headers and body apart, and the API, woken by the headers, then
    waits ~0.2 ms for the body; it parses headers with the email package, 2.5x the work of this
    client; httpx, under the OpenAI SDK, adds ~0.4 ms per request on its own.)"""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.socket = socket.create_connection((host, int(port)), timeout=120)
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.host = f"{host}:{port}"

    def _exchange(self, request: bytes, on_body) -> int:
        """Send `request`; hand the response's body (chunked encoding undone) to `on_body` as it
        arrives; return the status once the response has ended."""
        ended = []
        parser = httptools.HttpResponseParser(SimpleNamespace(on_body=on_body,
                                                              on_message_complete=lambda: ended.append(True)))
        self.socket.sendall(request)
        while not ended:
            data = self.socket.recv(1 << 16)
            if not data:
                raise ConnectionError("the API closed the connection mid-response")
            parser.feed_data(data)
        return parser.get_status_code()

    def chat(self, tokens: int) -> dict:
        body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": tokens,
                           "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}).encode()
        request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        pending, seen = bytearray(), {"first": None, "last": None, "generated": 0}

        def on_body(data: bytes) -> None:
            now = time.perf_counter()
            pending.extend(data)
            while (end := pending.find(b"\n\n")) >= 0:  # server-sent events end with a blank line
                event = bytes(pending[:end])
                del pending[:end + 2]
                if not event.startswith(b"data: {"):  # ([DONE], comments)
                    continue
                chunk = json.loads(event[6:])
                if chunk.get("usage"):
                    seen["generated"] = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    if choice["delta"].get("content") and seen["first"] is None:
                        seen["first"] = now
                    if choice["finish_reason"] is not None:
                        seen["last"] = now

        begin = time.perf_counter()
        status = self._exchange(request, on_body)
        if status != 200:
            raise RuntimeError(f"{status}: {bytes(pending)[:300]!r}")
        first, last, generated = seen["first"], seen["last"], seen["generated"]
        return {"ttft_s": first - begin, "per_token_s": (last - first) / max(1, generated - 1),
                "latency_s": time.perf_counter() - begin, "tokens": generated}

    def get(self) -> float:
        begin = time.perf_counter()
        self._exchange(f"GET /v1/models HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode(), lambda data: None)
        return time.perf_counter() - begin

    def close(self) -> None:
        self.socket.close()


def http_floor(url: str, idle_s: float) -> dict:
    """The same tiny GET back to back, and after `idle_s` of nothing (as between a request and its
    first token): on this VM a process woken from idle answers several times slower, which sets a
    floor under any HTTP front end's TTFT that no code in it can remove."""
    client = HTTPClient(url)
    hot, idle = [], []
    for _ in range(40):
        hot.append(client.get())
    for _ in range(40):
        time.sleep(idle_s)
        idle.append(client.get())
    client.close()
    return {"get_hot_ms": statistics.median(hot) * 1e3, "get_after_idle_ms": statistics.median(idle) * 1e3,
            "idle_ms": idle_s * 1e3}


def through_python(model: DistributedModel, tokens: int) -> dict:
    begin = time.perf_counter()
    first = last = None
    generated = 0
    for streamed in model.stream(QUESTION, tokens, GREEDY, chat_template=True):
        last = time.perf_counter()
        generated += 1
        if first is None and streamed.text:
            first = last
    return {"ttft_s": first - begin, "per_token_s": (last - first) / max(1, generated - 1),
            "latency_s": time.perf_counter() - begin, "tokens": generated}


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50_ms": statistics.median(ordered) * 1e3, "p90_ms": pick(0.9) * 1e3, "p99_ms": pick(0.99) * 1e3}


def overhead(model, url: str, pairs: int, tokens: int) -> dict:
    client = HTTPClient(url)
    for _ in range(3):  # warm both paths (first requests import and allocate)
        client.chat(tokens), through_python(model, tokens)
    api, python = [], []
    for _ in range(pairs):
        api.append(client.chat(tokens))
        python.append(through_python(model, tokens))
    client.close()
    result = {"pairs": pairs, "tokens": tokens}
    for key, name in (("ttft_s", "ttft"), ("per_token_s", "per_token")):
        a, p = [r[key] * 1e3 for r in api], [r[key] * 1e3 for r in python]
        low, high = bootstrap_difference(a, p)
        result.update({
            f"api_{name}_ms": statistics.median(a), f"python_{name}_ms": statistics.median(p),
            f"api_overhead_{name}_ms": statistics.median(a) - statistics.median(p),
            f"api_overhead_{name}_ci95_ms": [low, high],
            # the same from each request and the Python one next to it (less sensitive to drift)
            f"paired_overhead_{name}_ms": statistics.median(x - y for x, y in zip(a, p)),
            f"samples_{name}_ms": {"api": a, "python": p},
        })
    return result


def bootstrap_difference(a: list[float], b: list[float], rounds: int = 2000) -> tuple[float, float]:
    """A 95% interval for median(a) - median(b), resampling the pairs: on this shared VM one
    request's TTFT varies by milliseconds, so a single run's medians are not the whole story."""
    draw = random.Random(0)
    indices = range(len(a))
    differences = sorted(statistics.median(a[i] for i in sample) - statistics.median(b[i] for i in sample)
                         for sample in (draw.choices(indices, k=len(a)) for _ in range(rounds)))
    return differences[int(0.025 * rounds)], differences[int(0.975 * rounds) - 1]


def load(model, url: str, concurrency: int, requests: int, tokens: int) -> dict:
    row = {"concurrency": concurrency, "requests": requests}
    for name in ("api", "python"):
        clients = {}  # one keep-alive connection per client thread

        def one(_, name=name, clients=clients):
            if name == "python":
                return through_python(model, tokens)
            client = clients.setdefault(threading.get_ident(), HTTPClient(url))
            return client.chat(tokens)

        begin = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            runs = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - begin
        for client in clients.values():
            client.close()
        row[name] = {"requests_per_s": requests / wall,
                     "ttft": percentiles([r["ttft_s"] for r in runs]),
                     "latency": percentiles([r["latency_s"] for r in runs])}
    return row


@contextlib.contextmanager
def api_process(addresses: list[str], model_dir: str):
    """`blockswarm api` in its own process, as users run it (in this process its event loop would
    share the GIL with the benchmark's clients)."""
    process = start([sys.executable, "-m", "blockswarm", "api", "--servers", ",".join(addresses), "--model",
                     model_dir, "--port", "0"])
    try:
        yield f"http://{wait_ready(process, 120)}"
    finally:
        stop_all([process])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--pairs", type=int, default=60, help="alternated API / Python requests for the overhead")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level and client")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="api-load-") as scratch:
        model_dir = str(tiny_chat_model(Path(scratch) / "chat", ensure_smollm2()))
        with local_swarm(model_dir, [(0, 2), (2, 4)], ["--threads", "1"]) as addresses, \
                DistributedModel.from_servers(addresses, model=model_dir) as model, \
                api_process(addresses, model_dir) as url:
            result = {"meta": run_metadata(), "model": "tiny llama with SmolLM2's tokenizer, 4 blocks on 2 servers"}
            result.update(overhead(model, url, args.pairs, args.tokens))
            result["http_floor"] = http_floor(url, result["python_per_token_ms"] / 1e3)
            result["levels"] = [load(model, url, c, args.requests, args.tokens) for c in (1, 4, 16)]

    print(f"\nAPI overhead at concurrency 1 (medians of {args.pairs} alternated requests, {args.tokens} tokens):")
    for name, label, target in (("ttft", "TTFT     ", "<= 2 ms"), ("per_token", "per token", "<= 0.5 ms")):
        low, high = result[f"api_overhead_{name}_ci95_ms"]
        print(f"  {label}  API {result[f'api_{name}_ms']:7.2f} ms   Python {result[f'python_{name}_ms']:7.2f} ms   "
              f"overhead {result[f'api_overhead_{name}_ms']:+.3f} ms (95% {low:+.2f} to {high:+.2f})   (target {target})")
    print(f"  median of paired differences: TTFT {result['paired_overhead_ttft_ms']:+.2f} ms, "
          f"per token {result['paired_overhead_per_token_ms']:+.3f} ms")
    floor = result["http_floor"]
    print(f"  HTTP floor: GET /v1/models {floor['get_hot_ms']:.2f} ms back to back, "
          f"{floor['get_after_idle_ms']:.2f} ms after {floor['idle_ms']:.0f} ms idle")
    print(f"\n{'clients':>7} {'via':>6} {'req/s':>7} {'TTFT p50':>9} {'p90':>7} {'p99':>7} {'latency p50':>12} "
          f"{'p90':>7} {'p99':>7}   (ms)")
    for row in result["levels"]:
        for name in ("api", "python"):
            r = row[name]
            print(f"{row['concurrency']:>7} {name:>6} {r['requests_per_s']:7.1f} {r['ttft']['p50_ms']:9.1f} "
                  f"{r['ttft']['p90_ms']:7.1f} {r['ttft']['p99_ms']:7.1f} {r['latency']['p50_ms']:12.1f} "
                  f"{r['latency']['p90_ms']:7.1f} {r['latency']['p99_ms']:7.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
