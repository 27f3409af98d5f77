"""Runtime latency: SmolLM2 whole in one process vs. the swarm over 1-3 loopback servers.

Prints a table and writes JSON with per-token decode latency, time to first token, the
transport overhead per hop (round trip minus the server's compute time, median over decode
steps and hops), the same with CURVE encryption on (a private swarm of 3 servers, generations
alternating with an open one of the same shape so that both see the same load), the aggregate tokens/s with several sequences in flight through 3 servers, and
the transport floor measured in the same run (`transport_floor.py`: the same relay with bare
ZeroMQ and bare TCP echo processes, no model, no serialization), so that what is ours and what
is the machine's can be told apart.
Every process uses one torch thread so that local and swarm compare like with like on a
shared 2-core machine.

    .venv/bin/python benchmarks/runtime_latency.py --json runtime_latency.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

from blockswarm.model.checkpoint import SMOLLM2, ensure_smollm2
from blockswarm.runtime.client import DistributedModel
from blockswarm.runtime.launcher import even_spans, local_swarm
from meta import run_metadata
from transport_floor import measure as measure_transport_floor

PROMPT_TOKENS = 32
SERVER_ARGS = ["--threads", "1"]


def prompt_ids(n: int) -> list[int]:
    return [(17 * i + 101) % 49000 + 10 for i in range(n)]


def measure_local(new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(ensure_smollm2(), dtype=torch.float32).eval()
    # from_pretrained leaves the weights memory-mapped, and the CPU BLAS takes another GEMV path for
    # those than for the ordinary copies the servers hold (tests/conftest.py::reference_model), so
    # the baseline copies them too: like against like.
    for parameter in model.parameters():
        parameter.data = parameter.data.clone()
    ids = torch.tensor([prompt_ids(PROMPT_TOKENS)])
    runs = []
    for _ in range(3):
        cache, latencies = DynamicCache(config=model.config), []
        with torch.inference_mode():
            begin = time.perf_counter()
            token = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            ttft = time.perf_counter() - begin
            for _ in range(new_tokens - 1):
                begin = time.perf_counter()
                token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                latencies.append(time.perf_counter() - begin)
        runs.append((ttft, statistics.median(latencies)))
    return {"ttft_ms": 1e3 * statistics.median(r[0] for r in runs),
            "ms_per_token": 1e3 * statistics.median(r[1] for r in runs)}


def measure_swarm(servers: int, new_tokens: int, inflight: list[int]) -> dict:
    with local_swarm(SMOLLM2, even_spans(30, servers), SERVER_ARGS) as addresses:
        model = DistributedModel.from_servers(addresses, model=SMOLLM2)
        model.generate(prompt_ids(8), max_new_tokens=4, stop_at_eos=False)  # warm up
        results = [model.generate(prompt_ids(PROMPT_TOKENS), max_new_tokens=new_tokens, stop_at_eos=False)
                   for _ in range(3)]
        overheads = [o for r in results for hop in r.hops for o in hop.overhead_s[1:]]
        server_side = [o for r in results for hop in r.hops for o in hop.server_overhead_s[1:]]
        compute = [statistics.median(sum(h.compute_s[i] for h in r.hops) for i in range(1, new_tokens))
                   for r in results]
        row = {
            "servers": servers,
            "ttft_ms": 1e3 * statistics.median(r.ttft_s for r in results),
            "ms_per_token": 1e3 * statistics.median(r.median_token_s for r in results),
            "server_compute_ms_per_token": 1e3 * statistics.median(compute),
            "overhead_per_hop_ms": 1e3 * statistics.median(overheads),
            "overhead_per_hop_p90_ms": 1e3 * sorted(overheads)[int(0.9 * len(overheads))],
            "server_side_overhead_per_hop_ms": 1e3 * statistics.median(server_side),
        }
        if inflight:
            row["tokens_per_s_by_inflight"] = {str(n): throughput(model, n, new_tokens) for n in inflight}
    # the same relay, same cadence, with bare echo processes instead of servers, measured right after
    client_ms = row["ms_per_token"] - row["server_compute_ms_per_token"] - servers * row["overhead_per_hop_ms"]
    floor = measure_transport_floor(hops=servers, tokens=new_tokens,
                                    compute_s=row["server_compute_ms_per_token"] / servers / 1e3,
                                    client_s=max(0.0, client_ms) / 1e3)
    row["zeromq_floor_per_hop_ms"] = floor["zeromq_floor_per_hop_ms"]
    row["tcp_floor_per_hop_ms"] = floor["tcp_floor_per_hop_ms"]
    return row


def measure_curve(servers: int, new_tokens: int, rounds: int = 6) -> dict:
    """The same chain twice, open and private (CURVE), generations alternating between the two so
    that both see the same machine load; per-token time and overhead per hop for each."""
    import tempfile
    from pathlib import Path

    from blockswarm.runtime.security import ClientKeys, write_keypair

    spans = even_spans(30, servers)
    with tempfile.TemporaryDirectory() as folder:
        keys = Path(folder)
        write_keypair(keys, "server")
        write_keypair(keys / "clients", "bench")
        private = [*SERVER_ARGS, "--keys", str(keys / "server"), "--allow", str(keys / "clients")]
        with local_swarm(SMOLLM2, spans, SERVER_ARGS) as plain_addresses, \
                local_swarm(SMOLLM2, spans, private) as private_addresses:
            (keys / "known").write_text("".join(f"{a} server.key\n" for a in private_addresses))
            client_keys = ClientKeys.load(str(keys / "clients" / "bench"), str(keys / "known"))
            models = {"plain": DistributedModel.from_servers(plain_addresses, model=SMOLLM2),
                      "curve": DistributedModel.from_servers(private_addresses, model=SMOLLM2, keys=client_keys)}
            runs = {name: [] for name in models}
            for name, model in models.items():
                model.generate(prompt_ids(8), max_new_tokens=4, stop_at_eos=False)  # warm up
            for _ in range(rounds):
                for name, model in models.items():
                    runs[name].append(model.generate(prompt_ids(PROMPT_TOKENS), max_new_tokens=new_tokens,
                                                     stop_at_eos=False))
    row = {"servers": servers, "rounds": rounds}
    for name, results in runs.items():
        overheads = [o for r in results for hop in r.hops for o in hop.overhead_s[1:]]
        row[f"{name}_ms_per_token"] = 1e3 * statistics.median(r.median_token_s for r in results)
        row[f"{name}_overhead_per_hop_ms"] = 1e3 * statistics.median(overheads)
    row["curve_extra_per_hop_ms"] = row["curve_overhead_per_hop_ms"] - row["plain_overhead_per_hop_ms"]
    return row


def throughput(model: DistributedModel, sequences: int, new_tokens: int) -> float:
    """Aggregate generated tokens per second with `sequences` generations running at once."""
    errors = []

    def run(seed: int):
        try:
            model.generate(prompt_ids(8 + seed), max_new_tokens=new_tokens, stop_at_eos=False)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(sequences)]
    begin = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sequences * new_tokens / (time.perf_counter() - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--inflight", default="1,2,4,8", help="sequences in flight for the throughput test")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ensure_smollm2()
    local = measure_local(args.new_tokens)
    inflight = [int(x) for x in args.inflight.split(",") if x]
    swarm = {n: measure_swarm(n, args.new_tokens, inflight if n == 3 else []) for n in (1, 2, 3)}
    curve = measure_curve(3, args.new_tokens)

    print(f"{'setup':<22}{'TTFT ms':>10}{'ms/token':>10}{'compute ms':>12}{'overhead/hop ms':>17}"
          f"{'server side':>13}{'ZeroMQ floor':>14}{'TCP floor':>11}")
    print(f"{'local (1 process)':<22}{local['ttft_ms']:>10.1f}{local['ms_per_token']:>10.1f}")
    for n, row in swarm.items():
        print(f"{f'swarm, {n} server(s)':<22}{row['ttft_ms']:>10.1f}{row['ms_per_token']:>10.1f}"
              f"{row['server_compute_ms_per_token']:>12.1f}{row['overhead_per_hop_ms']:>17.3f}"
              f"{row['server_side_overhead_per_hop_ms']:>13.3f}"
              f"{row['zeromq_floor_per_hop_ms']:>14.3f}{row['tcp_floor_per_hop_ms']:>11.3f}")
    print(f"{'swarm, 3, plain':<22}{'':>10}{curve['plain_ms_per_token']:>10.1f}{'':>12}"
          f"{curve['plain_overhead_per_hop_ms']:>17.3f}   (alternating with the next row)")
    print(f"{'swarm, 3, CURVE':<22}{'':>10}{curve['curve_ms_per_token']:>10.1f}{'':>12}"
          f"{curve['curve_overhead_per_hop_ms']:>17.3f}   encryption adds {curve['curve_extra_per_hop_ms']:+.3f} ms "
          "per hop (target <= 0.2)")
    by_inflight = swarm[3]["tokens_per_s_by_inflight"]
    print("aggregate tokens/s through 3 servers by sequences in flight: "
          + ", ".join(f"{k}: {v:.1f}" for k, v in by_inflight.items()))
    all_overheads = [row["overhead_per_hop_ms"] for row in swarm.values()]
    result = {
        "overhead_per_hop_ms": statistics.median(all_overheads),
        "local_ms_per_token": local["ms_per_token"],
        "local_ttft_ms": local["ttft_ms"],
        "swarm_ms_per_token": {str(n): row["ms_per_token"] for n, row in swarm.items()},
        "swarm_ttft_ms": {str(n): row["ttft_ms"] for n, row in swarm.items()},
        "tokens_per_s_by_inflight": by_inflight,
        "zeromq_floor_per_hop_ms": statistics.median(row["zeromq_floor_per_hop_ms"] for row in swarm.values()),
        "tcp_floor_per_hop_ms": statistics.median(row["tcp_floor_per_hop_ms"] for row in swarm.values()),
        "overhead_above_zeromq_floor_ms": statistics.median(
            row["overhead_per_hop_ms"] - row["zeromq_floor_per_hop_ms"] for row in swarm.values()),
        "curve_overhead_per_hop_ms": curve["curve_overhead_per_hop_ms"],
        "curve_extra_per_hop_ms": curve["curve_extra_per_hop_ms"],
        "curve": curve,
        "swarm": {str(n): row for n, row in swarm.items()},
        "prompt_tokens": PROMPT_TOKENS,
        "new_tokens": args.new_tokens,
        "meta": run_metadata(),
    }
    print(f"transport floor per hop, the same relay through bare echo processes: "
          f"ZeroMQ {result['zeromq_floor_per_hop_ms']:.3f} ms, plain TCP {result['tcp_floor_per_hop_ms']:.3f} ms")
    print(f"transport overhead per hop (median): {result['overhead_per_hop_ms']:.3f} ms (target <= 1 ms), "
          f"{result['overhead_above_zeromq_floor_ms']:+.3f} ms over the ZeroMQ floor")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
