"""ISP topologies in GML (Internet Topology Zoo format), and placing a swarm on their nodes.

Each link's one-way delay is its `delay` attribute in milliseconds when present, else its length
from the endpoint coordinates at v_fibre (no stretch: the graph gives the path); RTT = 2 ×
shortest-path delay. Servers and clients are placed on the graph's nodes by seed. RTTs from
plain coordinates live in perf/network.py.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from blockswarm.core.errors import ConfigError
from blockswarm.core.specs import Scenario
from blockswarm.perf.network import FIBRE_M_PER_S, LOCAL_RTT_S, great_circle_m


def rtt_from_gml(path: str | Path) -> dict[tuple[str, str], float]:
    """RTT = 2 × shortest-path delay between every pair of nodes of a GML graph (node labels as names)."""
    import networkx as nx

    try:
        graph = nx.read_gml(path, label="label")
    except (OSError, nx.NetworkXError) as exc:
        raise ConfigError(f"cannot read GML topology {path}: {exc}") from None
    graph = nx.Graph(graph)
    for a, b, data in graph.edges(data=True):
        if "delay" in data:
            data["weight"] = float(data["delay"]) / 1e3
        else:
            try:
                ends = [(graph.nodes[n]["Latitude"], graph.nodes[n]["Longitude"]) for n in (a, b)]
            except KeyError:
                raise ConfigError(f"{path}: link {a}-{b} has neither a delay nor endpoint coordinates") from None
            data["weight"] = great_circle_m(*ends) / FIBRE_M_PER_S
    if not nx.is_connected(graph):
        raise ConfigError(f"{path}: the topology is not connected")
    delays = dict(nx.all_pairs_dijkstra_path_length(graph, weight="weight"))
    return {(str(a), str(b)): (LOCAL_RTT_S if a == b else 2 * delays[a][b]) for a in graph for b in graph}


def place_on_topology(scenario: Scenario, rtt: dict[tuple[str, str], float], seed: int) -> Scenario:
    """Put every server and client on a node chosen by seed, and use the topology's RTTs."""
    nodes = sorted({a for a, _ in rtt})
    rng = random.Random(seed)
    servers = tuple(dataclasses.replace(s, location=rng.choice(nodes)) for s in scenario.servers)
    clients = tuple(dataclasses.replace(c, location=rng.choice(nodes)) for c in scenario.clients)
    network = dataclasses.replace(scenario.network, rtt_s=dict(rtt),
                                  bandwidth_bps={(n, n): 1e9 for n in nodes})
    return dataclasses.replace(scenario, servers=servers, clients=clients, network=network)
