"""Emulated hosts: every server, client and the coordinator of a testbed scenario is a host with
its own loopback address, and the links between hosts carry the scenario's RTTs.

Linux routes all of 127.0.0.0/8 to the loopback device, so any 127.x.y.z can be bound without
creating an alias or a namespace (nothing to clean up). A host has a *public* address (what
others dial; the link emulator listens there) and an *internal* one (what its process binds;
only the emulator connects to it). Ranges 127.20/16 and 127.21/16 are the testbed's own, apart
from 127.0.0.1 where everything else on this machine lives.
"""

from __future__ import annotations

from dataclasses import dataclass

from blockswarm.core.errors import ConfigError
from blockswarm.core.specs import Scenario

PUBLIC, INTERNAL = "127.20", "127.21"
MAX_HOSTS = 200 * 250
COORDINATOR = "coordinator"


@dataclass(frozen=True, slots=True)
class Host:
    name: str  # a server's or client's name in the scenario, or "coordinator"
    location: str  # the scenario location whose RTTs it has
    public: str
    internal: str


def address(prefix: str, index: int) -> str:
    if not 0 <= index < MAX_HOSTS:
        raise ConfigError(f"the testbed has room for {MAX_HOSTS} hosts")
    return f"{prefix}.{index // 250}.{index % 250 + 1}"


def coordinator_location(scenario: Scenario, location: str | None = None) -> str:
    """Where the coordinator's host is: `location`, or the first client's (clients ask it once per
    request, which the simulator counts in its set-up time)."""
    known = {s.location for s in scenario.servers} | {c.location for c in scenario.clients}
    if location is not None and location not in known:
        raise ConfigError(f"testbed.coordinator_location: must be a location of a server or client "
                          f"({', '.join(sorted(known))}), got {location!r}")
    return location or scenario.clients[0].location


def hosts_of(scenario: Scenario, coordinator: str | None = None) -> list[Host]:
    """One host per server, per client and one for the coordinator (see `coordinator_location`)."""
    named = [(s.name, s.location) for s in scenario.servers] + [(c.name, c.location) for c in scenario.clients]
    named.append((COORDINATOR, coordinator_location(scenario, coordinator)))
    seen = set()
    for name, _ in named:
        if name in seen:
            raise ConfigError(f"two hosts of the scenario are both called {name!r}; give each server and client "
                              "its own name")
        seen.add(name)
    return [Host(name, location, address(PUBLIC, i), address(INTERNAL, i)) for i, (name, location) in enumerate(named)]


def one_way_delays(scenario: Scenario, hosts: list[Host], time_scale: float) -> dict[tuple[str, str], float]:
    """Seconds each direction of every pair of hosts is held: half the RTT of their locations,
    divided by the time scale. Hosts at one location talk over the location's own RTT."""
    net = scenario.network
    return {(a.public, b.public): net.rtt(a.location, b.location) / 2 / time_scale
            for a in hosts for b in hosts if a is not b}


def bandwidths(scenario: Scenario, hosts: list[Host]) -> dict[tuple[str, str], float]:
    """Bytes per second of each direction, where the scenario gives a bandwidth."""
    net = scenario.network
    out = {}
    for a in hosts:
        for b in hosts:
            if a is b:
                continue
            bps = net.bandwidth_bps.get((a.location, b.location)) or net.bandwidth_bps.get((b.location, a.location))
            if bps:
                out[(a.public, b.public)] = bps / 8
    return out
