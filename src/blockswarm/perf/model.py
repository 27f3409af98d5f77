"""The performance model of shared/spec/allocation.md §2: costs of hops and routes, memory and slots.

    T(p) = Σ_{j∈p} (tᴵ_cj + k_j·τᴵ_j)  +  (l_out − 1)·Σ_{j∈p} (t_cj + k_j·τ_j)

with hub-and-spoke relay (only client↔server RTTs count), t_cj = RTT + decode overhead and
tᴵ_cj = RTT + per-token prefill transfer · l_in + prefill overhead (§7), plus a fixed set-up
time per request in the time to first token. All times in seconds, memory in bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blockswarm.core.specs import Request, Route, Scenario


@dataclass(frozen=True, slots=True)
class RouteTime:
    ttft_s: float  # set-up + prefill through every hop (the first token)
    per_token_s: float  # one decode step through every hop
    completion_s: float  # ttft + (l_out − 1) · per_token


def decode_link_s(scenario: Scenario, client: int, server: int) -> float:
    """t_cj: one decode step's network cost between client c and server j."""
    net = scenario.network
    return net.rtt(scenario.clients[client].location, scenario.servers[server].location) + net.decode_overhead_s


def prefill_link_s(scenario: Scenario, client: int, server: int, prompt_tokens: int) -> float:
    """tᴵ_cj(l_in): the prefill message's network cost."""
    net = scenario.network
    rtt = net.rtt(scenario.clients[client].location, scenario.servers[server].location)
    return rtt + net.prefill_s_per_token * prompt_tokens + net.prefill_overhead_s


def hop_decode_s(scenario: Scenario, client: int, server: int, blocks: int) -> float:
    """Per-token cost of a hop: t_cj + τ_j · k."""
    return decode_link_s(scenario, client, server) + scenario.servers[server].decode_s * blocks


def hop_prefill_s(scenario: Scenario, client: int, server: int, blocks: int, prompt_tokens: int) -> float:
    """First-token cost of a hop: tᴵ_cj + k · τᴵ_j(l_in)."""
    return (prefill_link_s(scenario, client, server, prompt_tokens)
            + blocks * scenario.servers[server].prefill_s(prompt_tokens))


def hop_service_s(scenario: Scenario, request: Request, server: int, blocks: int) -> float:
    """A hop's whole share of a request's time: prefill + (l_out − 1) decode steps."""
    return (hop_prefill_s(scenario, request.client, server, blocks, request.prompt_tokens)
            + (request.output_tokens - 1) * hop_decode_s(scenario, request.client, server, blocks))


@dataclass(frozen=True)
class ServerTable:
    """The servers' constants as arrays (and every client's RTT to every server), for pricing many
    hops in one numpy step."""

    decode_s: np.ndarray
    prefill_s_per_token: np.ndarray
    prefill_base_s: np.ndarray
    rtt_s: np.ndarray  # [client, server]

    @classmethod
    def of(cls, scenario: Scenario) -> ServerTable:
        servers, net = scenario.servers, scenario.network
        return cls(np.array([s.decode_s for s in servers]), np.array([s.prefill_s_per_token for s in servers]),
                   np.array([s.prefill_base_s for s in servers]),
                   np.array([[net.rtt(c.location, s.location) for s in servers] for c in scenario.clients]))

    def select(self, servers: np.ndarray) -> ServerTable:
        """The table's rows for `servers` (repeats allowed): one entry per hop of a routing graph."""
        return ServerTable(self.decode_s[servers], self.prefill_s_per_token[servers], self.prefill_base_s[servers],
                           self.rtt_s[:, servers])


def hop_service_array(scenario: Scenario, table: ServerTable, request: Request, servers: np.ndarray | slice,
                      blocks: np.ndarray) -> np.ndarray:
    """`hop_service_s` of many (server, blocks) hops at once, bit for bit: the same operations in
    the same order (a test holds it), so that a vectorized router decides exactly as a scalar one."""
    net, l_in = scenario.network, request.prompt_tokens
    rtt = table.rtt_s[request.client, servers]
    prefill = ((rtt + net.prefill_s_per_token * l_in + net.prefill_overhead_s)
               + blocks * (table.prefill_s_per_token[servers] * l_in + table.prefill_base_s[servers]))
    decode = (rtt + net.decode_overhead_s) + table.decode_s[servers] * blocks
    return prefill + (request.output_tokens - 1) * decode


def route_time(scenario: Scenario, route: Route, request: Request) -> RouteTime:
    ttft = scenario.network.setup_s + sum(
        hop_prefill_s(scenario, request.client, h.server, h.blocks, request.prompt_tokens) for h in route.hops)
    per_token = route_per_token_s(scenario, route, request.client)
    return RouteTime(ttft, per_token, ttft + (request.output_tokens - 1) * per_token)


def route_per_token_s(scenario: Scenario, route: Route, client: int) -> float:
    return sum(hop_decode_s(scenario, client, h.server, h.blocks) for h in route.hops)


def blocks_beside_cache(scenario: Scenario, server: int, sessions: int) -> int:
    """m_j = min(⌊M_j / (s_m + s_c·n)⌋, L): the blocks a server holds keeping cache for n sessions on
    each (CG-BP's conservative count with n = R, GBP-CR's m_j(c) with n = c)."""
    per_block = scenario.model.block_bytes + scenario.session_cache_bytes * sessions
    return min(int(scenario.servers[server].memory_bytes // per_block), scenario.model.num_blocks)


def slots(scenario: Scenario, server: int, blocks_held: int) -> int:
    """n_j: block-sessions of cache that fit beside the weights of `blocks_held` blocks (§5)."""
    free = scenario.servers[server].memory_bytes - scenario.model.block_bytes * blocks_held
    return max(0, int(free // scenario.session_cache_bytes))


def default_request(scenario: Scenario, client: int = 0) -> Request:
    w = scenario.workload
    return Request(client=client, prompt_tokens=w.prompt_tokens, output_tokens=w.output_tokens)
