"""The HTTP API's own cost, and the API under load, next to the Python API on the same swarm.

A local swarm of two server processes holds a tiny random llama that speaks SmolLM2's tokens
(`blockswarm.model.tiny`: real tokenizer and chat template, a token in ~10 ms here), so that what
is measured is the API and not the model. Both clients ask the same chat question with the chat
template, greedy, streaming:
The API runs as its own process (`blockswarm api`), as users run it.
- overhead: one streaming HTTP client (keep-alive, as SDKs do) and the Python API
  (`DistributedModel.stream`) alternate at concurrency 1; TTFT is from sending the request to the
  first token's text arriving, per-token time is the mean gap between the first and the last
  token. The overhead is the difference of the medians.
- load: 1, 4 and 16 concurrent clients, each through the API and through the Python API (threads
  sharing one model), with requests/s and TTFT / latency percentiles.

    .venv/bin/python benchmarks/api_load.py --json api_load.json
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


from blockswarm.model.checkpoint import ensure_smollm2
from blockswarm.model.sampling import SamplingParams
from blockswarm.model.tiny import tiny_chat_model
from blockswarm.runtime.client import DistributedModel
from blockswarm.runtime.launcher import local_swarm, start, stop_all, wait_ready
from meta import run_metadata

QUESTION = "Tell me about bees and how they build their hives."
GREEDY = SamplingParams()


class HTTPClient:
    """One keep-alive connection, stdlib http.client with Nagle off: the lightest streaming client,
    so that what is measured is the API's cost, not the client's (httpx, under the OpenAI SDK,
    adds ~0.4 ms per request here on its own). A request leaves in one write, as curl sends a
    small POST: http.client writes the headers and the body apart, and the API, woken by the
    headers, would wait ~0.2 ms more for a second packet that is the client's doing."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=120)
        self.connection.connect()
        self.connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.host = f"{host}:{port}"

    def chat(self, tokens: int) -> dict:
        body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": tokens,
                           "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}).encode()
        request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        begin = time.perf_counter()
        self.connection.sock.sendall(request)
        response = http.client.HTTPResponse(self.connection.sock, method="POST")
        response.begin()
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {response.read()[:300]!r}")
        first = last = None
        generated = 0
        while line := response.readline():
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                generated = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if choice["delta"].get("content") and first is None:
                    first = now
                if choice["finish_reason"] is not None:
                    last = now
        response.close()
        return {"ttft_s": first - begin, "per_token_s": (last - first) / max(1, generated - 1),
                "latency_s": time.perf_counter() - begin, "tokens": generated}

    def get(self) -> float:
        begin = time.perf_counter()
        self.connection.request("GET", "/v1/models")
        self.connection.getresponse().read()
        return time.perf_counter() - begin

    def close(self) -> None:
        self.connection.close()


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

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    return {
        "pairs": pairs, "tokens": tokens,
        "api_ttft_ms": median(api, "ttft_s") * 1e3, "python_ttft_ms": median(python, "ttft_s") * 1e3,
        "api_per_token_ms": median(api, "per_token_s") * 1e3, "python_per_token_ms": median(python, "per_token_s") * 1e3,
        "api_overhead_ttft_ms": (median(api, "ttft_s") - median(python, "ttft_s")) * 1e3,
        "api_overhead_per_token_ms": (median(api, "per_token_s") - median(python, "per_token_s")) * 1e3,
        # the same from each request and the Python one next to it (less sensitive to drift)
        "paired_overhead_ttft_ms": statistics.median(a["ttft_s"] - p["ttft_s"] for a, p in zip(api, python)) * 1e3,
        "paired_overhead_per_token_ms": statistics.median(
            a["per_token_s"] - p["per_token_s"] for a, p in zip(api, python)) * 1e3,
    }


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
    parser.add_argument("--pairs", type=int, default=30, help="alternated API / Python requests for the overhead")
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
    print(f"  TTFT       API {result['api_ttft_ms']:7.2f} ms   Python {result['python_ttft_ms']:7.2f} ms   "
          f"overhead {result['api_overhead_ttft_ms']:+.2f} ms   (target <= 2 ms)")
    print(f"  per token  API {result['api_per_token_ms']:7.2f} ms   Python {result['python_per_token_ms']:7.2f} ms   "
          f"overhead {result['api_overhead_per_token_ms']:+.3f} ms  (target <= 0.5 ms)")
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
