"""Placement and routing policies: pure functions of a swarm view."""
