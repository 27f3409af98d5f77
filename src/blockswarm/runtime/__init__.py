"""Swarm runtime: wire protocol, servers, clients."""
