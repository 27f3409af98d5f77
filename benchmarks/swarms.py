"""Random mixed swarms for the benchmarks: A100-like and MIG-like servers (the spec's profiles of
BLOOM-176B in NF4) over several sites with random inter-site RTTs."""

from __future__ import annotations

import dataclasses
import random

from blockswarm.core.catalogue import MODELS
from blockswarm.core.specs import ClientSpec, NetworkSpec, Scenario, ServerSpec, WorkloadSpec

A100 = dict(memory=79.13e9, decode=3.2197e-3, slope=0.0743e-3, base=32.99e-3, name="a100-80gb")
MIG = dict(memory=8.2e9, decode=16.2488e-3, slope=0.1041e-3, base=206.35e-3, name="mig-1g.10gb")


def mixed_swarm(rng: random.Random, servers: int, blocks: int = 70, sites: int = 10, clients: int = 1,
                fast_share: float = 0.3, memory_jitter: float = 0.0,
                workload: WorkloadSpec = WorkloadSpec()) -> Scenario:
    """BLOOM-176B cut to `blocks` blocks (memory scaled to match), servers spread over sites."""
    model = dataclasses.replace(MODELS["bloom-176b"], weight_bytes_per_param=4.25 / 8, weight_overhead=1.01,
                                num_blocks=blocks)
    names = [f"site{i}" for i in range(sites)]
    specs = []
    for j in range(servers):
        kind = A100 if rng.random() < fast_share else MIG
        memory = kind["memory"] * blocks / 70 * rng.uniform(1 - memory_jitter, 1 + memory_jitter)
        specs.append(ServerSpec(f"s{j}", rng.choice(names), memory, kind["decode"], kind["slope"], kind["base"],
                                kind["name"]))
    rtt = {}
    for a in names:
        for b in names:
            if (b, a) not in rtt:
                rtt[(a, b)] = 0.005 if a == b else rng.uniform(0.02, 0.15)
    client_specs = tuple(ClientSpec(f"c{i}", names[i % sites] if clients >= sites else rng.choice(names))
                         for i in range(clients))
    network = NetworkSpec(rtt_s=rtt, bandwidth_bps={(a, a): 1e9 for a in names})
    return Scenario(f"mixed-{servers}", model, tuple(specs), client_specs, network, workload)
