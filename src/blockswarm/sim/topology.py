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


def rtt_from_gml(path: str | Path, notes: list[str] | None = None) -> dict[tuple[str, str], float]:
    """RTT = 2 × shortest-path delay between every pair of nodes of a GML graph, keyed by node
    label (made unique with the node id where labels repeat or are missing).

    Real maps have quirks, handled here and reported in `notes` (when given) instead of failing: a
    link listed twice is read once; a link whose end has no coordinates gets the mean delay of the
    map's other links."""
    import networkx as nx

    notes = notes if notes is not None else []
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read GML topology {path}: {exc}") from None
    # declared a multigraph so that a duplicated link is read rather than refused; collapsed below
    text = text.replace("graph [", "graph [\n  multigraph 1", 1)
    try:
        raw = nx.parse_gml(text, label="id")
    except nx.NetworkXError as exc:
        raise ConfigError(f"cannot read GML topology {path}: {exc}") from None
    duplicated = raw.number_of_edges() - nx.Graph(raw).number_of_edges()
    if duplicated:
        notes.append(f"{path}: {duplicated} link(s) listed twice, read once")
    labels = [str(raw.nodes[n].get("label", "")) for n in raw]
    names = {n: (label if label not in ("", "None") and labels.count(label) == 1 else f"{label or 'node'}-{n}")
             for n, label in zip(raw, labels)}
    graph = nx.Graph()
    graph.add_nodes_from(names[n] for n in raw)
    unknown = []
    for a, b in nx.Graph(raw).edges():
        if a == b:
            continue
        ends = [raw.nodes[n] for n in (a, b)]
        if "delay" in raw.edges[a, b, 0]:
            graph.add_edge(names[a], names[b], weight=float(raw.edges[a, b, 0]["delay"]) / 1e3)
        elif all("Latitude" in e and "Longitude" in e for e in ends):
            coordinates = [(e["Latitude"], e["Longitude"]) for e in ends]
            graph.add_edge(names[a], names[b], weight=great_circle_m(*coordinates) / FIBRE_M_PER_S)
        else:
            unknown.append((names[a], names[b]))
    if unknown:
        known = [w for _, _, w in graph.edges(data="weight")]
        if not known:
            raise ConfigError(f"{path}: no link has a delay or coordinates at both ends")
        mean = sum(known) / len(known)
        graph.add_edges_from(unknown, weight=mean)
        notes.append(f"{path}: {len(unknown)} link(s) touch nodes without coordinates; they get the mean delay "
                     f"of the other links ({mean * 1e3:.3f} ms)")
    if not nx.is_connected(graph):
        raise ConfigError(f"{path}: the topology is not connected")
    delays = dict(nx.all_pairs_dijkstra_path_length(graph, weight="weight"))
    nodes = list(graph)
    rtt = {}
    for i, a in enumerate(nodes):  # one sum per pair, so that RTT(a, b) == RTT(b, a) exactly
        rtt[(a, a)] = LOCAL_RTT_S
        for b in nodes[i + 1:]:
            # PoPs in one city (equal coordinates) are still apart: at least the local RTT
            rtt[(a, b)] = rtt[(b, a)] = max(2 * delays[a][b], LOCAL_RTT_S)
    return rtt


def place_on_topology(scenario: Scenario, rtt: dict[tuple[str, str], float], seed: int) -> Scenario:
    """Put every server and client on a node chosen by seed, and use the topology's RTTs."""
    nodes = sorted({a for a, _ in rtt})
    rng = random.Random(seed)
    servers = tuple(dataclasses.replace(s, location=rng.choice(nodes)) for s in scenario.servers)
    clients = tuple(dataclasses.replace(c, location=rng.choice(nodes)) for c in scenario.clients)
    network = dataclasses.replace(scenario.network, rtt_s=dict(rtt),
                                  bandwidth_bps={(n, n): 1e9 for n in nodes})
    return dataclasses.replace(scenario, servers=servers, clients=clients, network=network)
